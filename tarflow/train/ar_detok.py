"""Training the AR de-tokenizer on Ray Train: stored TA-Tok codes -> rec features -> pixel-VQ codes.

    code shards (tokenize --vq)  --ray.data.read_parquet: [tatok_s{scale}, vq16_{res}] only
      --> Ray Train workers (TorchTrainer, DDP), per micro-batch of rows:
          rows checked: missing codes, wrong lengths, codes out of range -> skipped and counted, never trained on
          frozen TA-Tok decoder: codes -> condition (B, n_cond, C)                       (no grad)
          condition dropout: a dropped row gets the all-zero condition, the null condition CFG samples with
          teacher forcing: logits = AR(vq[:, :-1], cond); cross-entropy over every VQ token (row j -> token j)
          AdamW + cosine warmup (tarflow.train.common), grad accumulation, bf16 autocast on GPU
      --> checkpoints in Ray Train's storage: ar_dtok.pth (reference format) + trainer_state.pt + ar_detok_train.json
      --> the final ar_dtok.pth copied to `output` (local or s3://)

Resume: a rerun with the same name and storage path (or a Ray Train retry after a failure) continues from the
latest checkpoint: weights, optimiser and schedule, step, and each worker's data position (rows it consumed in
the current epoch are skipped). Randomness comes from the global generator reseeded from (seed, rank, step) at
every step, and the data order is reproducible (files in order, Ray Data's split with preserve_order, the local
shuffle seeded by seed + epoch), so a resumed run reaches the weights of an uninterrupted one (tested with 2
workers on CPU). It holds for the same number of workers and batch size only.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tarflow.data import schema, storage
from tarflow.train.common import OptimConfig

log = logging.getLogger("tarflow.train.ar_detok")

MODEL_FILE = "ar_dtok.pth"  # the reference format, loadable by ARDetokenizer.from_checkpoint
META_FILE = "ar_detok_train.json"  # data facts, skip counters, metrics history
SKIP_REASONS = ("missing", "length", "range")
HISTORY_MAX = 10_000  # metrics kept in the checkpoint (the last ones)


def default_optim() -> OptimConfig:
    # LlamaGen's AR recipe (the family Tar's de-tokenizer comes from): lr 1e-4, wd 0.05, betas (0.9, 0.95)
    return OptimConfig(lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))


@dataclass
class ARTrainConfig:
    data: list[str]  # tokenize outputs made with --vq (finished shards), folders of code shards, or shard files
    tatok: str  # the TA-Tok that made the codes: its decoder (frozen) makes the condition
    scale: int = 1  # which tatok_s{scale} column conditions
    vq_column: str | None = None  # default: the shards' VQ column
    init: str | None = None  # an AR checkpoint to fine-tune; else a new model:
    preset: str | None = None  # a size preset (llama-abs-S, ..., -LP, ...) or n_layer / n_head / dim
    n_layer: int | None = None
    n_head: int | None = None
    dim: int | None = None
    output: str | None = None  # where the final model goes (.pth, local or s3://)
    name: str = "ar-detok"  # Ray Train run name; a rerun with the same name resumes
    storage_path: str = "out/train-ar-detok"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    batch_size: int = 32  # rows per worker per micro-batch (skipped rows make it smaller)
    optim: OptimConfig = field(default_factory=default_optim)
    cond_dropout: float | None = None  # default: the model's class_dropout_prob (reference 0.1)
    seed: int = 0
    shuffle_buffer: int = 1024  # rows; 0 = file order
    checkpoint_every: int = 500
    keep_checkpoints: int | None = 2
    stop_at_step: int | None = None  # end this run early (checkpointed); the schedule still spans total_steps
    max_failures: int = 3
    log_every: int = 10

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ARTrainConfig:
        d = dict(d)
        d["optim"] = OptimConfig(**{**d["optim"], "betas": tuple(d["optim"]["betas"])})
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


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
        return {k: v for k, v in asdict(self).items() if k != "files"}


def _read_shard_meta(path: str) -> dict:
    import pyarrow.parquet as pq

    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        return schema.check_code_shard(pq.read_schema(f), path)


def plan_data(cfg: ARTrainConfig, tatok) -> DataPlan:
    """Every code shard must come from this TA-Tok, hold the scale and VQ codes from one VQ; errors name the
    shard and the fix."""
    from tarflow.pipelines.caption import resolve_code_shards

    files = [c.path for spec in cfg.data for c in resolve_code_shards(spec)]
    with ThreadPoolExecutor(16) as pool:  # one footer read per shard; many shards on S3 want parallel reads
        metas = list(pool.map(_read_shard_meta, files))
    col = schema.code_column(cfg.scale)
    vq0, first = None, None
    for path, meta in zip(files, metas):
        if meta["model"]["sha256"] != tatok.sha256:
            raise ValueError(f"{path}: its codes come from TA-Tok {meta['model']['checkpoint']} (sha256 "
                             f"{meta['model']['sha256'][:12]}), not {cfg.tatok} ({tatok.sha256[:12]}); pass that "
                             "checkpoint as --tatok (its decoder makes the condition)")
        if cfg.scale not in meta["scales"]:
            raise ValueError(f"{path}: no {col} column (scales {meta['scales']}); choose another --scale or "
                             "tokenize at this scale")
        vq = meta.get("vq")
        if not vq:
            raise ValueError(f"{path}: no VQ codes; re-run the tokenize job with --vq PATH --vq-resolution RES "
                             "--overwrite to make training data")
        if cfg.vq_column and vq["column"] != cfg.vq_column:
            raise ValueError(f"{path}: VQ column is {vq['column']}, not --vq-column {cfg.vq_column}")
        if vq0 is None:
            vq0, first = vq, path
        elif (vq["sha256"], vq["column"]) != (vq0["sha256"], vq0["column"]):
            raise ValueError(f"{path} has {vq['column']} from VQ {vq['sha256'][:12]} but {first} has "
                             f"{vq0['column']} from VQ {vq0['sha256'][:12]}; train on shards of one VQ setting")
    return DataPlan(files=files, cond_column=col, n_cond=tatok.num_tokens(cfg.scale),
                    cond_codebook=tatok.codebook_size, cond_dim=tatok.encoder_cfg.hidden_size,
                    tatok_sha256=tatok.sha256, vq_column=vq0["column"], n_vq=int(vq0["num_tokens"]),
                    vq_codebook=int(vq0["codebook_size"]), vq_sha256=vq0["sha256"])


def split_rows(table: pa.Table, plan: DataPlan) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Rows -> (condition codes (k, n_cond), VQ codes (k, n_vq)) int64 of the good rows, and the rows skipped by
    reason: `missing` (null list or null code), `length` (not n codes), `range` (a code outside the codebook)."""
    cond, c_bad = _check_codes(table.column(plan.cond_column), plan.n_cond, plan.cond_codebook)
    vq, v_bad = _check_codes(table.column(plan.vq_column), plan.n_vq, plan.vq_codebook)
    bad = np.where((c_bad > 0) & (v_bad > 0), np.minimum(c_bad, v_bad), np.maximum(c_bad, v_bad))
    good = bad == 0
    return cond[good], vq[good], {r: int((bad == i + 1).sum()) for i, r in enumerate(SKIP_REASONS)}


