"""Training TA-Tok itself on Ray Train: a text-aligned image tokenizer from a SigLIP teacher and an LLM's vocabulary.

    img2dataset shards (local or s3://)
      --the tokenize job's own stages on CPU workers: ShardReader (raw bytes) --ImageDecoder (RGB, PIL bicubic
        to the teacher's input size, uint8): tarflow.pipelines.image_stages.read_and_decode
      --> Ray Train workers (TorchTrainer, DDP / FSDP), per micro-batch of `batch_size` rows:
          failed images (undecodable, too large) skipped and counted; shards that could not be read counted
          a pool scale s drawn per micro-batch from --pool-scales (seeded per step and worker by the core)
          frozen teacher: hidden_states[select_layer_id], average-pooled by s       -> target (B, n, C)  no grad
          student TA-Tok forward: encoder -> pool s -> task layer -> in_linear -> SimVQ (straight-through)
                                  -> out_linear -> decoder -> decode_task_layer   -> rec (B, n, C)
          loss = rec distance(rec, target) + 0.25 x commitment + 1.0 x codebook     (the reference's weights)
      --> checkpoints in Ray Train's storage: ta_tok.pth (reference format) + its teacher config folder + the
          core's trainer state; the final ones copied beside `output`

Metrics: the loss and its parts, the reconstruction loss per scale, codebook usage over the last
--usage-window steps of every worker (codes used, perplexity, dead codes), images/s, and the run's totals of
images that failed to decode (skipped_failed) and shards that failed to read (failed_shards; each logged
with its reason), also in the summary. Optional dead-code
restarts (--restart-dead-every). The loop, resume, retention and schedule are tarflow.train.core's.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from tarflow.data import storage
from tarflow.preflight import Problems
from tarflow.train.common import OptimConfig
from tarflow.train.core import Task, TrainConfig, worker_loop
from tarflow.train.run import TrainSummary, finish_preflight, fit

log = logging.getLogger("tarflow.train.tatok")

MODEL_FILE = "ta_tok.pth"  # the reference format, loadable by TATok.from_checkpoint (and the reference)
ROWS_FILE = "codebook_tokens.json"  # which LLM tokens the codebook rows came from (a record; not read back)


def default_optim() -> OptimConfig:
    # a ViT fine-tune from a pretrained encoder: a modest lr, no weight decay on a distillation objective
    return OptimConfig(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.99), warmup_ratio=0.01)


@dataclass(kw_only=True)
class TATokTrainConfig(TrainConfig):
    data: list[str]  # img2dataset shards: folders, files or globs (local or s3://)
    input_format: str = "auto"
    teacher: str | None = None  # an HF SigLIP folder (model_type siglip): teacher and the student's start
    init: str | None = None  # or a ta_tok.pth to continue from: the student, and its encoder as the teacher
    llm: str | None = None  # a Qwen2 folder: codebook rows from its input embeddings (with --teacher)
    codebook_size: int = 65536  # K
    codebook_rows: str = "first"  # which K tokens: first | frequent (of codebook_text)
    codebook_text: str | None = None  # a text file for codebook_rows=frequent
    teacher_name: str | None = None  # the `teacher` arg written (default: the folder's name, or the hub id)
    decoder_depth: int = 3
    select_layer_id: int = -2
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3])
    rec_distance: str = "both"  # cosine | mse | both (see tarflow.models.tatok_train.rec_distances)
    sample_codes: bool = False  # train on codes sampled from softmax(cos / T) (the reference's train mode)
    usage_window: int = 100  # steps over which codebook usage is counted
    restart_dead_every: int = 0  # steps between dead-code restarts; 0 = off
    batch_size: int = 32  # images per worker per micro-batch (failed images make it smaller)
    output: str | None = None  # where the final ta_tok.pth goes (local or s3://); its teacher folder beside it
    # the core's settings, with this trainer's defaults
    name: str = "tatok"
    storage_path: str = "out/train-tatok"
    optim: OptimConfig = field(default_factory=default_optim)
    shuffle_buffer: int = 1024
    checkpoint_every: int = 1000
    max_failures: int = 3


# ----------------------------------------------------------------------------------------------------------
# Driver: everything checked before Ray starts


@dataclass
class ModelPlan:
    """What every worker builds (or, on a rerun, what its checkpoint must be)."""

    input_size: int
    grid: int
    hidden: int  # C: the encoder's width, the rec features'
    codebook_size: int  # K
    dim: int  # D: the LLM's hidden size (the bottleneck)
    teacher_name: str  # the `teacher` arg
    teacher_config: dict | None  # its config.json, written beside every ta_tok.pth (None: a built-in hub id)
    source: dict  # {"teacher": folder, "llm": folder, "rows": [ids]} or {"init": path}
    weights: dict  # {"commitment": w, "codebook": w}
    temperature: float | None  # code sampling temperature (None: argmax)


def _teacher_name(folder: str, enc) -> str:
    from tarflow.models.tatok import BUILTIN_TEACHERS

    for hub_id, builtin in BUILTIN_TEACHERS.items():
        if builtin == enc:  # the real teacher: the reference resolves the hub id itself
            return hub_id
    return os.path.basename(folder.rstrip("/")) or "teacher"


def plan_model(cfg: TATokTrainConfig, problems: Problems) -> ModelPlan | None:
    from tarflow.models import tatok_train as tt
    from tarflow.models.checkpoint import CheckpointError
    from tarflow.models.tatok import BUILTIN_TEACHERS, resolve_teacher, tatok_header, vision_config_json

    if bool(cfg.teacher) == bool(cfg.init):
        problems.add("--teacher/--init", "give exactly one",
                     "--teacher SIGLIP_FOLDER (with --llm) for a new TA-Tok, or --init ta_tok.pth to continue one")
        return None
    if cfg.init:
        if cfg.llm:
            problems.add(f"--llm {cfg.llm}", "not used with --init (the checkpoint has its codebook)", "drop --llm")
        if not storage.exists(cfg.init):
            problems.add(f"--init {cfg.init}", "not found", "give a TA-Tok checkpoint (ta_tok.pth)")
            return None
        try:
            args, grid = tatok_header(cfg.init)
            enc = resolve_teacher(args.teacher, cfg.init)
        except (CheckpointError, ValueError) as e:
            problems.add(f"--init {cfg.init}", str(e).removeprefix(f"{cfg.init}: "))
            return None
        reg = args.raw["bottleneck"]["args"]["regularizer"]["args"]
        return ModelPlan(input_size=args.input_size, grid=grid, hidden=enc.hidden_size,
                         codebook_size=args.codebook_size, dim=args.bottleneck_dim, teacher_name=args.teacher,
                         teacher_config=None if args.teacher in BUILTIN_TEACHERS else vision_config_json(enc),
                         source={"init": cfg.init},
                         weights={"commitment": float(reg.get("commitment_loss_weight", 0.25)),
                                  "codebook": float(reg.get("codebook_loss_weight", 1.0))},
                         temperature=float(reg.get("stochastic_temperature", 0.03)) if cfg.sample_codes else None)
    ok, enc = True, None
    try:
        teacher_cfg = tt.read_config(cfg.teacher)
        enc = tt.VisionConfig.from_json(teacher_cfg)
        if teacher_cfg.get("model_type") not in ("siglip", "siglip_vision_model"):
            raise tt.TrainInitError(f"{cfg.teacher}: model_type is not siglip; give a SiglipModel folder "
                                    "(e.g. google/siglip2-so400m-patch14-384)")
        tt.find_tensors(cfg.teacher, lambda k: False)  # the weights' files exist and their headers read
    except (tt.TrainInitError, OSError, ValueError) as e:
        problems.add(f"--teacher {cfg.teacher}", str(e).removeprefix(f"{cfg.teacher}: "))
        ok = False
    if ok and enc.hidden_size % 12:
        # the decoder keeps Siglip2VisionConfig's 12 heads (the reference's), so the width must split into 12
        problems.add(f"--teacher {cfg.teacher}", f"hidden_size {enc.hidden_size} is not a multiple of 12 (the "
                     "decoder's 12 attention heads, as in the reference)", "use a SigLIP with such a width")
        ok = False
    if ok:
        n_layers = cfg.select_layer_id if cfg.select_layer_id >= 0 else enc.num_hidden_layers + 1 + cfg.select_layer_id
        if not 0 <= n_layers <= enc.num_hidden_layers:
            problems.add("--select-layer-id", f"{cfg.select_layer_id} is out of range for "
                         f"{enc.num_hidden_layers} encoder layers", "use -2 (the reference's) or a layer index")
            ok = False
    rows = dim = None
    if not cfg.llm:
        problems.add("--llm", "missing", "give the Qwen2 folder whose input embeddings become the codebook")
    else:
        try:
            dim = tt.llm_hidden_size(cfg.llm)
            tok = tt.load_tokenizer(cfg.llm)
            found = tt.find_tensors(cfg.llm, lambda k: k.endswith("embed_tokens.weight"))
            if len(found) != 1:
                raise tt.TrainInitError(f"{cfg.llm}: no single *embed_tokens.weight tensor; give a Qwen2 folder")
            (_, entry, _), = found.values()
            text = None
            if cfg.codebook_rows == "frequent":
                if not cfg.codebook_text or not storage.exists(cfg.codebook_text):
                    raise tt.TrainInitError(f"--codebook-text {cfg.codebook_text}: not found; --codebook-rows frequent "
                                            "counts tokens in a text file")
                text = storage.read_bytes(cfg.codebook_text).decode("utf-8", errors="replace")
            rows = tt.select_rows(tok, int(entry["shape"][0]), cfg.codebook_size, cfg.codebook_rows, text)
        except tt.TrainInitError as e:
            msg = str(e)
            what = "--llm " + cfg.llm if msg.startswith(cfg.llm) else "--codebook-size" if "lower" in msg else \
                "--codebook-text"
            problems.add(what, msg.removeprefix(f"{cfg.llm}: ").removeprefix(f"--codebook-text {cfg.codebook_text}: "))
        except (OSError, ValueError) as e:
            problems.add(f"--llm {cfg.llm}", f"no tokenizer or weights to read ({type(e).__name__}: {e})",
                         "give a transformers Qwen2 folder (config.json, tokenizer, model.safetensors)")
    if not ok or rows is None:
        return None
    name = cfg.teacher_name or _teacher_name(cfg.teacher, enc)
    return ModelPlan(input_size=enc.image_size, grid=enc.image_size // enc.patch_size, hidden=enc.hidden_size,
                     codebook_size=len(rows), dim=dim, teacher_name=name,
                     teacher_config=None if name in BUILTIN_TEACHERS else vision_config_json(enc),
                     source={"teacher": cfg.teacher, "llm": cfg.llm, "rows": rows},
                     weights={"commitment": 0.25, "codebook": 1.0},
                     temperature=0.03 if cfg.sample_codes else None)


def preflight(cfg: TATokTrainConfig) -> dict:
    """Every check that needs no Ray, on the driver, all problems at once (UsageError, one line each): the
    settings, --data (img2dataset shards), the teacher or --init, the LLM and its rows, and a rerun's data
    against its run's. Returns the plan the workers get."""
    from tarflow.data.img2dataset import InputError, resolve_inputs
    from tarflow.models.tatok_train import REC_DISTANCES

    problems = Problems()
    cfg.check(problems)
    problems.check(cfg.batch_size >= 1, "--batch-size", f"is {cfg.batch_size}", "give a whole number >= 1")
    problems.check(cfg.usage_window >= 1, "--usage-window", f"is {cfg.usage_window}", "give a whole number >= 1")
    problems.check(cfg.restart_dead_every >= 0, "--restart-dead-every", f"is {cfg.restart_dead_every}",
                   "give 0 (off) or a number of steps")
    problems.check(not (cfg.restart_dead_every and cfg.strategy == "fsdp"), "--restart-dead-every",
                   "restarts rewrite codebook rows in place, which a sharded (FSDP) codebook does not allow",
                   "use --strategy ddp with restarts")
    problems.check(cfg.rec_distance in REC_DISTANCES, "--rec-distance", f"unknown {cfg.rec_distance!r}",
                   f"choose one of {', '.join(REC_DISTANCES)}")
    shards = []
    try:
        shards = resolve_inputs(cfg.data, cfg.input_format)
    except InputError as e:
        problems.add("--data " + " ".join(cfg.data), str(e), "give img2dataset output (folders of .tar shards)")
    except FileNotFoundError as e:
        problems.add("--data " + " ".join(cfg.data), f"not found ({e})", "give img2dataset output")
    model = plan_model(cfg, problems)
    if model is None and not problems:
        problems.add("--teacher", "no model could be planned", "check --teacher/--init and --llm")
    if model:
        bad = [s for s in cfg.pool_scales if not 1 <= s <= model.grid]
        problems.check(not bad and bool(cfg.pool_scales), "--pool-scales", f"{bad or 'none'} outside 1..{model.grid} "
                       f"(the teacher's {model.grid}x{model.grid} grid)", "give scales such as 1,2,3")
    problems.raise_if_any()
    facts = {"files": [s.path for s in shards], "sizes": [s.size for s in shards],
             "model": {k: v for k, v in asdict(model).items() if k != "source"},
             "source": {k: v for k, v in model.source.items() if k != "rows"},
             "rows_sha": _rows_digest(model.source.get("rows"))}
    out = finish_preflight(cfg, problems, facts, shards=[asdict(s) for s in shards], model=asdict(model))
    log.info("%d shards; TA-Tok %dpx, K=%d, D=%d, C=%d, scales %s", len(shards), model.input_size,
             model.codebook_size, model.dim, model.hidden, cfg.pool_scales)
    return out


