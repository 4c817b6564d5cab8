"""The sharded-job core: what the tokenize, caption and generate jobs share.

One output per input shard, written whole by a worker, its manifest last; the driver only orchestrates.

    driver:  plan (one listing of _manifest/, parallel reads of the manifests that exist)
             -> Ray Data: job stages ... -> PartWriter (tasks: each block's rows to _parts/, one small
                metadata row per shard and block back to the driver)
             -> per finished shard, a finalize task (any node): reads its parts, dedupes by index, the job's
                writer writes the outputs, then the manifest, then the parts are removed
    driver:  counts, shard completion, object references; never a row's payload

A job's rows carry `shard`, `idx` (position in the shard) and `kind`: "sample", "end" (closes a shard;
`end_info` JSON holds `n_samples` and the reader's findings) or "failed" (a stage could not process this
shard's rows; `end_info` holds the reason). A shard is finalized once its end row and every index arrived;
a shard with a failed row, or rows missing when the stream ends, gets no manifest and is listed as failed,
so a rerun redoes it. Rows are keyed by (shard, idx): a replayed block cannot duplicate a sample.

Faults: a stage's exception fails only the shards of that batch (`guarded`); a lost worker or node makes Ray
retry its tasks and restart actors, and the parts already written are on shared storage; a killed driver
leaves parts and no manifest for unfinished shards, and the rerun removes the parts and redoes those shards.

Its modules, each one job: `rows` (the row protocol), `guard` (the per-batch guard) and `device_errors`
(poisoned accelerators), `plan` (done / to do / conflicting shards), `finalize` (parts and the finalize task),
`run` (the driver's loop), `summary` (JobSummary), `stall` (StallWatch), `pools` (actor pools sized from the
cluster). The names jobs use are importable from this package.
"""
from tarflow.pipelines.sharded.device_errors import DeviceErrors, is_device_poisoning
from tarflow.pipelines.sharded.finalize import (PartWriter, ShardJob, ShardParts, finalize_shard,
                                                read_parts)
from tarflow.pipelines.sharded.guard import guarded
from tarflow.pipelines.sharded.plan import OutputConflict, Plan, plan_shards
from tarflow.pipelines.sharded.pools import PoolPlan, check_pool_leaves_cpus, plan_pool
from tarflow.pipelines.sharded.rows import (dedupe_by_index, end_row, failed_row, read_failure_reason,
                                            rows_table, traceback_text)
from tarflow.pipelines.sharded.run import execute, file_log, run_sharded
from tarflow.pipelines.sharded.stall import DEFAULT_STALL_TIMEOUT_S, JobStalled, StallWatch
from tarflow.pipelines.sharded.summary import JobSummary

__all__ = ["DEFAULT_STALL_TIMEOUT_S", "DeviceErrors", "JobStalled", "JobSummary", "OutputConflict", "PartWriter",
           "Plan", "PoolPlan", "ShardJob", "ShardParts", "StallWatch", "check_pool_leaves_cpus", "dedupe_by_index",
           "end_row", "execute", "failed_row", "file_log", "finalize_shard", "guarded", "is_device_poisoning",
           "plan_pool", "plan_shards", "read_failure_reason", "read_parts", "rows_table", "run_sharded",
           "traceback_text"]
