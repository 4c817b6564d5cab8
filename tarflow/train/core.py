"""The trainer core: everything a Ray Train trainer does that is not its model, its batches or its loss.

    driver:  TrainConfig + facts of the data --> refuse a rerun on other data --> TorchTrainer.fit()
             (CheckpointConfig(num_to_keep=--keep-checkpoints), FailureConfig, the Ray Data stream split over
             the workers in a fixed order) --> TrainSummary from the latest checkpoint
    worker:  Task(cfg, config, device) supplies the model, its micro-batches and its loss; the core runs
             ModelParallel (DDP / FSDP2), AdamW + transformers' cosine schedule with warmup, gradient
             accumulation, per-step seeds, metrics (summed over the workers) every --log-every steps, and
             checkpoints every --checkpoint-every steps

A trainer is a `Task` subclass and a driver function that calls `fit`: the Tar MLLM (tarflow.train.mllm), the
AR and diffusion de-tokenizers (tarflow.train.ar_detok, tarflow.train.diffusion_detok) and TA-Tok itself
(tarflow.train.tatok). Another plugs in the same way (its model, its batches, its loss).

Checkpoint folder = the model in the format its users load (written by the task) + `trainer_state.pt`
(optimiser, schedule, step, epoch, each worker's data position; `torch.load(weights_only=True)`) +
`train_meta.json` (the data facts, the config, per-step metrics, run totals, the steps each start began at).

Steps: `--steps` is the whole run (the schedule spans it); `--stop-at-step N` ends this run once step N is done
(absolute: counted from the run's first step, across resumes), with a checkpoint; rerunning without it (or
with a larger N) continues.

Resume is exact for the same workers and settings: the data order is fixed (files in order, Ray Data's split
with preserve_order, the local shuffle seeded by seed + epoch), each worker's position in the epoch is saved,
and the torch RNG is reseeded from (seed, rank, step) at every step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from tarflow.data import storage
from tarflow.train.common import (
    ModelParallel,
    OptimConfig,
    TrainState,
    autocast,
    gather_ints,
    load_trainer_state,
    make_optimizer,
    save_trainer_state,
    unwrap,
)

log = logging.getLogger("tarflow.train")

META_FILE = "train_meta.json"  # data facts, config, per-step metrics, totals, starts
HISTORY_MAX = 10_000  # per-step metrics kept in a checkpoint (the last ones)


@dataclass(kw_only=True)
class TrainConfig:
    """The settings every trainer has, with the same meaning in each (see tarflow.train.cli for the flags)."""

    data: list[str]
    storage_path: str = "out/train"  # Ray Train's storage for runs and checkpoints (local or s3://)
    name: str = "run"  # the run; a rerun with the same name and storage path resumes it
    strategy: str = "ddp"  # or "fsdp": parameters, gradients and optimiser state sharded over the workers
    optim: OptimConfig = field(default_factory=OptimConfig)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    seed: int = 0
    shuffle_buffer: int = 256  # rows in each worker's seeded local shuffle buffer; 0 = file order
    checkpoint_every: int = 100  # steps between checkpoints (and one at the end)
    keep_checkpoints: int | None = 2  # latest checkpoints kept in storage; None = all
    log_every: int = 10  # steps per metrics report and log line (averaged over them)
    stop_at_step: int | None = None  # end this run after this absolute step (checkpointed); rerun continues
    max_failures: int = 1  # worker failures Ray Train recovers from (from the latest checkpoint)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        d["optim"] = OptimConfig(**{**d["optim"], "betas": tuple(d["optim"]["betas"])})
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def end_step(self) -> int:
        return min(self.optim.total_steps, self.stop_at_step or self.optim.total_steps)

    def check(self, problems) -> None:
        """The settings' own problems (tarflow.preflight.Problems)."""
        positive = {"--steps": self.optim.total_steps, "--num-workers": self.num_workers,
                    "--grad-accum": self.optim.grad_accum, "--checkpoint-every": self.checkpoint_every,
                    "--log-every": self.log_every}
        for flag, value in positive.items():
            problems.check(value >= 1, flag, f"is {value}", "give a whole number >= 1")
        problems.check(self.keep_checkpoints is None or self.keep_checkpoints >= 1, "--keep-checkpoints",
                       f"is {self.keep_checkpoints}", "keep at least 1 (the one a rerun resumes from)")
        problems.check(self.stop_at_step is None or self.stop_at_step >= 1, "--stop-at-step",
                       f"is {self.stop_at_step}", "give the absolute step to stop after (>= 1)")
        problems.check(self.strategy in ("ddp", "fsdp"), "--strategy",
                       f"unknown parallel strategy {self.strategy!r}", "choose ddp or fsdp")
        problems.check(self.cpus_per_worker > 0, "--cpus-per-worker", f"is {self.cpus_per_worker}",
                       "give a positive number")


