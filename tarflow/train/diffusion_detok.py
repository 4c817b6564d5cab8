"""Training the diffusion de-tokenizer on Ray Train: stored TA-Tok codes -> rec features -> SANA -> VAE latents.

    code shards (tokenize --latents)  --ray.data.read_parquet: [tatok_s{scale} for each scale, latents_{res}] only
      --> Ray Train workers (TorchTrainer, DDP / FSDP), per micro-batch of rows:
          rows checked: missing codes or latents, wrong lengths, codes out of range, non-finite latents -> skipped
              and counted, never trained on
          a random pool scale per row (--scales; 1 -> 729, 2 -> 169, 3 -> 81 tokens for Tar's TA-Tok)
          frozen TA-Tok decoder: codes -> condition (B, n, C), SANA's encoder_hidden_states     (no grad;
              rows of shorter scales padded with masked-out tokens)
          condition dropout: a dropped row gets the null condition (negative_prompt_embeds.pth: the --init
              folder's own, else all-zero (n, C)), the one CFG samples with
          x0 = latents * vae.scaling_factor (B, c, h, w); flow matching (below); MSE on the velocity
          the step loop, schedule, metrics and checkpoints: tarflow.train.core
      --> checkpoints in Ray Train's storage: a diffusers SANA pipeline folder (transformer/, vae/, scheduler/,
          model_index.json, negative_prompt_embeds.pth) + the core's trainer state
      --> the final pipeline folder copied to `output` (local or s3://)

The objective is SANA's, as diffusers' SANA training script (examples/dreambooth/train_dreambooth_lora_sana.py)
and the SANA paper (arXiv 2410.10629, Sec. 2 / training details; rectified flow as in SD3, arXiv 2403.03206)
set it up:

    u ~ logit-normal(logit_mean 0, logit_std 1)     (diffusers.training_utils.compute_density_for_timestep_sampling,
                                                     weighting_scheme "logit_normal": SD3's rf/lognorm(0, 1), the
                                                     SANA configs' weighting_scheme)
    index = floor(u * 1000); sigma, t = FlowMatchEulerDiscreteScheduler(shift=flow_shift).sigmas/timesteps[index]
                                                    (the shifted schedule sigma' = s*sigma / (1 + (s-1)*sigma), with
                                                     t = 1000 sigma': the timestep SanaPipeline's DPM-Solver gives
                                                     the transformer at inference, flow_shift from the folder's
                                                     scheduler config (SANA: 3.0))
    x_t = (1 - sigma) x0 + sigma noise,   noise ~ N(0, I)
    loss = mean((transformer(x_t, t, cond) - (noise - x0))^2)   (velocity target; weighting "none" = 1, as the
                                                     timesteps are already drawn logit-normal)

which is what SanaPipeline's DPM-Solver++ (prediction_type "flow_prediction": x0 = x_t - sigma v) inverts.

This module holds only what is the diffusion de-tokenizer's: the data plan (which columns, checked on the driver),
the model (a SANA pipeline folder to fine-tune, or a new transformer from a config / the SANA 600M preset), the
batch and the loss. Resume, retention and step flags are the core's.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tarflow.data import schema, storage
from tarflow.models.diffusion_detok import NEGATIVE_EMBEDS_FILE
from tarflow.preflight import Problems
from tarflow.train.code_data import CODE_SKIP_REASONS, CodeRowsTask, TATokHeader, check_codes, check_tatok
from tarflow.train.code_data import Targets, data_plan_or_raise, plan_code_shards, row_metric_keys
from tarflow.train.common import OptimConfig
from tarflow.train.core import TrainConfig, worker_loop
from tarflow.train.run import TrainSummary, finish_preflight, fit

log = logging.getLogger("tarflow.train.diffusion_detok")

SKIP_REASONS = (*CODE_SKIP_REASONS, "nonfinite")
TRAINER_FILES = ("trainer_state.pt", "train_meta.json")  # the core's, left out of --output
DEFAULT_FLOW_SHIFT = 3.0  # SANA's scheduler (DPMSolverMultistepScheduler, use_flow_sigmas, flow_shift 3.0)


def default_optim() -> OptimConfig:
    # SANA's recipe: lr 1e-4, no weight decay (its configs use CAME; AdamW is the core's optimiser)
    return OptimConfig(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), warmup_ratio=0.01)


@dataclass(kw_only=True)
class DiffusionTrainConfig(TrainConfig):
    data: list[str]  # tokenize outputs made with --latents (finished shards), folders of code shards, shard files
    tatok: str | None = None  # the TA-Tok that made the codes: its decoder (frozen) makes the condition
    scales: list[int] = field(default_factory=lambda: [1])  # each row conditions on one, drawn at random
    latents_column: str | None = None  # default: the shards' latents column
    init: str | None = None  # a SANA pipeline folder to fine-tune (local or s3://); else a new transformer:
    transformer_config: str | None = None  # a SanaTransformer2DModel config.json, or "sana-600m"
    vae: str | None = None  # with transformer_config: the VAE (folder) that made the latents, written to the output
    flow_shift: float | None = None  # default: --init's scheduler flow_shift, else DEFAULT_FLOW_SHIFT
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cond_dropout: float = 0.1  # rows trained with the null condition (CFG)
    output: str | None = None  # where the final pipeline folder goes (local or s3://)
    batch_size: int = 32  # rows per worker per micro-batch (skipped rows make it smaller)
    # the core's settings, with this trainer's defaults
    name: str = "diffusion-detok"
    storage_path: str = "out/train-diffusion-detok"
    optim: OptimConfig = field(default_factory=default_optim)
    shuffle_buffer: int = 1024
    checkpoint_every: int = 1000
    max_failures: int = 3


# ----------------------------------------------------------------------------------------------------------
# Data: which shards, which columns, checked before anything starts


@dataclass
class DataPlan:
    files: list[str]
    scales: list[int]
    cond_columns: list[str]  # tatok_s{scale} per scale
    n_conds: list[int]  # TA-Tok tokens per image at each scale
    cond_codebook: int
    cond_dim: int  # TA-Tok hidden size (rec features) = the transformer's caption_channels
    tatok_sha256: str
    latents_column: str
    latents_shape: list[int]  # (c, h, w)
    vae_sha256: str
    scaling_factor: float

    def facts(self) -> dict:
        """What a checkpoint was trained on; a resumed run must match."""
        return asdict(self)


LATENT_TARGETS = Targets(key="latents", model="VAE", missing="no VAE latents (no latents_* column)",
                         tokenize_flags="--latents VAE --latent-resolution RES", column_flag="--latents-column")


def plan_data(cfg: DiffusionTrainConfig, tatok: TATokHeader, problems: Problems | None = None) -> DataPlan | None:
    """Every code shard must come from this TA-Tok and hold the scales and the latents of one VAE setting (see
    plan_code_shards: problems go to `problems`, or are raised at the end without it)."""
    scales = [int(v) for v in cfg.scales]
    files, lat = plan_code_shards(cfg.data, tatok, f"--tatok {cfg.tatok}", scales, "--scales", LATENT_TARGETS,
                                  cfg.latents_column, problems)
    if lat is None:
        return None
    return DataPlan(files=files, scales=scales, cond_columns=[schema.code_column(v) for v in scales],
                    n_conds=[tatok.num_tokens(v) for v in scales],
                    cond_codebook=tatok.codebook_size, cond_dim=tatok.hidden_size,
                    tatok_sha256=tatok.sha256, latents_column=lat["column"],
                    latents_shape=[int(v) for v in lat["shape"]], vae_sha256=lat["sha256"],
                    scaling_factor=float(lat["scaling_factor"]))


def split_rows(table: pa.Table, plan: DataPlan) -> tuple[list[np.ndarray], np.ndarray, dict[str, int]]:
    """Rows -> (condition codes per scale [(k, n_s) int64], latents (k, c, h, w) float32) of the good rows, and the
    rows skipped by reason: `missing` (null codes or latents), `length` (not n codes), `range` (a code outside the
    codebook), `nonfinite` (a latent that is inf or nan). A row is good when all its scales and latents are."""
    conds, c_bad = [], np.zeros(len(table), dtype=np.int64)
    for col, n in zip(plan.cond_columns, plan.n_conds):
        codes, bad = check_codes(table.column(col), n, plan.cond_codebook)
        conds.append(codes)
        c_bad = np.where(c_bad > 0, c_bad, bad)
    arr = table.column(plan.latents_column)
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    n = int(np.prod(plan.latents_shape))
    lat_bad = np.where(arr.is_null().to_numpy(zero_copy_only=False), 1, 0)
    lat = np.zeros((len(arr), n), dtype=np.float32)
    rows = np.flatnonzero(lat_bad == 0)
    if len(rows):
        values = pc.list_flatten(arr.filter(pa.array(lat_bad == 0)))
        if len(values) != len(rows) * n:  # a fixed-size list of another size: not this plan's latents
            raise ValueError(f"{plan.latents_column}: {len(values) // max(len(rows), 1)} values per row, expected "
                             f"{n} ({plan.latents_shape})")
        # a null value reads as NaN (to_numpy of a float array): caught as non-finite with the others
        v = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, n)
        finite = np.isfinite(v).all(1)
        lat_bad[rows[~finite]] = 4
        lat[rows] = np.where(finite[:, None], v, 0.0)
    bad = np.where(c_bad > 0, c_bad, lat_bad)  # the codes' reason first, then the latents'
    good = bad == 0
    return ([c[good] for c in conds], lat[good].reshape(-1, *plan.latents_shape),
            {r: int((bad == i + 1).sum()) for i, r in enumerate(SKIP_REASONS)})


# ----------------------------------------------------------------------------------------------------------
# The model: a SANA pipeline folder to fine-tune, or a new transformer; either must fit the data


def _read_json(path: str) -> dict:
    return json.loads(storage.read_bytes(path))


def model_spec(cfg: DiffusionTrainConfig, plan: DataPlan, problems: Problems) -> dict | None:
    """{"init": folder, "vae": folder, "flow_shift": s} or {"config": transformer config, "vae": folder, ...},
    checked against the data: the latents must come from this VAE (by content hash) and the transformer must
    take them and the condition."""
    from tarflow.models.diffusion_detok import SANA_600M, vae_folder
    from tarflow.data.shards import folder_identity

    shift = cfg.flow_shift
    if cfg.init:
        where = f"--init {cfg.init}"
        try:
            config = _read_json(storage.join(cfg.init, "transformer", "config.json"))
        except (FileNotFoundError, ValueError):
            problems.add(where, "has no transformer/config.json", "give a diffusers SANA pipeline folder "
                         "(transformer/, vae/, scheduler/), e.g. Tar-SANA-600M-512px")
            return None
        if shift is None:
            try:
                shift = float(_read_json(storage.join(cfg.init, "scheduler", "scheduler_config.json"))["flow_shift"])
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                shift = DEFAULT_FLOW_SHIFT
        vae, vae_flag = cfg.init, where
        check_null(storage.join(cfg.init, NEGATIVE_EMBEDS_FILE), plan, problems)
    else:
        if cfg.transformer_config == "sana-600m":
            config = dict(SANA_600M)
        else:
            try:
                config = _read_json(cfg.transformer_config)
            except (FileNotFoundError, ValueError) as e:
                problems.add(f"--transformer-config {cfg.transformer_config}", f"does not read as JSON ({e})",
                             "give a SanaTransformer2DModel config.json or sana-600m")
                return None
        # a new model takes its data-given sizes from the data
        c, h, _ = plan.latents_shape
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        config.update(in_channels=c, out_channels=c, sample_size=h, caption_channels=plan.cond_dim)
        vae, vae_flag = cfg.vae, f"--vae {cfg.vae}"
    try:
        folder = vae_folder(vae)
        vae_sha = folder_identity(folder)["sha256"]
    except FileNotFoundError as e:
        problems.add(vae_flag, str(e).removeprefix(f"{vae}: "))
        return None
    if vae_sha != plan.vae_sha256:
        problems.add(vae_flag, f"its VAE ({folder}, sha256 {vae_sha[:12]}) did not make the latents of --data "
                     f"(VAE sha256 {plan.vae_sha256[:12]})", "give the VAE (or a pipeline folder holding it) that "
                     "the tokenize job's --latents named, or tokenize again with this one")
    check_fits(config, plan, cfg.init or cfg.transformer_config, problems)
    return {"init": cfg.init, "config": None if cfg.init else config, "vae": folder, "flow_shift": float(shift or
            DEFAULT_FLOW_SHIFT)}


def check_null(path: str, plan: DataPlan, problems: Problems) -> None:
    """--init's negative_prompt_embeds.pth, when it has one, is the null condition: one (L, C) tensor of the
    TA-Tok's width (a worker would fail on the first dropped row otherwise)."""
    import torch

    from tarflow.models.checkpoint import CheckpointError, read_checkpoint

    if not storage.exists(path):
        return
    try:
        t = read_checkpoint(path).obj
    except CheckpointError as e:
        problems.add(path, str(e).removeprefix(f"{path}: "))
        return
    ok = isinstance(t, torch.Tensor) and (t.ndim == 2 or (t.ndim == 3 and t.shape[0] == 1))
    if not ok or t.shape[-1] != plan.cond_dim:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        problems.add(path, f"is {shape}, not the null condition (L, {plan.cond_dim}) of this TA-Tok's rec features",
                     "remove it (the null condition is then all zeros) or give the matching pipeline folder")


