"""Connecting to Ray the way a job expects.

Under `ray job submit` (or with RAY_ADDRESS / --address) the job joins that cluster. Otherwise it starts a
private local Ray with no dashboard, which is what `make run` and a laptop want.
"""
from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None, num_cpus: int | None = None, progress_bars: bool = True) -> None:
    import ray
    import ray.data

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                     object_store_memory=_local_object_store_bytes())
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars


def _local_object_store_bytes() -> int | None:
    """A small object store for a local run: Ray's default takes 30% of RAM, which a laptop needs."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    return int(min(2 << 30, max(256 << 20, total // 10)))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")


def run_job(run, cfg, summary_json: str | None, user_errors: tuple = ()) -> int:
    """Run a sharded job, print its summary (and keep it as JSON); exit status 2 for bad input or settings
    (the message says what and how to fix it), 1 when shards failed, 0 otherwise."""
    import json
    import sys

    from tarflow.data import storage
    from tarflow.models.checkpoint import CheckpointError
    from tarflow.pipelines.sharded import OutputConflict

    try:
        summary = run(cfg)
    except (CheckpointError, OutputConflict, FileNotFoundError, ValueError, *user_errors) as e:
        logging.getLogger("tarflow").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.render())
    if summary_json:
        storage.write_bytes_atomic(summary_json, json.dumps(summary.as_dict(), indent=2).encode())
    return 1 if summary.shards_failed else 0