def _check_codes(col: pa.ChunkedArray, n: int, codebook: int) -> tuple[np.ndarray, np.ndarray]:
    """-> codes (rows, n) int64 (zeros where bad), and per row 0 = good or 1 + the index of its SKIP_REASON."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(arr)
    bad = np.where(lengths.is_null().to_numpy(zero_copy_only=False), 1, 0)
    bad[(bad == 0) & (lengths.fill_null(0).to_numpy(zero_copy_only=False) != n)] = 2
    codes = np.zeros((len(arr), n), dtype=np.int64)
    rows = np.flatnonzero(bad == 0)
    if len(rows):
        values = pc.list_flatten(arr.filter(pa.array(bad == 0)))
        null = values.is_null().to_numpy(zero_copy_only=False).reshape(-1, n).any(1)
        v = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, n)
        out_of_range = ((v < 0) | (v >= codebook)).any(1)
        bad[rows[null]] = 1
        bad[rows[~null & out_of_range]] = 3
        codes[rows] = np.where((null | out_of_range)[:, None], 0, v)
    return codes, bad


# ----------------------------------------------------------------------------------------------------------
# The model: a new one from ARArgs, or a checkpoint to fine-tune; either must fit the data


def model_spec(cfg: ARTrainConfig, plan: DataPlan) -> dict:
    """{"init": path} or {"args": ARArgs fields, "name": ...}, checked against the data (fails on the driver)."""
    from tarflow.models.ar_detok import PRESETS, ARArgs
    from tarflow.models.checkpoint import read_checkpoint, unwrap_model_entry

    if cfg.init:
        entry = unwrap_model_entry(read_checkpoint(cfg.init), ("args", "sd"))
        check_fits(ARArgs.from_ckpt(str(entry.get("name", "")), entry["args"], cfg.init), plan, cfg.init)
        return {"init": cfg.init}
    sizes = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "dim") if getattr(cfg, k) is not None}
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise ValueError(f"--preset {cfg.preset!r} is not one of {', '.join(PRESETS)}")
        sizes = {**dict(zip(("n_layer", "n_head", "dim"), PRESETS[cfg.preset])), **sizes}
    if len(sizes) != 3:
        raise ValueError("a new model needs --preset or all of --n-layer/--n-head/--dim (or --init CHECKPOINT)")
    args = ARArgs.from_ckpt("", {**sizes, "model_type": "clip_cond", "cond_dim": plan.cond_dim,
                                 "vocab_size": plan.vq_codebook, "cls_token_num": plan.n_cond,
                                 "max_seq_len": plan.n_vq})
    name = cfg.preset if cfg.preset and PRESETS[cfg.preset] == (args.n_layer, args.n_head, args.dim) else None
    return {"args": asdict(args), "name": name or "llama-abs-custom"}


def check_fits(args, plan: DataPlan, path: str) -> None:
    problems = []
    if args.cond_dim != plan.cond_dim:
        problems.append(f"cond_dim {args.cond_dim} != the TA-Tok's hidden size {plan.cond_dim}")
    if args.vocab_size < plan.vq_codebook:
        problems.append(f"vocab_size {args.vocab_size} < the VQ codebook {plan.vq_codebook}")
    if args.max_seq_len != plan.n_vq:
        problems.append(f"max_seq_len {args.max_seq_len} != {plan.n_vq} VQ tokens per image ({plan.vq_column})")
    if plan.n_cond > args.cls_token_num:
        problems.append(f"{plan.n_cond} condition tokens ({plan.cond_column}) > cls_token_num {args.cls_token_num}")
    if problems:
        raise ValueError(f"{path}: this AR de-tokenizer does not fit the data: {'; '.join(problems)}; pick a "
                         "matching checkpoint, --scale or VQ resolution, or train a new model")


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
# The worker loop


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def _row_batches(shard, cfg: ARTrainConfig, state):
    """This worker's raw row batches (pa.Table), epoch after epoch, fixed-size (drop_last) so that every worker
    takes the same number per epoch; on resume the rows already consumed in the current epoch are skipped.
    Keeps state.epoch / state.samples_seen current: a checkpoint records exactly the rows trained on."""
    while True:
        skip, got = state.samples_seen, 0
        shuffle = {"local_shuffle_buffer_size": cfg.shuffle_buffer, "local_shuffle_seed": cfg.seed + state.epoch} \
            if cfg.shuffle_buffer else {}
        for b in shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow", drop_last=True,
                                    prefetch_batches=2, **shuffle):
            got += 1
            if skip >= len(b):
                skip -= len(b)
                continue
            b, skip = b.slice(skip), 0
            state.samples_seen += len(b)
            yield b
        if not got:
            raise RuntimeError(f"a worker's share of the data holds no full batch of {cfg.batch_size} rows; lower "
                               "--batch-size or --num-workers, or add data")
        state.epoch, state.samples_seen = state.epoch + 1, 0


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


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from tarflow.models.ar_detok import ARArgs, ARDetokenizer
    from tarflow.models.tatok import TATok
    from tarflow.train.common import (
        ModelParallel,
        TrainState,
        autocast,
        load_trainer_state,
        make_optimizer,
        report,
        unwrap,
    )

    cfg = ARTrainConfig.from_dict(config["cfg"])
    plan = DataPlan(**config["plan"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    bf16 = device.type == "cuda" and cfg.optim.bf16

    tatok = TATok.from_checkpoint(cfg.tatok)
    tatok.encoder = None  # decode only: the SigLIP encoder never runs here, so it takes no memory
    tatok = tatok.to(device, torch.bfloat16 if bf16 else torch.float32).requires_grad_(False).eval()

    meta = {"skipped": dict.fromkeys(SKIP_REASONS, 0), "history": [], "starts": []}
    ckpt = ray.train.get_checkpoint()
    ckpt_dir = ckpt.as_directory() if ckpt else contextlib.nullcontext()
    with ckpt_dir as d:
        if d:  # a retry or a rerun of this run: its latest checkpoint
            model = ARDetokenizer.from_checkpoint(os.path.join(d, MODEL_FILE))
            with open(os.path.join(d, META_FILE)) as f:
                meta = json.load(f)
        elif "init" in config["model"]:
            model = ARDetokenizer.from_checkpoint(config["model"]["init"])
        else:
            model = ARDetokenizer(ARArgs(**config["model"]["args"]))
            model.name = config["model"]["name"]
            init_weights(model, cfg.seed)
        model.train()
        name = model.name
        p_drop = model.args.class_dropout_prob if cfg.cond_dropout is None else cfg.cond_dropout
        parallel = ModelParallel("ddp")
        model = parallel.wrap(model)  # to the device; DDP with several workers
        opt, sched = make_optimizer(model, cfg.optim)
        state = load_trainer_state(d, opt, sched, rank, parallel) if d else TrainState()
    unwrap(model).name = name
    meta["starts"].append(state.step)  # 0 for a fresh run, else the step a rerun or retry resumed from

    def save_model(folder: str) -> None:
        torch.save(reference_checkpoint(unwrap(model)), os.path.join(folder, MODEL_FILE))
        with open(os.path.join(folder, META_FILE), "w") as f:
            json.dump({**meta, "step": state.step, "epoch": state.epoch, "facts": plan.facts(),
                       "config": cfg.to_dict()}, f)

    params = [p for p in model.parameters() if p.requires_grad]
    batches = _row_batches(ray.train.get_dataset_shard("train"), cfg, state)
    end = min(cfg.optim.total_steps, cfg.stop_at_step or cfg.optim.total_steps)
    accum = max(1, cfg.optim.grad_accum)
    while state.step < end:
        t0 = time.perf_counter()
        torch.manual_seed(step_seed(cfg.seed, rank, state.step))  # dropout and condition dropout
        sums = np.zeros(3 + len(SKIP_REASONS))  # loss * good rows, good rows, raw rows, skipped by reason
        loss_sum = torch.zeros((), device=device)  # stays on the device: no sync per micro-batch
        for micro in range(accum):
            table = next(batches)
            cond_codes, vq_codes, skipped = split_rows(table, plan)
            sums[1:] += [len(vq_codes), len(table), *skipped.values()]
            with parallel.micro_batch(sync=micro == accum - 1):
                if len(vq_codes):
                    with autocast(device, cfg.optim.bf16):
                        loss = teacher_forced_loss(model, tatok, cond_codes, vq_codes, p_drop, device)
                    loss_sum += loss.detach() * len(vq_codes)
                else:  # every row bad: a zero loss still runs backward, so DDP's gradient all-reduce matches
                    loss = sum(p.sum() for p in params) * 0.0
                (loss / accum).backward()
        if cfg.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        sums[0] = float(loss_sum)
        if dist.is_available() and dist.is_initialized():  # totals over the workers
            t = torch.tensor(sums, dtype=torch.float64, device=device)
            dist.all_reduce(t)
            sums = t.cpu().numpy()
        for r, n in zip(SKIP_REASONS, sums[3:]):
            meta["skipped"][r] += int(n)
        dt = time.perf_counter() - t0
        metrics = {"step": state.step, "epoch": state.epoch, "lr": lr,
                   "loss": float(sums[0] / sums[1]) if sums[1] else float("nan"),
                   "rows": int(sums[2]), "rows_trained": int(sums[1]),
                   "tokens_per_s": float(sums[1] * plan.n_vq / dt),
                   **{f"skipped_{r}": n for r, n in meta["skipped"].items()},
                   "skipped_total": sum(meta["skipped"].values())}
        meta["history"] = (meta["history"] + [metrics])[-HISTORY_MAX:]
        save = state.step % max(1, cfg.checkpoint_every) == 0 or state.step == end
        # Every step's metrics go to the history kept in checkpoints; Ray Train gets them every log_every steps
        # (a report is a barrier across the workers through the controller: not free at every step).
        if save or state.step % max(1, cfg.log_every) == 0:
            if rank == 0:
                sys.stdout.write(f"step {state.step}/{end} loss {metrics['loss']:.4f} lr {lr:.3g} "
                                 f"{metrics['tokens_per_s']:.0f} tok/s skipped {metrics['skipped_total']}\n")
                sys.stdout.flush()
            report(metrics, save_model, opt, sched, state, checkpoint=save, parallel=parallel)


# ----------------------------------------------------------------------------------------------------------
# Driver


@dataclass
class TrainSummary:
    steps: int
    metrics: dict  # the last step's
    history: list[dict]  # per step, since the run began (across resumes)
    starts: list[int]  # the step each start of the workers began from: [0] for a run that never resumed
    checkpoint: str  # the latest Ray Train checkpoint folder
    output: str | None

    def render(self) -> str:
        m = self.metrics
        return (f"AR de-tokenizer: {self.steps} steps, loss {m.get('loss', float('nan')):.4f}, skipped rows "
                f"{m.get('skipped_total', 0)} (missing {m.get('skipped_missing', 0)}, length "
                f"{m.get('skipped_length', 0)}, range {m.get('skipped_range', 0)})\n"
                f"checkpoint: {self.checkpoint}\nmodel: {self.output or '(no --output)'}")


def _previous_facts(cfg: ARTrainConfig) -> dict | None:
    """The data facts of this run's latest checkpoint, if the run exists (refuse to resume onto other data)."""
    run = storage.join(_abs(cfg.storage_path), cfg.name)
    fs, p = storage.filesystem(run)
    fs.invalidate_cache(p)  # s3fs caches listings per process: a run of this process may have added checkpoints
    metas = fs.glob(p.rstrip("/") + "/*/" + META_FILE) if fs.exists(p) else []
    if not metas:
        return None
    with fs.open(max(metas), "rb") as f:  # checkpoint folders are named by time: the last is the latest
        return json.load(f)["facts"]


