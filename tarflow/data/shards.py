"""What every sharded job's writer does besides its own columns (runs in a finalize task, formats in
tarflow.data.schema): splits the shard's rows into good rows and errors/ rows, writes each output atomically and
records it, writes errors/ last and reports the counts every manifest carries (ShardWritten).
"""
from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tarflow.data import schema, storage


@dataclass
class ShardWritten:
    """What a job's writer reports for one shard; the sharded-job core adds it to the manifest."""

    outputs: dict  # name -> {path, rows?, bytes}
    counts: dict  # samples_in, ok, failed, failed_by_reason
    totals: dict = field(default_factory=dict)


def errors_schema() -> pa.Schema:
    import tarflow

    return schema.with_metadata(schema.ERRORS_SCHEMA, schema.ERRORS_FORMAT, schema.ERRORS_VERSION,
                                {"tarflow_version": tarflow.__version__})


def split_failed(rows: pa.Table, shard: str) -> tuple[pa.Table, pa.Table, dict]:
    """A shard's rows -> (the ok rows, the errors/ table of the failed ones, failed count by reason).

    Every job's rows carry `ok`, `key`, `error_stage`, `error_reason`, `error_detail`; all jobs write the same
    errors format."""
    ok_mask = rows.column("ok")
    failed = rows.filter(pc.invert(ok_mask))
    errors = pa.table({
        "key": failed.column("key"),
        "shard": pa.array([shard] * len(failed), pa.string()),
        "stage": failed.column("error_stage"),
        "reason": failed.column("error_reason"),
        "detail": failed.column("error_detail"),
    }).cast(errors_schema())
    return rows.filter(ok_mask), errors, dict(Counter(failed.column("error_reason").to_pylist()))


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class ShardFiles:
    """One shard's outputs, as a job's writer makes them:

        files = ShardFiles(shard, paths)
        ok = files.add(rows)                  # the good rows; the failed ones kept for errors/ (call once per
                                              # part to stream a shard: only the failed rows' errors are kept)
        files.write_parquet("codes", table)   # paths["codes"], atomically; recorded with its rows and bytes
        files.wrote("tar", nbytes)            # an output the writer wrote itself
        return files.done(totals)             # errors/ written last; the ShardWritten

    `paths` are the layout's (ShardLayout.paths): one per output name, `errors` among them."""

    def __init__(self, shard: str, paths: Mapping[str, str]):
        self.shard, self.paths = shard, paths
        self.samples_in = self.ok = 0
        self.reasons: Counter = Counter()
        self.outputs: dict = {}
        self._errors: list[pa.Table] = []

    def add(self, rows: pa.Table) -> pa.Table:
        ok, errors, reasons = split_failed(rows, self.shard)
        self.samples_in += len(rows)
        self.ok += len(ok)
        self.reasons.update(reasons)
        if len(errors):
            self._errors.append(errors)
        return ok

    def write_parquet(self, name: str, table: pa.Table, rows: bool = True) -> int:
        data = parquet_bytes(table)
        storage.write_bytes_atomic(self.paths[name], data)
        self.wrote(name, len(data), len(table) if rows else None)
        return len(data)

    def wrote(self, name: str, nbytes: int, rows: int | None = None) -> None:
        self.outputs[name] = {"path": self.paths[name], **({"rows": rows} if rows is not None else {}),
                              "bytes": int(nbytes)}

    def done(self, totals: Mapping | None = None) -> ShardWritten:
        errors = pa.concat_tables(self._errors) if self._errors else errors_schema().empty_table()
        self.write_parquet("errors", errors)
        return ShardWritten(outputs=self.outputs, totals=dict(totals or {}),
                            counts={"samples_in": self.samples_in, "ok": self.ok, "failed": len(errors),
                                    "failed_by_reason": dict(self.reasons)})