def check_fits(config: dict, plan: DataPlan, path: str, problems: Problems) -> None:
    c, h, w = plan.latents_shape
    wrong = []
    if config.get("in_channels") != c or (config.get("out_channels") or c) != c:
        wrong.append(f"in/out_channels {config.get('in_channels')}/{config.get('out_channels')} != {c} latent "
                     f"channels ({plan.latents_column})")
    if config.get("sample_size") != h or h != w:
        wrong.append(f"sample_size {config.get('sample_size')} != the latents' side {h} ({plan.latents_column})")
    if h % int(config.get("patch_size") or 1):
        wrong.append(f"patch_size {config.get('patch_size')} does not divide the latents' side {h}")
    if config.get("caption_channels") != plan.cond_dim:
        wrong.append(f"caption_channels {config.get('caption_channels')} != the TA-Tok's hidden size {plan.cond_dim}")
    if wrong:
        problems.add(path, f"this SANA transformer does not fit the data: {'; '.join(wrong)}",
                     "pick a matching pipeline folder or --latent-resolution, or train a new transformer")


# ----------------------------------------------------------------------------------------------------------
# The objective (no Ray): what a micro-batch costs


class FlowMatching:
    """SANA's flow-matching objective (see the module docstring): logit-normal timesteps on the shifted schedule
    of FlowMatchEulerDiscreteScheduler(shift), velocity target, MSE."""

    def __init__(self, flow_shift: float, logit_mean: float = 0.0, logit_std: float = 1.0,
                 num_train_timesteps: int = 1000):
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=flow_shift)
        self.sigmas = sched.sigmas[:num_train_timesteps].float()  # (T,) from 1 down to ~1/T, shifted
        self.timesteps = sched.timesteps.float()  # (T,) = T * sigmas
        self.n, self.logit_mean, self.logit_std = num_train_timesteps, logit_mean, logit_std

    def sample(self, batch: int, device):
        """(sigma (B,), timestep (B,)) drawn logit-normal, from the torch RNG (seeded per step by the core)."""
        import torch
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std)
        idx = (u * self.n).long().clamp(0, self.n - 1)
        return self.sigmas[idx].to(device, torch.float32), self.timesteps[idx].to(device, torch.float32)

    def loss(self, model, x0, cond, cond_mask):
        """x0 (B, c, h, w) scaled latents, cond (B, L, C), cond_mask (B, L) -> mean squared velocity error."""
        import torch
        import torch.nn.functional as F

        sigma, t = self.sample(len(x0), x0.device)
        noise = torch.randn_like(x0)
        s = sigma[:, None, None, None]
        x_t = (1.0 - s) * x0 + s * noise
        pred = model(hidden_states=x_t, encoder_hidden_states=cond, encoder_attention_mask=cond_mask,
                     timestep=t, return_dict=False)[0]
        return F.mse_loss(pred.float(), (noise - x0).float())


