"""Training the AR de-tokenizer on Ray Train: stored TA-Tok codes -> rec features -> pixel-VQ codes.

    code shards (tokenize --vq)  --ray.data.read_parquet: [tatok_s{scale}, vq16_{res}] only
      --> Ray Train workers (TorchTrainer, DDP / FSDP), per micro-batch of rows:
          rows checked: missing codes, wrong lengths, codes out of range -> skipped and counted, never trained on
          frozen TA-Tok decoder: codes -> condition (B, n_cond, C)                       (no grad)
          condition dropout: a dropped row gets the all-zero condition, the null condition CFG samples with
          teacher forcing: logits = AR(vq[:, :-1], cond); cross-entropy over every VQ token (row j -> token j)
          the step loop, DDP / FSDP, schedule, metrics and checkpoints: tarflow.train.core
      --> checkpoints in Ray Train's storage: ar_dtok.pth (reference format) + the core's trainer state
      --> the final ar_dtok.pth copied to `output` (local or s3://)

This module holds only what is the AR de-tokenizer's: the data plan (which columns, checked on the driver), the
model (new or fine-tuned), the batch and the loss. Resume, retention and step flags are the core's (a resumed
run reaches the weights of an uninterrupted one: tested with 2 workers on CPU, for the same workers and batch
size).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from tarflow.data import schema, storage
from tarflow.preflight import Problems
from tarflow.train.code_data import CODE_SKIP_REASONS, CodeRowsTask, TATokHeader, check_codes, check_tatok
from tarflow.train.code_data import Targets, data_plan_or_raise, plan_code_shards, row_metric_keys
from tarflow.train.common import OptimConfig
from tarflow.train.core import TrainConfig, worker_loop
from tarflow.train.run import TrainSummary, finish_preflight, fit

log = logging.getLogger("tarflow.train.ar_detok")

MODEL_FILE = "ar_dtok.pth"  # the reference format, loadable by ARDetokenizer.from_checkpoint
SKIP_REASONS = CODE_SKIP_REASONS


def default_optim() -> OptimConfig:
    # LlamaGen's AR recipe (the family Tar's de-tokenizer comes from): lr 1e-4, wd 0.05, betas (0.9, 0.95)
    return OptimConfig(lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))


@dataclass(kw_only=True)
class ARTrainConfig(TrainConfig):
    data: list[str]  # tokenize outputs made with --vq (finished shards), folders of code shards, or shard files
    tatok: str | None = None  # the TA-Tok that made the codes: its decoder (frozen) makes the condition
    scale: int = 1  # which tatok_s{scale} column conditions
    vq_column: str | None = None  # default: the shards' VQ column
    init: str | None = None  # an AR checkpoint to fine-tune; else a new model:
    preset: str | None = None  # a size preset (llama-abs-S, ..., -LP, ...) or n_layer / n_head / dim
    n_layer: int | None = None
    n_head: int | None = None
    dim: int | None = None
    output: str | None = None  # where the final model goes (.pth, local or s3://)
    batch_size: int = 32  # rows per worker per micro-batch (skipped rows make it smaller)
    cond_dropout: float | None = None  # default: the model's class_dropout_prob (reference 0.1)
    # the core's settings, with this trainer's defaults
    name: str = "ar-detok"
    storage_path: str = "out/train-ar-detok"
    optim: OptimConfig = field(default_factory=default_optim)
    shuffle_buffer: int = 1024
    checkpoint_every: int = 500
    max_failures: int = 3


# ----------------------------------------------------------------------------------------------------------
# Data: which shards, which columns, checked before anything starts


@dataclass
class DataPlan:
    files: list[str]
    cond_column: str
    n_cond: int  # TA-Tok tokens per image at the scale
    cond_codebook: int
    cond_dim: int  # TA-Tok hidden size (rec features)
    tatok_sha256: str
    vq_column: str
    n_vq: int
    vq_codebook: int
    vq_sha256: str

    def facts(self) -> dict:
        """What a checkpoint was trained on; a resumed run must match."""
        return asdict(self)


VQ_TARGETS = Targets(key="vq", model="VQ", missing="no VQ codes (no vq16_* column)",
                     tokenize_flags="--vq PATH --vq-resolution RES", column_flag="--vq-column")


def plan_data(cfg: ARTrainConfig, tatok: TATokHeader, problems: Problems | None = None) -> DataPlan | None:
    """Every code shard must come from this TA-Tok and hold the scale and the VQ codes of one VQ (see
    plan_code_shards: problems go to `problems`, or are raised at the end without it)."""
    files, vq = plan_code_shards(cfg.data, tatok, f"--tatok {cfg.tatok}", [cfg.scale], "--scale", VQ_TARGETS,
                                 cfg.vq_column, problems)
    if vq is None:
        return None
    return DataPlan(files=files, cond_column=schema.code_column(cfg.scale), n_cond=tatok.num_tokens(cfg.scale),
                    cond_codebook=tatok.codebook_size, cond_dim=tatok.hidden_size,
                    tatok_sha256=tatok.sha256, vq_column=vq["column"], n_vq=int(vq["num_tokens"]),
                    vq_codebook=int(vq["codebook_size"]), vq_sha256=vq["sha256"])


def split_rows(table: pa.Table, plan: DataPlan) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Rows -> (condition codes (k, n_cond), VQ codes (k, n_vq)) int64 of the good rows, and the rows skipped by
    reason: `missing` (null list or null code), `length` (not n codes), `range` (a code outside the codebook)."""
    cond, c_bad = check_codes(table.column(plan.cond_column), plan.n_cond, plan.cond_codebook)
    vq, v_bad = check_codes(table.column(plan.vq_column), plan.n_vq, plan.vq_codebook)
    bad = np.where((c_bad > 0) & (v_bad > 0), np.minimum(c_bad, v_bad), np.maximum(c_bad, v_bad))
    good = bad == 0
    return cond[good], vq[good], {r: int((bad == i + 1).sum()) for i, r in enumerate(SKIP_REASONS)}