def _abs(path: str) -> str:
    return path if storage.is_remote(path) else os.path.abspath(path)


def run_train(cfg: ARTrainConfig, loop=None, loop_extra: dict | None = None) -> TrainSummary:
    """Train with Ray Train. `loop` replaces the per-worker loop (e.g. one wrapping `train_loop`), with
    `loop_extra` added to its config."""
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    from tarflow.models.tatok import TATok

    if cfg.batch_size < 1 or cfg.num_workers < 1 or cfg.optim.total_steps < 1:
        raise ValueError("--batch-size, --num-workers and --steps must be >= 1")
    tatok = TATok.from_checkpoint(cfg.tatok)
    plan = plan_data(cfg, tatok)
    del tatok
    spec = model_spec(cfg, plan)
    previous = _previous_facts(cfg)
    if previous is not None and previous != plan.facts():
        diff = sorted(k for k in plan.facts() if previous.get(k) != plan.facts()[k])
        raise ValueError(f"run {cfg.name!r} in {cfg.storage_path} was trained on other data ({', '.join(diff)} "
                         "differ); use another --name to start a new run")
    log.info("%d code shards: %s (%d tokens) -> %s (%d tokens, codebook %d)", len(plan.files), plan.cond_column,
             plan.n_cond, plan.vq_column, plan.n_vq, plan.vq_codebook)
    # Only the two columns travel. preserve_order makes Ray Data's split deterministic (blocks in file order, each
    # to the worker with the fewest rows so far), so every run hands each worker the same rows.
    ds = ray.data.read_parquet(plan.files).select_columns([plan.cond_column, plan.vq_column])  # pushed into the read
    trainer = TorchTrainer(
        loop or train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "plan": asdict(plan), "model": spec, **(loop_extra or {})},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.use_gpu else {})}),
        # gloo beside NCCL: tarflow.train.common gathers CPU tensors (samples seen per worker) on checkpoints
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl") if cfg.use_gpu else None,
        run_config=RunConfig(name=cfg.name, storage_path=_abs(cfg.storage_path),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        datasets={"train": ds},
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.name!r} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, META_FILE)) as f:
            meta = json.load(f)
        if cfg.output:
            with open(os.path.join(d, MODEL_FILE), "rb") as f:
                storage.write_bytes_atomic(cfg.output, f.read())
    return TrainSummary(steps=meta["step"], metrics=meta["history"][-1] if meta["history"] else {},
                        history=meta["history"], starts=meta["starts"], output=cfg.output,
                        checkpoint=storage.protocol_prefix(cfg.storage_path) + result.checkpoint.path)
