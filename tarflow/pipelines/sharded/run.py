"""The driver's part of a sharded job: `run_sharded` names the run and builds the stages; `execute` streams
their small metadata rows, submits a finalize task per shard as soon as all its rows are written (at most
--max-writers at once), keeps the summary and logs progress; it never holds a row's payload."""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from tarflow.data import storage
from tarflow.pipelines.sharded.device_errors import start_device_error_ledger
from tarflow.pipelines.sharded.finalize import ShardJob, finalize_shard
from tarflow.pipelines.sharded.rows import traceback_text
from tarflow.pipelines.sharded.stall import DEFAULT_STALL_TIMEOUT_S, StallWatch
from tarflow.pipelines.sharded.summary import JobSummary

log = logging.getLogger("tarflow")


def file_log() -> logging.Logger:
    """The logger of the job's log file alone (see runtime.open_job_log): tracebacks stay off the output."""
    return logging.getLogger("tarflow.logfile")


@dataclass
class _Open:
    idx: set = field(default_factory=set)
    parts: list = field(default_factory=list)
    end: dict | None = None


def execute(ds, spec: ShardJob, inputs: Mapping[str, dict], summary: JobSummary, t0: float,
            max_writers: int = 8, progress_every_s: float = 10.0, finalize_fn=None, stall_warn_s: float = 300.0,
            stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> None:
    """Run the job's dataset (ending in a PartWriter stage), finalize each shard on a worker as soon as all
    its rows are written, keep the summary and log a line per finished shard plus periodic progress.

    The driver holds per open shard only its indices and part paths; at most `max_writers` finalize tasks
    run at once (they write several shards in parallel; more waiting ones slow the stream down)."""
    import ray

    finalize = ray.remote(num_cpus=0.25, max_retries=3, retry_exceptions=[OSError])(finalize_fn or finalize_shard)
    spec_ref = ray.put(spec)
    open_: dict[str, _Open] = {}
    failed: set[str] = set()
    inflight: dict = {}
    last = [time.time()]
    n_todo = len(inputs)

    def harvest(block: bool) -> None:
        if not inflight:
            return
        ready, _ = ray.wait(list(inflight), num_returns=1 if block else len(inflight), timeout=None if block else 0)
        for ref in ready:
            watch.beat()
            shard = inflight.pop(ref)
            try:
                done = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a shard that cannot be written fails alone
                cause = getattr(e, "cause", None) or e
                summary.fail(shard, f"write_failed: {type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]}")
                log.error("%s: shard %s could not be written: %s", summary.job, shard, cause)
                file_log().error("%s: shard %s could not be written:\n%s", summary.job, shard,
                                 traceback_text(e).rstrip())
                continue
            summary.account(done, time.time() - t0)
            c = done["counts"]
            log.info("%s: shard %s written (%d %s: %d ok, %d failed) [%d/%d]", summary.job, shard, c["samples_in"],
                     summary.unit, c["ok"], c["failed"], summary.shards_done, n_todo)
        if time.time() - last[0] > progress_every_s:
            last[0] = time.time()
            log.info("%s progress: %d/%d shards, %d %s (%d failed), %.1f %s/s", summary.job, summary.shards_done,
                     n_todo, summary.samples_in, summary.unit, summary.samples_failed,
                     summary.samples_in / max(time.time() - t0, 1e-9), summary.unit)

    def submit_ready(shard: str) -> None:
        o = open_[shard]
        if o.end is None or len(o.idx) < o.end["n_samples"]:
            return
        while len(inflight) >= max_writers:
            harvest(block=True)
        del open_[shard]
        inflight[finalize.remote(spec_ref, shard, inputs[shard], o.parts, o.end)] = shard

    with StallWatch(summary.job, stall_warn_s, stall_timeout_s=stall_timeout_s) as watch:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                watch.beat()
                summary.driver_bytes += batch.nbytes
                for r in batch.to_pylist():
                    shard = r["shard"]
                    if shard in failed:
                        continue
                    if r["kind"] == "failed":
                        info = json.loads(r["end_info"])
                        failed.add(shard)
                        open_.pop(shard, None)
                        summary.fail(shard, f"{info['reason']}: {info['detail']}")
                        log.error("%s: shard %s failed (%s); no manifest, a rerun redoes it", summary.job, shard,
                                  info["detail"][:300])
                        if info.get("traceback"):
                            file_log().error("%s: shard %s failed: %s\n%s", summary.job, shard, info["reason"],
                                             info["traceback"].rstrip())
                        continue
                    o = open_.setdefault(shard, _Open())
                    if r["kind"] == "end":
                        o.end = json.loads(r["end_info"])
                    else:
                        o.parts.append(r["path"])
                        o.idx.update(r["idx"])
                    submit_ready(shard)
                harvest(block=False)
            while inflight:
                harvest(block=True)
        except KeyboardInterrupt:
            summary.interrupted = True
            deadline = time.time() + 30  # shards being written finish: they are whole or absent either way
            try:
                while inflight and time.time() < deadline:
                    harvest(block=True)
            except KeyboardInterrupt:
                pass
            return
    for shard, o in open_.items():
        have = len(o.idx)
        want = o.end["n_samples"] if o.end else "?"
        summary.fail(shard, f"rows_missing: {have} of {want} rows arrived (a stage dropped them; see the log)")


def run_sharded(spec: ShardJob, inputs: Mapping[str, dict], build_stages: Callable[[list[str], str], Any],
                summary: JobSummary, t0: float, max_writers: int = 8, progress_every_s: float = 10.0,
                finalize_fn=None, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> JobSummary:
    """Plan-independent part of every job: a fresh parts folder for this run, the stages (a Ray Dataset of
    rows for the shards `todo`, made by `build_stages(todo, parts_dir)` and ending in PartWriter), the
    finalize tasks, then the parts folder removed. A job that gets no rows for `stall_timeout_s` while the
    cluster does not grow ends with JobStalled (see StallWatch)."""
    warn_if_local_output_on_many_nodes(spec.layout.output)
    storage.remove_tree(spec.layout.parts_root)  # a killed run's leftovers: their shards are redone now
    run = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    parts_dir = storage.join(spec.layout.parts_root, run)
    spec = replace(spec, run=run)
    ledger = start_device_error_ledger(run)
    try:
        ds = build_stages(list(inputs), parts_dir)
        execute(ds, spec, inputs, summary, t0, max_writers, progress_every_s, finalize_fn,
                stall_timeout_s=stall_timeout_s)
        poisoned = _ask(ledger.poisoned_batches)
        if poisoned:
            summary.extra["batches_that_poisoned_the_accelerator"] += poisoned
    finally:
        if not summary.interrupted:
            storage.remove_tree(spec.layout.parts_root)
        _end_actor(ledger)
    summary.seconds = time.time() - t0
    return summary


def _ask(method, timeout: float = 60):
    import ray

    try:
        return ray.get(method.remote(), timeout=timeout)
    except Exception:  # noqa: BLE001 - a figure for the summary, never the job's fate
        return None


def _end_actor(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001
        pass


def warn_if_local_output_on_many_nodes(output: str) -> None:
    import ray

    if storage.is_remote(output):
        return
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1:
        log.warning("--output %s is a local path and this cluster has %d nodes: workers write the shards, so it "
                    "must be a filesystem shared by every node (NFS, FUSE); otherwise use s3://", output, len(alive))