def _rows_digest(rows) -> str | None:
    import hashlib

    return hashlib.sha256(json.dumps(rows).encode()).hexdigest() if rows else None


# ----------------------------------------------------------------------------------------------------------
# The worker side


def training_rows(batch):
    """Decoded rows -> one row per sample (kind, ok flag, uint8 pixels), and a row per shard that could not be
    read (kind "failed", its reason in end_info) for the workers to count; the shards' "end" rows dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = pc.is_in(batch.column("kind"), value_set=pa.array(["sample", "failed"]))
    return batch.filter(keep).select(["kind", "ok", "pixels", "end_info"])


class TATokTask(Task):
    sum_keys = ("loss_sum", "images", "rows", "cos_sum", "mse_sum", "commitment_sum", "codebook_sum",
                "skipped_failed", "failed_shards", "codes_restarted")  # + rec_s{s}_sum, rec_s{s}_n per pool scale
    # run totals, across resumes: images that failed to decode and shards that failed to read are counted
    # each time an epoch meets them
    total_keys = ("skipped_failed", "failed_shards", "codes_restarted")
    drop_last = True

    def __init__(self, cfg: TATokTrainConfig, config: dict, device):
        import torch

        from tarflow.models.tatok import ScaleLayer
        from tarflow.models.tatok_train import UsageWindow

        super().__init__(cfg, config, device)
        self.read_rows = cfg.batch_size
        self.plan = ModelPlan(**config["model"])
        self.scales = [int(s) for s in cfg.pool_scales]
        self.sum_keys = TATokTask.sum_keys + tuple(f"rec_s{s}_{k}" for s in sorted(set(self.scales))
                                                   for k in ("sum", "n"))
        self.scale_layer = ScaleLayer().to(device)
        self.window = UsageWindow(self.plan.codebook_size, cfg.usage_window)
        self.hist = torch.zeros(self.plan.codebook_size, dtype=torch.float64, device=device)
        self.last_z = None  # the last batch's quantiser inputs, the restart targets
        self.steps_done = 0
        self.restarted = 0  # codes restarted at this step
        self.usage_now = self.window.usage()

    def load_model(self, checkpoint_dir):
        from tarflow.models import tatok_train as tt
        from tarflow.models.tatok import TATok

        src = self.plan.source
        if checkpoint_dir or "init" in src:  # a retry or rerun of this run, or a TA-Tok to continue
            model = TATok.from_checkpoint(os.path.join(checkpoint_dir, MODEL_FILE) if checkpoint_dir else src["init"],
                                          keep_unused=True)
            if "init" in src:  # the teacher is the continued checkpoint's encoder, never this run's student
                self.teacher = tt.frozen_teacher(TATok.from_checkpoint(src["init"], keep_unused=True).encoder,
                                                 model.n_encoder_layers)
            else:
                _, sd = tt.load_siglip_folder(src["teacher"])  # the teacher, not the checkpoint's student
                self.teacher = tt.frozen_teacher(model.encoder, model.n_encoder_layers)
                self.teacher.load_state_dict({k: v for k, v in sd.items() if k in self.teacher.state_dict()})
        else:
            enc, sd = tt.load_siglip_folder(src["teacher"])
            rows = tt.embedding_rows(src["llm"], src["rows"])
            cfg = self.cfg
            model = tt.new_tatok(enc, sd, rows, teacher=self.plan.teacher_name, decoder_depth=cfg.decoder_depth,
                                 select_layer_id=cfg.select_layer_id)
            self.teacher = tt.frozen_teacher(model.encoder, model.n_encoder_layers)
        model.freeze_for_training()
        self.teacher = self.teacher.to(self.device)
        self.model = model  # the module DDP wraps (same object): restarts edit its codebook in place
        self.n_layers = model.n_encoder_layers
        return model

    def fsdp_layers(self, model):
        return [*model.encoder.encoder.layers[: model.n_encoder_layers], *model.decoder.vision_model.encoder.layers]

    def batches(self, rows, epoch):
        for pos, table in rows:
            yield table, pos + len(table)

    def _pixels(self, table):
        import torch

        from tarflow.models.tatok import pixels_from_uint8

        ok = table.column("ok").to_numpy(zero_copy_only=False).astype(bool)
        sample = np.asarray(table.column("kind").to_pylist()) == "sample"
        pix = table.column("pixels").to_pylist()
        S = self.plan.input_size
        arr = np.stack([np.frombuffer(pix[i], dtype=np.uint8).reshape(S, S, 3) for i in np.flatnonzero(ok)]) \
            if ok.any() else np.zeros((0, S, S, 3), np.uint8)
        for info in (table.filter(pa.array(~sample)).column("end_info").to_pylist() if not sample.all() else []):
            log.warning("a shard could not be read; its images are left out of this epoch: %s",
                        json.loads(info).get("detail", info) if info else "no reason given")
        return pixels_from_uint8(torch.from_numpy(arr).to(self.device)), int((sample & ~ok).sum()), \
            int((~sample).sum())

    def targets(self, x, scale: int):
        """The teacher's features at the scale's pooled grid: (B, (g//s)^2, C), no grad."""
        import torch

        from tarflow.models.tatok import TATok

        with torch.no_grad():
            feats = self.teacher(self.scale_layer(x).to(next(self.teacher.parameters()).dtype), self.n_layers)
            return TATok.pool(feats, scale)

    def loss(self, model, table):
        import torch

        from tarflow.models.tatok_train import rec_distances

        x, failed, failed_shards = self._pixels(table)
        sums = {"rows": len(table) - failed_shards, "skipped_failed": failed, "failed_shards": failed_shards}
        if not len(x):
            return self.zero_loss(model), sums
        scale = self.scales[int(torch.randint(len(self.scales), ()))]  # the core seeds torch per (step, worker)
        target = self.targets(x, scale)
        out = model(x, scale, self.plan.temperature)
        cos, mse = rec_distances(out["rec"], target)
        rec = {"cosine": cos, "mse": mse, "both": cos + mse}[self.cfg.rec_distance]
        w = self.plan.weights
        loss = rec + w["commitment"] * out["commitment"] + w["codebook"] * out["codebook"]
        self.hist += torch.bincount(out["codes"].flatten(), minlength=self.plan.codebook_size).to(self.hist)
        self.last_z = out["z"].detach().flatten(0, 1).float()
        b = len(x)
        return loss, {**sums, "images": b, "loss_sum": float(loss.detach()) * b, "cos_sum": float(cos.detach()) * b,
                      "mse_sum": float(mse.detach()) * b, "commitment_sum": float(out["commitment"].detach()) * b,
                      "codebook_sum": float(out["codebook"].detach()) * b,
                      f"rec_s{scale}_sum": float(rec.detach()) * b, f"rec_s{scale}_n": b}

    def zero_loss(self, model):
        import torch

        out = model(torch.zeros(1, 3, self.plan.input_size, self.plan.input_size, device=self.device), 1)
        return (out["rec"].sum() + out["commitment"] + out["codebook"]) * 0.0

    def save_model(self, model, folder, state_dict=None):
        import torch

        ckpt = model.checkpoint_dict()
        if state_dict is not None:  # FSDP: the gathered whole tensors
            ckpt["model"]["sd"] = state_dict
        torch.save(ckpt, os.path.join(folder, MODEL_FILE))
        write_sidecars(folder, self.plan)

    # -- codebook usage, merged over the workers once per step ----------------------------------------------
    def _update_usage(self):
        """Adds this step's code counts of every worker to the window (one all-reduce of K counts) and, every
        --restart-dead-every steps, restarts the dead codes (self.restarted of them). Called from `after_step`,
        which every worker runs once per step in the same order, so the collectives match. Returns the window's
        usage before any restart."""
        import torch.distributed as dist

        hist = self.hist
        if dist.is_available() and dist.is_initialized():
            hist = hist if dist.get_backend() == "nccl" else hist.cpu()  # gloo reduces CPU tensors
            dist.all_reduce(hist)
        self.window.push(hist.cpu().numpy().astype(np.int64))
        self.hist.zero_()
        self.steps_done += 1
        usage = self.window.usage()
        every = self.cfg.restart_dead_every
        self.restarted = self._restart_dead() if every and self.steps_done % every == 0 and self.window.full else 0
        return usage

    def _restart_dead(self) -> int:
        import torch
        import torch.distributed as dist

        from tarflow.models.tatok_train import restart_codes

        dead = torch.from_numpy(self.window.dead_codes())
        if not len(dead):
            return 0
        dist_on = dist.is_available() and dist.is_initialized()
        dev = self.device if dist_on and dist.get_backend() == "nccl" else torch.device("cpu")
        targets = torch.zeros(len(dead), self.plan.dim, device=dev)
        have = torch.zeros(1, device=dev)
        if (not dist_on or dist.get_rank() == 0) and self.last_z is not None:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.steps_done)
            pick = torch.randint(len(self.last_z), (len(dead),), generator=g)
            targets, have = self.last_z.cpu()[pick].to(dev), torch.ones(1, device=dev)
        if dist_on:  # every worker writes the same rows
            dist.broadcast(targets, 0)
            dist.broadcast(have, 0)
        if not have.item():
            return 0
        restart_codes(self.model, dead, targets)
        self.window.reset()  # the restarted codes get a full window before they can count as dead again
        return len(dead)

    def after_step(self, totals):
        self.usage_now = self._update_usage()  # the usage before any restart reset the window
        if self.restarted:
            totals["codes_restarted"] = totals.get("codes_restarted", 0.0) + self.restarted

    def metrics(self, sums, totals, seconds):
        u = self.usage_now
        n = sums["images"]
        out = {"loss": sums["loss_sum"] / n if n else float("nan"),
               "rec_cos": sums["cos_sum"] / n if n else float("nan"),
               "rec_mse": sums["mse_sum"] / n if n else float("nan"),
               "commitment": sums["commitment_sum"] / n if n else float("nan"),
               "codebook": sums["codebook_sum"] / n if n else float("nan")}
        for s in sorted(set(self.scales)):
            if sums[f"rec_s{s}_n"]:
                out[f"rec_s{s}"] = sums[f"rec_s{s}_sum"] / sums[f"rec_s{s}_n"]
        return {**out, "codes_used": u.used, "perplexity": u.perplexity, "dead_codes": u.dead,
                "images": int(n), "images_per_s": n / max(seconds, 1e-9),
                "skipped_failed": int(totals.get("skipped_failed", 0)),
                "failed_shards": int(totals.get("failed_shards", 0)),
                "codes_restarted": int(totals.get("codes_restarted", 0))}


def write_sidecars(folder: str, plan: ModelPlan) -> None:
    """Beside ta_tok.pth: the teacher's config folder (named as the `teacher` arg, where TATok.from_checkpoint,
    the tokenize job and the reference's AutoConfig.from_pretrained find it) and the codebook's token ids."""
    if plan.teacher_config is not None:
        os.makedirs(os.path.join(folder, plan.teacher_name), exist_ok=True)
        with open(os.path.join(folder, plan.teacher_name, "config.json"), "w") as f:
            json.dump(plan.teacher_config, f, indent=2)
    if plan.source.get("rows"):
        with open(os.path.join(folder, ROWS_FILE), "w") as f:
            json.dump({"llm": plan.source["llm"], "token_ids": plan.source["rows"]}, f)


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    worker_loop(TATokTask, TATokTrainConfig, config)


def image_dataset(cfg: TATokTrainConfig, shards: list[dict], input_size: int):
    """The tokenize job's reader and decoder stages (CPU tasks), then one (ok, pixels) row per sample."""
    from tarflow.data.img2dataset import ShardInput
    from tarflow.pipelines.image_stages import ReadSettings, read_and_decode

    ds = read_and_decode([ShardInput(**s) for s in shards], ReadSettings(), input_size, decode_cpus=0.5)
    return ds.map_batches(training_rows, batch_format="pyarrow", batch_size=None, num_cpus=0.25)


def run_train(cfg: TATokTrainConfig, plan: dict | None = None, loop=None, loop_extra: dict | None = None
              ) -> TrainSummary:
    """Train with Ray Train (after `preflight`, run here when `plan` is None). The final ta_tok.pth goes to
    `output`, with its teacher config folder and codebook_tokens.json beside it."""
    plan = plan or preflight(cfg)
    ds = image_dataset(cfg, plan["shards"], plan["model"]["input_size"])
    summary = fit(cfg, loop or train_loop, {**plan, **(loop_extra or {})}, ds)
    if cfg.output:
        export(summary.checkpoint, cfg.output, ModelPlan(**plan["model"]))
        summary.output = cfg.output
    return summary


def export(checkpoint: str, output: str, plan: ModelPlan) -> None:
    """The final ta_tok.pth (2.4 GB for Tar's: streamed, never whole in memory) and its side files to `output`."""
    out_dir = storage.dirname(output)
    storage.copy_file(storage.join(checkpoint, MODEL_FILE), output)
    for rel in ([f"{plan.teacher_name}/config.json"] if plan.teacher_config is not None else []) + \
            ([ROWS_FILE] if plan.source.get("rows") else []):
        storage.copy_file(storage.join(checkpoint, rel), storage.join(out_dir, rel))