# ----------------------------------------------------------------------------------------------------------
# The model: a new one from ARArgs, or a checkpoint to fine-tune; either must fit the data


def model_spec(cfg: ARTrainConfig, plan: DataPlan) -> dict:
    """{"init": path} or {"args": ARArgs fields, "name": ...}, checked against the data (fails on the driver)."""
    from tarflow.models.ar_detok import PRESETS, ARArgs
    from tarflow.models.checkpoint import read_checkpoint, unwrap_model_entry

    problems = Problems()
    if cfg.init:
        entry = unwrap_model_entry(read_checkpoint(cfg.init), ("args", "sd"))
        check_fits(ARArgs.from_ckpt(str(entry.get("name", "")), entry["args"], cfg.init), plan, cfg.init, problems)
        problems.raise_if_any()
        return {"init": cfg.init}
    sizes = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "dim") if getattr(cfg, k) is not None}
    if cfg.preset:
        if cfg.preset not in PRESETS:
            problems.add(f"--preset {cfg.preset}", "unknown size preset", f"choose one of {', '.join(PRESETS)}")
            problems.raise_if_any()
        sizes = {**dict(zip(("n_layer", "n_head", "dim"), PRESETS[cfg.preset])), **sizes}
    if len(sizes) != 3:
        problems.add("model", "a new model needs --preset or all of --n-layer/--n-head/--dim",
                     "or give --init CHECKPOINT to fine-tune")
        problems.raise_if_any()
    args = ARArgs.from_ckpt("", {**sizes, "model_type": "clip_cond", "cond_dim": plan.cond_dim,
                                 "vocab_size": plan.vq_codebook, "cls_token_num": plan.n_cond,
                                 "max_seq_len": plan.n_vq})
    name = cfg.preset if cfg.preset and PRESETS[cfg.preset] == (args.n_layer, args.n_head, args.dim) else None
    return {"args": asdict(args), "name": name or "llama-abs-custom"}


