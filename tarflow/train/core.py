"""The trainer core's worker side: the step loop every trainer runs (`worker_loop`), what a trainer supplies to
it (`Task`: its model, micro-batches, loss and metrics) and the flags every trainer shares (`TrainConfig`). The
driver side is tarflow.train.run; each worker's place in its data, tarflow.train.data_position.

    driver:  TrainConfig + facts of the data --> refuse a rerun on other data --> TorchTrainer.fit()
             (CheckpointConfig(num_to_keep=--keep-checkpoints), FailureConfig, the Ray Data stream split over
             the workers in a fixed order) --> TrainSummary from the latest checkpoint
    worker:  Task(cfg, config, device) supplies the model, its micro-batches and its loss; the core runs
             ModelParallel (DDP / FSDP2), AdamW + transformers' cosine schedule with warmup, gradient
             accumulation, per-step seeds, metrics (summed over the workers) every --log-every steps, and
             checkpoints every --checkpoint-every steps

A trainer is a `Task` subclass and a driver function that calls `run.fit`: the Tar MLLM (tarflow.train.mllm), the
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
from tarflow.train.data_position import LockstepBatches, epoch_rows, stream_batches

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
        return epoch_rows(shards["train"], self, self.cfg, state)

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

    def after_step(self, totals: dict) -> None:
        """Called on every worker once per step, after the optimiser step and the metric sums' all-reduce, in the
        same order everywhere: the place for a task's own collectives and updates (TA-Tok: the code-usage
        all-reduce and the dead-code restarts). It may add to the run's `totals`. Default: nothing."""

    def metrics(self, sums: dict, totals: dict, seconds: float) -> dict:
        """The reported numbers from summed metrics (no collective here: it is called once or twice a step)."""
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
    batches = LockstepBatches(stream_batches(shards, task, state), device)
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
        task.after_step(meta["totals"])
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