# ----------------------------------------------------------------------------------------------------------
# What a trainer supplies


class Task:
    """A trainer's own part, built on every worker: its model, its micro-batches and its loss.

    Metrics: `loss` returns sums (floats keyed by `sum_keys`), which the core adds up over micro-batches, all
    workers and the steps between reports; `metrics(sums, totals, seconds)` turns them into the reported
    numbers. `total_keys` (a subset) are also summed over the whole run, across resumes (e.g. rows skipped).
    """

    sum_keys: tuple[str, ...] = ("loss_sum", "loss_count")
    total_keys: tuple[str, ...] = ()
    read_rows: int = 64  # rows per Ray Data batch read from the worker's shard
    drop_last: bool = False  # drop an epoch's last, partial read (fixed-size micro-batches)

    def __init__(self, cfg: TrainConfig, config: dict, device: torch.device):
        self.cfg, self.config, self.device = cfg, config, device

    def load_model(self, checkpoint_dir: str | None) -> torch.nn.Module:
        """The model to train: from `checkpoint_dir` (a checkpoint of this run), else the initial one."""
        raise NotImplementedError

    def fsdp_layers(self, model: torch.nn.Module) -> list:
        """Submodules FSDP shards one by one (one all-gather each) before the whole model."""
        return list(getattr(model, "layers", ()))

    def epoch_rows(self, shards: dict, state: TrainState):
        """This worker's current epoch from the saved position on, as (position, rows): `rows` a pa.Table (or a
        list of row dicts) whose first row is row `position` of the epoch. `shards`: the worker's share of each
        dataset given to `fit`, by name. Default: the one "train" dataset in its fixed order."""
        return _epoch_rows(shards["train"], self, self.cfg, state)

    def batches(self, rows, epoch: int):
        """Micro-batches of one epoch from `rows`, the iterator `epoch_rows` gives: (position, rows), the first
        of `rows` being row `position` of this worker's epoch. Yields (batch, resume_at): a checkpoint taken
        after training on `batch` resumes at row `resume_at` of the epoch."""
        raise NotImplementedError

    def loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        """(loss to backpropagate, metric sums) for one micro-batch."""
        raise NotImplementedError

    def zero_loss(self, model) -> torch.Tensor:
        """A loss of exactly zero that still runs forward and backward through every parameter (a worker out of
        data while others are not: DDP and FSDP expect every worker in every collective)."""
        raise NotImplementedError

    def save_model(self, model: torch.nn.Module, folder: str, state_dict: dict | None = None) -> None:
        """Write the model into the checkpoint folder; `state_dict` (whole tensors) under FSDP, else None."""
        raise NotImplementedError

    def metrics(self, sums: dict, totals: dict, seconds: float) -> dict:
        return {"loss": sums["loss_sum"] / sums["loss_count"] if sums["loss_count"] else float("nan")}


# ----------------------------------------------------------------------------------------------------------
# The worker loop


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


# tqdm >= 4.66 reads TQDM_* variables as default arguments when it is imported; huggingface_hub and
# transformers' loading bars follow HF_HUB_DISABLE_PROGRESS_BARS
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def quiet_progress_bars() -> None:
    """No progress bars where the log is not a terminal: their carriage returns and control codes fill log
    files. For this process (Ray Data's bars, transformers') and the processes it starts; Ray Train's workers
    get QUIET_ENV through their runtime environment (see `fit`)."""
    os.environ.update(QUIET_ENV)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False