def check_fits(args, plan: DataPlan, path: str, problems: Problems) -> None:
    wrong = []
    if args.cond_dim != plan.cond_dim:
        wrong.append(f"cond_dim {args.cond_dim} != the TA-Tok's hidden size {plan.cond_dim}")
    if args.vocab_size < plan.vq_codebook:
        wrong.append(f"vocab_size {args.vocab_size} < the VQ codebook {plan.vq_codebook}")
    if args.max_seq_len != plan.n_vq:
        wrong.append(f"max_seq_len {args.max_seq_len} != {plan.n_vq} VQ tokens per image ({plan.vq_column})")
    if plan.n_cond > args.cls_token_num:
        wrong.append(f"{plan.n_cond} condition tokens ({plan.cond_column}) > cls_token_num {args.cls_token_num}")
    if wrong:
        problems.add(f"--init {path}", f"this AR de-tokenizer does not fit the data: {'; '.join(wrong)}",
                     "pick a matching checkpoint, --scale or VQ resolution, or train a new model")


def init_weights(model, seed: int) -> None:
    """The reference's init (LlamaGen): Linear / Embedding ~ N(0, initializer_range), biases 0, output layer 0
    (every logit starts equal: loss log(vocab)), learned positions N(0, 0.02)."""
    import torch
    from torch import nn

    std = model.args.initializer_range
    g = torch.Generator().manual_seed(seed)  # same weights on every worker, whatever the global RNG did
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        model.output.weight.zero_()
        if isinstance(model.abs_pe, nn.Parameter):
            model.abs_pe.copy_(torch.randn(model.abs_pe.shape, generator=g) * 0.02)


def reference_checkpoint(model) -> dict:
    """model.checkpoint_dict(), loadable by the reference too: its size presets pass n_layer/n_head/dim
    themselves (a second value is a TypeError there), so a preset-named checkpoint leaves them out of args."""
    from tarflow.models.ar_detok import PRESETS

    ckpt = model.checkpoint_dict()
    m = ckpt["model"]
    if PRESETS.get(m["name"]) == (m["args"]["n_layer"], m["args"]["n_head"], m["args"]["dim"]):
        m["args"] = {k: v for k, v in m["args"].items() if k not in ("n_layer", "n_head", "dim")}
    return ckpt


# ----------------------------------------------------------------------------------------------------------
# The worker side: model, batch, loss (the loop is tarflow.train.core's)


def teacher_forced_loss(model, tatok, cond_codes: np.ndarray, vq_codes: np.ndarray, p_drop: float, device):
    """Mean cross-entropy over every VQ token, conditioned on the TA-Tok rec features of the codes; each row's
    condition is replaced by the null (all-zero) condition with probability p_drop, as the reference trains."""
    import torch
    import torch.nn.functional as F

    cond = tatok.decode(torch.from_numpy(cond_codes).to(device)).float()  # frozen: decode runs without grad
    drop = torch.rand(len(cond), device=device) < p_drop
    cond = cond.masked_fill(drop[:, None, None], 0.0)
    tgt = torch.from_numpy(vq_codes).to(device)
    logits = model(tgt[:, :-1], cond)  # (B, n_vq, vocab): row j predicts token j
    return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())


