"""A training run seen from the driver: `fit` runs the worker loop with Ray Train (fixed data order, checkpoints
kept and registered, failures retried) and returns a TrainSummary; a rerun's data is checked against its run's
(`refuse_other_data`), and an interrupted run says where it stands (`interrupted_line`)."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass

from tarflow.data import storage
from tarflow.train.core import META_FILE, QUIET_ENV, TrainConfig, quiet_progress_bars


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