def assemble(parts, batch: int, width: int, device):
    """[(rows (k,) bool or index, features (k, n_i, C) or (n_i, C) for every row)] -> (B, L, C) and its mask
    (B, L), L the longest: each row holds its features, shorter ones padded with masked-out zero tokens, as
    DiffusionDetokenizer.generate pads its [uncond; cond] batch."""
    import torch

    L = max((f.shape[-2] for _, f in parts), default=1)
    x = torch.zeros(batch, L, width, device=device)
    mask = torch.zeros(batch, L, dtype=torch.long, device=device)
    for rows, f in parts:
        n = f.shape[-2]
        rows = rows.to(device) if isinstance(rows, torch.Tensor) else rows  # a CPU mask for a CUDA batch
        x[rows, :n] = f.to(device, x.dtype)
        mask[rows, :n] = 1
    return x, mask


# ----------------------------------------------------------------------------------------------------------
# The worker side: model, batch, loss (the loop is tarflow.train.core's)


def _local_folder(path: str):
    """A local copy of a (local or s3://) model folder, without a pipeline's text encoder and tokenizer."""
    from pathlib import Path

    from tarflow.models.diffusion_detok import download_folder

    return download_folder(path) if storage.is_remote(path) else Path(path.removeprefix("file://"))


def scheduler_for(shift: float):
    """SANA's sampler: DPM-Solver++ on flow sigmas, what SanaPipeline samples a de-tokenizer with."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=shift)


def write_pipeline(folder: str, transformer, vae_dir, scheduler_dir, shift: float, null, state_dict=None) -> None:
    """A diffusers SANA pipeline folder without text encoder: transformer/ (float32, the training weights: a
    resumed run continues exactly), vae/ (copied), scheduler/ (--init's, else SANA's), model_index.json,
    negative_prompt_embeds.pth (the null condition (L, C) float32)."""
    import diffusers
    import torch

    if state_dict is not None:  # FSDP: the gathered whole tensors, into a plain copy of the model
        plain = diffusers.SanaTransformer2DModel.from_config(transformer.config)
        plain.load_state_dict(state_dict)
        transformer = plain
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    shutil.copytree(vae_dir, os.path.join(folder, "vae"), dirs_exist_ok=True)
    if scheduler_dir is not None:
        shutil.copytree(scheduler_dir, os.path.join(folder, "scheduler"), dirs_exist_ok=True)
    else:
        scheduler_for(shift).save_pretrained(os.path.join(folder, "scheduler"))
    sched_cls = json.loads(open(os.path.join(folder, "scheduler", "scheduler_config.json")).read())["_class_name"]
    index = {"_class_name": "SanaPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", sched_cls], "text_encoder": [None, None], "tokenizer": [None, None],
             "transformer": ["diffusers", "SanaTransformer2DModel"], "vae": ["diffusers", "AutoencoderDC"]}
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    torch.save(null.detach().float().cpu().contiguous(), os.path.join(folder, NEGATIVE_EMBEDS_FILE))


class DiffusionTask(CodeRowsTask):
    sum_keys, total_keys = row_metric_keys(SKIP_REASONS)

    def __init__(self, cfg: DiffusionTrainConfig, config: dict, device):
        super().__init__(cfg, config, device, DataPlan(**config["plan"]))
        self.spec = config["model"]
        self.init_dir = _local_folder(self.spec["init"]) if self.spec["init"] else None
        self.vae_dir = _local_folder(self.spec["vae"])
        self.objective = FlowMatching(self.spec["flow_shift"], cfg.logit_mean, cfg.logit_std)
        self.null = None  # (L, C) float32 on the device, set by load_model

    def _null_from(self, folder) -> "torch.Tensor | None":  # noqa: F821
        from tarflow.models.checkpoint import read_checkpoint

        path = os.path.join(str(folder), NEGATIVE_EMBEDS_FILE) if folder else None
        if not path or not os.path.isfile(path):
            return None
        t = read_checkpoint(path).obj.float()
        return t[0] if t.ndim == 3 else t  # (1, L, C) -> (L, C), as DiffusionDetokenizer reads it

    def load_model(self, checkpoint_dir):
        import diffusers
        import torch

        if checkpoint_dir:  # a retry or a rerun of this run: its latest checkpoint
            model = diffusers.SanaTransformer2DModel.from_pretrained(
                checkpoint_dir, subfolder="transformer", torch_dtype=torch.float32, local_files_only=True)
        elif self.init_dir:
            model = diffusers.SanaTransformer2DModel.from_pretrained(
                str(self.init_dir), subfolder="transformer", torch_dtype=torch.float32, local_files_only=True)
        else:
            torch.manual_seed(self.cfg.seed)  # same weights on every worker
            model = diffusers.SanaTransformer2DModel.from_config(self.spec["config"])
        null = self._null_from(checkpoint_dir) if checkpoint_dir else self._null_from(self.init_dir)
        if null is None:  # no null condition shipped: the all-zero rec features (as the AR de-tokenizer's)
            null = torch.zeros(self.plan.n_conds[0], self.plan.cond_dim)
        self.null = null.to(self.device)
        return model

    def fsdp_layers(self, model):
        return list(model.transformer_blocks)

    def condition(self, codes: list[np.ndarray], p_drop: float, scale_index: int | None = None):
        """codes per scale [(B, n_s)] -> (cond (B, L, C), mask (B, L)): each row the rec features of one scale,
        drawn at random (or `scale_index`), or the null condition with probability p_drop."""
        import torch

        b = len(codes[0])
        pick = torch.randint(len(codes), (b,)) if scale_index is None else torch.full((b,), scale_index)
        drop = torch.rand(b) < p_drop
        parts = [(drop, self.null)]
        for i, c in enumerate(codes):
            rows = (pick == i) & ~drop
            if rows.any():  # frozen decoder: no grad
                parts.append((rows, self.tatok.decode(torch.from_numpy(c[rows.numpy()]).to(self.device)).float()))
        return assemble(parts, b, self.plan.cond_dim, self.device)

    def loss(self, model, table):
        import torch

        codes, latents, skipped = split_rows(table, self.plan)
        sums = self.row_sums(len(table), len(latents), skipped)
        if not len(latents):  # every row bad: a zero loss still runs backward, so the collectives match
            return self.zero_loss(model), sums
        cond, mask = self.condition(codes, self.cfg.cond_dropout)
        x0 = torch.from_numpy(latents).to(self.device) * self.plan.scaling_factor  # (B, c, h, w)
        loss = self.objective.loss(model, x0, cond, mask)
        return loss, {**sums, "loss_sum": float(loss.detach()) * len(latents)}

    def zero_loss(self, model):
        import torch

        x = torch.zeros(1, *self.plan.latents_shape, device=self.device)
        cond = torch.zeros(1, self.plan.n_conds[0], self.plan.cond_dim, device=self.device)
        return model(hidden_states=x, encoder_hidden_states=cond, timestep=torch.zeros(1, device=self.device),
                     return_dict=False)[0].sum() * 0.0

    def save_model(self, model, folder, state_dict=None):
        sched = os.path.join(str(self.init_dir), "scheduler") if self.init_dir else None
        if self.cfg.flow_shift is not None or not (sched and os.path.isdir(sched)):
            sched = None  # an explicit shift is the output's too; no scheduler in --init: SANA's
        write_pipeline(folder, model, self.vae_dir, sched, self.spec["flow_shift"], self.null, state_dict)

    def throughput(self, rows_per_s):
        return {"images_per_s": rows_per_s}


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    worker_loop(DiffusionTask, DiffusionTrainConfig, config)


# ----------------------------------------------------------------------------------------------------------
# Driver


def preflight(cfg: DiffusionTrainConfig) -> dict:
    """Every check that needs no Ray, on the driver, all problems at once (UsageError, one line each): the
    settings, --tatok, --data (one TA-Tok, the scales, latents of one VAE), the model (--init or a new
    transformer, its VAE = the latents' VAE, its sizes = the data's) and a rerun's data against its run's.
    Returns the plan the workers get."""
    problems = Problems()
    cfg.check(problems)
    problems.check(cfg.batch_size >= 1, "--batch-size", f"is {cfg.batch_size}", "give a whole number >= 1")
    problems.check(0.0 <= cfg.cond_dropout < 1.0, "--cond-dropout", f"is {cfg.cond_dropout}",
                   "give a probability in [0, 1)")
    problems.check(cfg.flow_shift is None or cfg.flow_shift > 0, "--flow-shift", f"is {cfg.flow_shift}",
                   "give a positive shift (SANA: 3.0)")
    if bool(cfg.init) == bool(cfg.transformer_config):
        problems.add("model", "give exactly one of --init (a SANA pipeline folder to fine-tune) and "
                     "--transformer-config (a new transformer)", "see --help")
    if cfg.transformer_config and not cfg.vae:
        problems.add("--vae", "missing: a new transformer needs the VAE that made the latents",
                     "give the AutoencoderDC folder (or SANA pipeline folder) the tokenize job's --latents named")
    if cfg.init and not storage.exists(cfg.init):
        problems.add(f"--init {cfg.init}", "not found", "give a diffusers SANA pipeline folder (local or s3://)")
    plan = data_plan_or_raise(cfg, check_tatok(cfg.tatok, problems), problems, plan_data)
    spec = model_spec(cfg, plan, problems)
    out = finish_preflight(cfg, problems, plan.facts(), plan=asdict(plan), model=spec)
    log.info("%d code shards: %s (%s tokens) -> %s %s (VAE %s), flow shift %g", len(plan.files), plan.cond_columns,
             plan.n_conds, plan.latents_column, plan.latents_shape, plan.vae_sha256[:12], spec["flow_shift"])
    return out


def run_train(cfg: DiffusionTrainConfig, plan: dict | None = None, loop=None,
              loop_extra: dict | None = None) -> TrainSummary:
    """Train with Ray Train (after `preflight`, run here when `plan` is None); the final pipeline folder is
    copied to cfg.output."""
    import ray.data

    plan = plan or preflight(cfg)
    data = DataPlan(**plan["plan"])
    # Only the codes and latents travel (pushed into the read); preserve_order (the core's) fixes each worker's rows
    ds = ray.data.read_parquet(data.files).select_columns([*data.cond_columns, data.latents_column])
    summary = fit(cfg, loop or train_loop, {**plan, **(loop_extra or {})}, ds)
    if cfg.output:
        storage.copy_folder(summary.checkpoint, cfg.output, skip=TRAINER_FILES)  # streamed, file by file
        summary.output = cfg.output
    return summary