class ARTask(CodeRowsTask):
    sum_keys, total_keys = row_metric_keys(SKIP_REASONS)

    def __init__(self, cfg: ARTrainConfig, config: dict, device):
        super().__init__(cfg, config, device, DataPlan(**config["plan"]))

    def load_model(self, checkpoint_dir):
        from tarflow.models.ar_detok import ARArgs, ARDetokenizer

        spec = self.config["model"]
        if checkpoint_dir:  # a retry or a rerun of this run: its latest checkpoint
            model = ARDetokenizer.from_checkpoint(os.path.join(checkpoint_dir, MODEL_FILE))
        elif "init" in spec:
            model = ARDetokenizer.from_checkpoint(spec["init"])
        else:
            model = ARDetokenizer(ARArgs(**spec["args"]))
            model.name = spec["name"]
            init_weights(model, self.cfg.seed)
        self.p_drop = model.args.class_dropout_prob if self.cfg.cond_dropout is None else self.cfg.cond_dropout
        return model

    def loss(self, model, table):
        cond_codes, vq_codes, skipped = split_rows(table, self.plan)
        sums = self.row_sums(len(table), len(vq_codes), skipped)
        if not len(vq_codes):  # every row bad: a zero loss still runs backward, so the collectives match
            return self.zero_loss(model), sums
        loss = teacher_forced_loss(model, self.tatok, cond_codes, vq_codes, self.p_drop, self.device)
        return loss, {**sums, "loss_sum": float(loss.detach()) * len(vq_codes)}

    def zero_loss(self, model):
        import torch

        tgt = torch.zeros(1, self.plan.n_vq, dtype=torch.long, device=self.device)
        cond = torch.zeros(1, self.plan.n_cond, self.plan.cond_dim, device=self.device)
        return model(tgt[:, :-1], cond).sum() * 0.0

    def save_model(self, model, folder, state_dict=None):
        import torch

        ckpt = reference_checkpoint(model)
        if state_dict is not None:  # FSDP: the gathered whole tensors
            ckpt["model"]["sd"] = state_dict
        torch.save(ckpt, os.path.join(folder, MODEL_FILE))

    def throughput(self, rows_per_s):
        return {"tokens_per_s": rows_per_s * self.plan.n_vq}


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    worker_loop(ARTask, ARTrainConfig, config)


# ----------------------------------------------------------------------------------------------------------
# Driver


def preflight(cfg: ARTrainConfig) -> dict:
    """Every check that needs no Ray, on the driver, all problems at once (UsageError, one line each): the
    settings, --tatok, --data (one TA-Tok, the scale, VQ codes of one VQ), --init or the new model's size
    against the data, and a rerun's data against its run's. Returns the plan the workers get."""
    from tarflow.models.checkpoint import CheckpointError

    problems = Problems()
    cfg.check(problems)
    problems.check(cfg.batch_size >= 1, "--batch-size", f"is {cfg.batch_size}", "give a whole number >= 1")
    tatok = check_tatok(cfg.tatok, problems)
    if cfg.init and not storage.exists(cfg.init):
        problems.add(f"--init {cfg.init}", "not found", "give an AR de-tokenizer checkpoint (ar_dtok_*.pth)")
    plan = data_plan_or_raise(cfg, tatok, problems, plan_data)
    del tatok
    try:
        spec = model_spec(cfg, plan)
    except CheckpointError as e:
        problems.add(f"--init {cfg.init}", str(e).removeprefix(f"{cfg.init}: "))
        spec = None
    except ValueError as e:  # UsageError included
        problems.lines += getattr(e, "lines", [str(e)])
        spec = None
    out = finish_preflight(cfg, problems, plan.facts(), plan=asdict(plan), model=spec)
    log.info("%d code shards: %s (%d tokens) -> %s (%d tokens, codebook %d)", len(plan.files), plan.cond_column,
             plan.n_cond, plan.vq_column, plan.n_vq, plan.vq_codebook)
    return out


def run_train(cfg: ARTrainConfig, plan: dict | None = None, loop=None, loop_extra: dict | None = None) -> TrainSummary:
    """Train with Ray Train (after `preflight`, run here when `plan` is None). `loop` replaces the per-worker loop
    (e.g. one wrapping `train_loop`), with `loop_extra` added to its config."""
    import ray.data

    plan = plan or preflight(cfg)
    data = DataPlan(**plan["plan"])
    # Only the two columns travel. preserve_order (the core's) makes Ray Data's split deterministic (blocks in file
    # order, each to the worker with the fewest rows so far), so every run hands each worker the same rows.
    ds = ray.data.read_parquet(data.files).select_columns([data.cond_column, data.vq_column])  # pushed into the read
    summary = fit(cfg, loop or train_loop, {**plan, **(loop_extra or {})}, ds)
    if cfg.output:
        storage.copy_file(storage.join(summary.checkpoint, MODEL_FILE), cfg.output)  # streamed
        summary.output = cfg.output
    return summary
