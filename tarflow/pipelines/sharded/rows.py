"""The row protocol of every sharded job: sample rows carry (shard, idx, kind); an "end" row closes a shard
with its sample count, a "failed" row fails it with a reason (and the worker's traceback). Helpers to build
such rows and to put a shard's rows back in input order, each index once."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def end_row(shard: str, n_samples: int, **info) -> dict:
    """The row that closes a shard: after it and `n_samples` sample rows, the shard can be written."""
    return {"shard": shard, "idx": -1, "key": "", "kind": "end",
            "end_info": json.dumps({"n_samples": n_samples, **info})}


def failed_row(shard: str, reason: str, detail: str, error: BaseException | None = None) -> dict:
    """A row that fails a whole shard: no manifest is written, the summary lists the reason; the traceback of
    `error` goes with it to the driver, which keeps it in the job's log file."""
    info = {"reason": reason, "detail": str(detail)[:500]}
    if error is not None:
        info["traceback"] = traceback_text(error)
    return {"shard": shard, "idx": -1, "key": "", "kind": "failed", "end_info": json.dumps(info)}


def traceback_text(error: BaseException, limit: int = 8000) -> str:
    """The worker-side traceback of `error` (its end, where the cause is, if long)."""
    import traceback

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return text if len(text) <= limit else "...\n" + text[-limit:]


def read_failure_reason(e: BaseException) -> str:
    """The summary's reason for a shard whose reader raised `e`: the reader's own (img2dataset.ShardReadError:
    read_failed once transient errors outlasted the retries, not_found, corrupt_tar, ...), else
    `unexpected_error` (not retried: a bug or input the reader does not understand; traceback in the log file)."""
    return getattr(e, "reason", None) or "unexpected_error"


def rows_table(rows: list[dict], row_schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in row_schema.names} for r in rows], schema=row_schema)


def dedupe_by_index(table: pa.Table) -> pa.Table:
    """A shard's rows in input order, each index once (a replayed block must not duplicate samples)."""
    table = table.take(pc.sort_indices(table, [("idx", "ascending")]))
    idx = table.column("idx").to_numpy()
    if len(idx) > 1 and (idx[1:] == idx[:-1]).any():
        table = table.filter(pa.array(np.concatenate([[True], idx[1:] != idx[:-1]])))
    return table