def _epoch_rows(shard, task: Task, cfg: TrainConfig, state: TrainState):
    """(position, table) of this worker's current epoch, from the saved position on: rows consumed before a
    checkpoint are skipped (the order is the same on every run)."""
    skip, pos = state.samples_seen, 0
    shuffle = {"local_shuffle_buffer_size": cfg.shuffle_buffer, "local_shuffle_seed": cfg.seed + state.epoch} \
        if cfg.shuffle_buffer else {}
    for table in shard.iter_batches(batch_size=task.read_rows, batch_format="pyarrow", drop_last=task.drop_last,
                                    prefetch_batches=2, **shuffle):
        n = len(table)
        if skip >= n:
            skip -= n
        else:
            yield pos + skip, table.slice(skip)
            skip = 0
        pos += n


def _stream(shards: dict, task: Task, state: TrainState):
    """Micro-batches epoch after epoch; None at each epoch's end (see LockstepBatches). Keeps the state's data
    position at the first row not trained on yet."""
    while True:
        for batch, resume_at in task.batches(task.epoch_rows(shards, state), state.epoch):
            state.samples_seen = resume_at
            yield batch
        yield None  # this worker's epoch is over; the next one starts when every worker got here
        state.epoch += 1
        state.samples_seen = 0


class LockstepBatches:
    """Micro-batches that keep the workers in step across epochs.

    Workers can have different numbers of micro-batches per epoch (packing, skipped rows), and Ray Data starts
    a new epoch of a split dataset only when every worker asks for it; a worker that runs out first would wait
    there while the others wait for it in the gradient all-reduce. So each micro-batch, the workers agree
    whether any of them still has data: if none has, all start the next epoch together; if some have, those
    without train a no-op batch (None) until all are done. The next batch is fetched only when it is about to
    be trained, so the recorded data position never runs ahead of training.
    """

    _UNFETCHED = object()

    def __init__(self, gen, device):
        self.gen, self.device, self.cur = gen, device, self._UNFETCHED

    def _any(self, flag: bool) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return flag
        t = torch.tensor([int(flag)], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def next(self):
        idle_epochs = 0
        while True:
            if self.cur is self._UNFETCHED:
                self.cur = next(self.gen)
            if self._any(self.cur is not None):
                break
            idle_epochs += 1  # every worker is at its epoch's end: all begin the next epoch
            if idle_epochs > 2:
                raise RuntimeError("no trainable row in the data: every row was skipped (see the skipped_* "
                                   "metrics) or a worker's share holds no full batch (lower the batch size or "
                                   "--num-workers, or add data)")
            self.cur = self._UNFETCHED
        batch = self.cur
        if batch is not None:
            self.cur = self._UNFETCHED
        return batch


def _all_sum(values: np.ndarray, device) -> np.ndarray:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.cpu().numpy()


def worker_loop(task_cls: type[Task], config_cls: type[TrainConfig], config: dict) -> None:
    """The Ray Train loop of every trainer (`config`: {"cfg": TrainConfig.to_dict(), "facts": ..., the task's
    own entries}). Runs on every worker."""
    import ray.train
    import ray.train.torch

    if config.get("quiet"):
        quiet_progress_bars()  # the worker's environment has QUIET_ENV already (tqdm reads it on import)
    cfg = config_cls.from_dict(config["cfg"])
    optim = cfg.optim
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # the initial model is the same on every worker
    task = task_cls(cfg, config, device)
    parallel = ModelParallel(cfg.strategy)
    meta = {"history": [], "starts": [], "totals": dict.fromkeys(task.total_keys, 0.0)}
    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt is not None else contextlib.nullcontext(None) as d:
        model = task.load_model(d)
        model.train()
        layers = task.fsdp_layers(model)
        model = parallel.wrap(model, layers=layers)
        opt, sched = make_optimizer(model, optim)
        state = load_trainer_state(d, opt, sched, rank, parallel) if d else TrainState()
        if d and os.path.exists(os.path.join(d, META_FILE)):  # checkpoints from before the core have none
            with open(os.path.join(d, META_FILE)) as f:
                meta = json.load(f)
    meta["starts"].append(state.step)  # 0 for a fresh run, else the step a rerun or retry resumed from

    def save(folder: str, state_dict: dict | None) -> None:
        task.save_model(unwrap(model), folder, state_dict)
        with open(os.path.join(folder, META_FILE), "w") as f:
            json.dump({**meta, "step": state.step, "epoch": state.epoch, "facts": config.get("facts"),
                       "config": cfg.to_dict()}, f, default=str)

    shards = {name: ray.train.get_dataset_shard(name) for name in config.get("datasets", ["train"])}
    batches = LockstepBatches(_stream(shards, task, state), device)
    keys = task.sum_keys
    end = cfg.end_step()
    accum = max(1, optim.grad_accum)
    window, window_s = np.zeros(len(keys)), 0.0
    while state.step < end:
        t0 = time.perf_counter()
        torch.manual_seed(step_seed(cfg.seed, rank, state.step))  # dropout, condition dropout, noise
        opt.zero_grad(set_to_none=True)
        sums = np.zeros(len(keys))
        for micro in range(accum):
            batch = batches.next()
            with parallel.micro_batch(sync=micro == accum - 1):
                with autocast(device, optim.bf16):
                    if batch is None:  # out of data while others are not: a no-op keeps the collectives in step
                        loss, part = task.zero_loss(model), {}
                    else:
                        loss, part = task.loss(model, batch)
                (loss / accum).backward()
            for k, v in part.items():
                sums[keys.index(k)] += v
        if optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        state.step += 1
        sums = _all_sum(sums, device)  # every worker's share (one small all-reduce per step)
        dt = time.perf_counter() - t0
        for k in task.total_keys:
            meta["totals"][k] = meta["totals"].get(k, 0.0) + float(sums[keys.index(k)])
        metrics = {"step": state.step, "epoch": state.epoch, "lr": lr, "step_seconds": dt,
                   **task.metrics(dict(zip(keys, sums)), meta["totals"], dt)}
        meta["history"] = (meta["history"] + [metrics])[-HISTORY_MAX:]
        window, window_s = window + sums, window_s + dt
        checkpoint = state.step % cfg.checkpoint_every == 0 or state.step == end
        # Ray Train takes one report per worker per poll of its controller (every 2 s by default) and blocks the
        # next until then: reporting every step would cap training at a step per poll. So reports (and the log
        # line) come every log_every steps, averaged over them, and with each checkpoint.
        if checkpoint or state.step % cfg.log_every == 0:
            metrics = {"step": state.step, "epoch": state.epoch, "lr": lr,
                       **task.metrics(dict(zip(keys, window)), meta["totals"], window_s)}
            if rank == 0:
                sys.stdout.write(format_metrics(metrics, end) + "\n")
                sys.stdout.flush()
            report(metrics, save, opt, sched, state, checkpoint=checkpoint, parallel=parallel)
            window, window_s = np.zeros(len(keys)), 0.0


def format_metrics(metrics: dict, end: int) -> str:
    words = [f"step {metrics['step']}/{end}"]
    for k, v in metrics.items():
        if k not in ("step", "epoch"):
            words.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " ".join(words)


def report(metrics: dict, save, opt, sched, state: TrainState, checkpoint: bool, parallel: ModelParallel) -> None:
    """ray.train.report from every worker; with `checkpoint`, rank 0 writes the checkpoint and attaches it (the
    rows each worker consumed are gathered first, so the data position resumes per worker). `save(folder,
    state_dict)` writes the model and the metadata; under FSDP `state_dict` holds the whole tensors, gathered
    by every worker first (a collective), else it is None."""
    import ray.train

    if not checkpoint:
        ray.train.report(metrics)
        return
    rank = ray.train.get_context().get_world_rank()
    seen = gather_ints(state.samples_seen)
    model_state, optimizer_state = parallel.full_state(opt)  # a collective under FSDP: every worker calls it
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save(tmp, model_state)
            save_trainer_state(tmp, optimizer_state, sched, state, seen)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


# ----------------------------------------------------------------------------------------------------------
# The driver


@dataclass
class TrainSummary:
    steps: int
    metrics: dict  # the last step's
    history: list[dict]  # per step, since the run began (across resumes; the last HISTORY_MAX)
    starts: list[int]  # the step each start of the workers began from: [0] for a run that never resumed
    checkpoint: str  # the latest checkpoint folder (local or s3://)
    output: str | None = None

    def render(self, what: str = "training") -> str:
        m = self.metrics
        skipped = {k.removeprefix("skipped_"): v for k, v in m.items() if k.startswith("skipped_") and v}
        return (f"{what}: {self.steps} steps, loss {m.get('loss', float('nan')):.4f}"
                + (f", rows skipped {skipped}" if skipped else "")
                + (f", shards failed {m['failed_shards']}" if m.get("failed_shards") else "")
                + f"\ncheckpoint: {self.checkpoint}" + (f"\nmodel: {self.output}" if self.output else ""))

    def as_dict(self) -> dict:
        return asdict(self)


def absolute(path: str) -> str:
    return path if storage.is_remote(path) else os.path.abspath(path)


def latest_checkpoint(storage_path: str, name: str) -> tuple[str, dict] | None:
    """(folder, train_meta.json) of the run's latest checkpoint, None if the run has none."""
    run = storage.join(absolute(storage_path), name)
    fs, p = storage.filesystem(run)
    fs.invalidate_cache(p)  # s3fs caches listings per process: a run of this process may have added checkpoints
    metas = fs.glob(p.rstrip("/") + "/checkpoint_*/" + META_FILE) if fs.exists(p) else []
    if not metas:
        return None
    latest = max(metas)  # checkpoint folders are named by time: the last is the latest
    with fs.open(latest, "rb") as f:
        return storage.protocol_prefix(run) + latest.rsplit("/", 1)[0], json.load(f)


def previous_facts(storage_path: str, name: str) -> dict | None:
    """The data facts of the run's latest checkpoint, None if the run has none."""
    latest = latest_checkpoint(storage_path, name)
    return latest[1].get("facts") if latest else None


def resumable_checkpoint(storage_path: str, name: str) -> tuple[str, dict] | None:
    """(folder, train_meta.json) of the checkpoint a rerun resumes from: the latest that Ray Train registered (a
    run stopped while reporting may leave a newer folder on storage that it never registered, and resumes from the
    one before); None before Ray Train registered any (Ray's record is written with the first)."""
    from ray.train import Result

    run = storage.join(absolute(storage_path), name)
    try:
        checkpoint = Result.from_path(run).checkpoint
    except RuntimeError:  # no run folder, or no checkpoint registered in it yet
        return None
    if checkpoint is None:
        return None
    folder = checkpoint.path if "://" in checkpoint.path else storage.protocol_prefix(run) + checkpoint.path
    return folder, json.loads(storage.read_bytes(storage.join(folder, META_FILE)))


def interrupted_line(cfg: TrainConfig) -> str:
    """Where a run stopped by SIGINT/SIGTERM stands: what a rerun of the same command resumes from."""
    latest = resumable_checkpoint(cfg.storage_path, cfg.name)
    if latest is None:
        return f"before the first checkpoint of run {cfg.name!r}; rerun the same command to start again"
    folder, meta = latest
    return (f"at step {meta.get('step')} of {cfg.end_step()} (checkpoint: {folder}); rerun the same command to "
            "resume from it")


def refuse_other_data(cfg: TrainConfig, facts: dict, problems) -> None:
    """A rerun of a run continues it; on other data (files, TA-Tok, VQ, ...) it would silently train on
    something else from a data position that means nothing there."""
    before = previous_facts(cfg.storage_path, cfg.name)
    if before is None:
        return
    now = json.loads(json.dumps(facts, default=str))  # as stored (tuples -> lists, int keys -> str)
    differ = sorted(k for k in set(now) | set(before) if before.get(k) != now.get(k))
    problems.check(not differ, f"--name {cfg.name}",
                   f"run {cfg.name!r} in {cfg.storage_path} was trained on other data ({', '.join(differ)} differ)",
                   "rerun it with its own --data and models, or give another --name to start a new run")


def finish_preflight(cfg: TrainConfig, problems, facts: dict, **plan) -> dict:
    """The end of every trainer's preflight: a rerun's data checked against its run's, every problem found raised
    at once (UsageError), and what the workers get: `plan` with the run's `facts`."""
    refuse_other_data(cfg, facts, problems)
    problems.raise_if_any()
    return {**plan, "facts": facts}


def fit(cfg: TrainConfig, loop, loop_config: dict, dataset) -> TrainSummary:
    """Run `loop` (a worker_loop partial) with Ray Train on `dataset` (split over the workers in a fixed
    order; or a dict of named datasets, each split so, or none, for a Task whose `epoch_rows` reads them);
    returns the summary of the latest checkpoint. Raises the run's error."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    quiet = not sys.stdout.isatty()
    if quiet:
        quiet_progress_bars()
    datasets = dataset if isinstance(dataset, dict) else {"train": dataset}
    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg.to_dict(), "quiet": quiet, "datasets": list(datasets), **loop_config},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.use_gpu else {})}),
        # gloo beside NCCL: the data positions are gathered as CPU tensors on checkpoints
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl") if cfg.use_gpu else None,
        run_config=RunConfig(name=cfg.name, storage_path=absolute(cfg.storage_path),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": QUIET_ENV} if quiet else None),
        datasets=datasets,
        # a deterministic order (and split across workers) is what makes resuming exact
        dataset_config=DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    # Without an error a run ends before its last step only when Ray Train's own SIGINT handler (fit() installs
    # it) aborted it: an interrupt, as SIGTERM is (nothing is exported; the driver says where the run stands)
    if result.checkpoint is None:
        raise KeyboardInterrupt("SIGINT")
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, META_FILE)) as f:
            meta = json.load(f)
    if meta["step"] < cfg.end_step():
        raise KeyboardInterrupt("SIGINT")
    return TrainSummary(steps=meta["step"], metrics=meta["history"][-1] if meta["history"] else {},
                        history=meta["history"], starts=meta["starts"],
                        checkpoint=storage.protocol_prefix(cfg.storage_path) + result.checkpoint.path)


# ----------------------------------------------------------------------------------------------------------
# Driver-side checks of the data, shared by the trainers


@dataclass
class Footer:
    path: str
    columns: list[str]
    num_rows: int
    meta: dict | None  # a code shard's metadata (tarflow.data.schema); None for a Parquet file without it
    error: str | None = None  # why the footer does not read, or why the code shard's metadata is wrong


def read_footers(files: list[str], check=None) -> list[Footer]:
    """Every file's Parquet footer (columns, rows, tarflow metadata), read in parallel: many shards on S3 want
    parallel reads, and nothing but the footers is read. `check(arrow_schema, path)` checks the tarflow metadata
    (default: a code shard's, schema.check_code_shard)."""
    from concurrent.futures import ThreadPoolExecutor

    def read(path: str) -> Footer:
        import pyarrow.parquet as pq

        from tarflow.data import schema

        try:
            fs, p = storage.filesystem(path)
            with fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                arrow_schema, num_rows = pf.schema_arrow, pf.metadata.num_rows
        except Exception as e:  # pyarrow and fsspec raise many kinds; all mean an unreadable file
            return Footer(path, [], 0, None, f"not a readable Parquet file ({type(e).__name__}: {e})")
        columns = list(arrow_schema.names)
        if (arrow_schema.metadata or {}).get(schema.PARQUET_META_KEY) is None:
            return Footer(path, columns, num_rows, None)
        try:
            return Footer(path, columns, num_rows, (check or schema.check_code_shard)(arrow_schema, path))
        except (schema.SchemaError, KeyError, TypeError) as e:
            return Footer(path, columns, num_rows, None, str(e).removeprefix(f"{path}: "))

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(read, files))


def check_one_tatok(footers: list[Footer], problems, expected: tuple[str, str] | None = None) -> str | None:
    """Every code shard must come from one TA-Tok (by sha256): codes of two tokenizers mean different things.
    `expected`: (sha256, the flag and path naming it) when a TA-Tok is given, else the most common one is taken
    as the data's. Offenders are listed on one line. Returns the data's TA-Tok sha256 (None without shards)."""
    shas = [f.meta["model"]["sha256"] for f in footers if f.meta]
    if not shas:
        return None
    ref = expected[0] if expected else max(sorted(set(shas)), key=shas.count)
    odd = [f for f in footers if f.meta and f.meta["model"]["sha256"] != ref]
    if odd:
        named = ", ".join(f"{f.path} ({f.meta['model']['sha256'][:12]})" for f in odd[:5])
        more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
        against = f"{expected[1]} (sha256 {ref[:12]})" if expected else \
            f"the other {len(shas) - len(odd)} shards' TA-Tok (sha256 {ref[:12]})"
        problems.add("--data", f"{len(odd)} of {len(shas)} code shards were tokenized by another TA-Tok than "
                               f"{against}: {named}{more}",
                     "train on shards of one TA-Tok: leave these out or tokenize them again with it"
                     + (" (or pass the TA-Tok that made them)" if expected else ""))
    return ref

