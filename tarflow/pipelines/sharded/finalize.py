"""Worker side of writing: PartWriter (the last stage) puts each block's rows in `_parts/`; a finalize task
per finished shard reads its parts (all, or one at a time for a streaming writer), has the job's writer write
the outputs, then the manifest, then drops the parts; idempotent when Ray retries it."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tarflow.data import storage
from tarflow.data.shards import ShardLayout
from tarflow.pipelines.sharded.rows import dedupe_by_index


PART_META_SCHEMA = pa.schema([pa.field("shard", pa.string()), pa.field("kind", pa.string()),
                              pa.field("path", pa.string()), pa.field("idx", pa.list_(pa.int64())),
                              pa.field("end_info", pa.string())])


class PartWriter:
    """Last Ray Data stage (CPU tasks): each block's sample rows go to `{parts}/{shard}/{first idx}-{uuid}
    .arrow` on the output's storage; only a metadata row per shard and block (path, indices) goes on to the
    driver, plus the end/failed control rows."""

    def __init__(self, parts_dir: str):
        self.parts_dir = parts_dir

    def __call__(self, batch: pa.Table) -> pa.Table:
        kinds = batch.column("kind")
        controls = batch.filter(pc.not_equal(kinds, "sample")).select(["shard", "kind", "end_info"]).to_pylist()
        # A shard of no samples (a tar with no members, a Parquet of only failed rows) still gets one part: an
        # empty table of this stage's schema, so that its writer has columns to write. Listed before the end
        # row, so that the driver has the part when the end row makes the shard ready.
        out = [self._empty_part(batch, r["shard"]) for r in controls
               if r["kind"] == "end" and json.loads(r["end_info"])["n_samples"] == 0]
        out += [{"shard": r["shard"], "kind": r["kind"], "path": None, "idx": None, "end_info": r["end_info"]}
                for r in controls]
        samples = batch.filter(pc.equal(kinds, "sample"))
        for shard in pc.unique(samples.column("shard")).to_pylist():
            part = samples.filter(pc.equal(samples.column("shard"), shard))
            idx = part.column("idx").to_pylist()
            path = storage.join(self.parts_dir, shard, f"{min(idx):09d}-{uuid.uuid4().hex[:12]}.arrow")
            storage.write_bytes_atomic(path, _ipc_bytes(part))
            out.append({"shard": shard, "kind": "part", "path": path, "idx": idx, "end_info": None})
        return pa.Table.from_pylist(out, schema=PART_META_SCHEMA)

    def _empty_part(self, batch: pa.Table, shard: str) -> dict:
        path = storage.join(self.parts_dir, shard, f"empty-{uuid.uuid4().hex[:12]}.arrow")
        storage.write_bytes_atomic(path, _ipc_bytes(batch.slice(0, 0)))
        return {"shard": shard, "kind": "part", "path": path, "idx": [], "end_info": None}


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def read_parts(paths: list[str]) -> pa.Table:
    tables = [_read_part(p) for p in paths]
    return pa.concat_tables(tables, promote_options="permissive")


class ShardParts:
    """A shard's rows as a streaming writer (`streams_parts = True`) gets them: `len()` rows, iterated as
    tables of at most one part each, in index order, each index once (as dedupe_by_index(read_parts(...))), so
    that its finalize task holds one part at a time, never the whole shard.

    Opening reads every part once for its `idx` column alone (the other columns' buffers are not decompressed);
    iterating reads each part again, once per run of consecutive indices it holds: once, unless the parts'
    index ranges interleave. So a part's bytes are read twice, the price of holding one at a time."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        idx, part, row = [], [], []
        for k, p in enumerate(self.paths):
            ids = _read_part(p, ["idx"]).column("idx").to_numpy()
            idx.append(ids)
            part.append(np.full(len(ids), k, np.int64))
            row.append(np.arange(len(ids), dtype=np.int64))
        idx, part, row = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (idx, part, row))
        order = np.argsort(idx, kind="stable")  # stable: of a replayed index, the first part's row is kept
        idx, self._part, self._row = idx[order], part[order], row[order]
        first = np.concatenate([[True], idx[1:] != idx[:-1]]) if len(idx) else np.zeros(0, bool)
        self._part, self._row = self._part[first], self._row[first]

    def __len__(self) -> int:
        return len(self._part)

    def __iter__(self):
        if not len(self._part):
            return
        cuts = np.flatnonzero(self._part[1:] != self._part[:-1]) + 1
        held = (None, None)  # (part number, its table): one part in memory at a time
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(self._part)]])):
            k = int(self._part[lo])
            if held[0] != k:
                held = (None, None)  # the last part dropped before the next is read
                held = (k, _read_part(self.paths[k]))
            rows = self._row[lo:hi]
            if (np.diff(rows) == 1).all():
                yield held[1].slice(int(rows[0]), hi - lo)  # a run in the part's own order: no copy
            else:
                yield held[1].take(pa.array(rows))


def _read_part(path: str, columns: list[str] | None = None) -> pa.Table:
    data = storage.read_bytes(path)
    if columns is None:
        return pa.ipc.open_stream(data).read_all()
    names = pa.ipc.open_stream(data).schema.names
    options = pa.ipc.IpcReadOptions(included_fields=[names.index(c) for c in columns])
    return pa.ipc.open_stream(data, options=options).read_all()


@dataclass
class ShardJob:
    """Everything a finalize task needs (pickled once per shard): the layout, the job's facts and sources,
    and the job's `writer(shard, rows, end, paths) -> ShardWritten`: `rows` is the shard's whole table, or a
    ShardParts (tables of one part at a time) for a writer whose `streams_parts` is True."""

    job: str
    layout: ShardLayout
    facts: dict
    sources: dict
    writer: Any
    schema_versions: dict = field(default_factory=dict)
    run: str = ""  # this run's id (its parts folder's name), recorded in each manifest it writes


def finalize_shard(spec: ShardJob, shard: str, shard_input: dict, part_paths: list[str], end: dict) -> dict:
    """Assemble a shard from its parts, write its outputs, then its manifest, then drop the parts.

    Idempotent: Ray retries this task when its node dies, possibly after the manifest was written and the parts
    dropped; a retry that finds its parts gone and this run's manifest in place reports that manifest."""
    import tarflow

    try:
        if getattr(spec.writer, "streams_parts", False):
            rows = ShardParts(part_paths)
        else:
            rows = dedupe_by_index(read_parts(part_paths)) if part_paths else None
    except FileNotFoundError:
        done = finished_by_this_run(spec, shard)
        if done is None:
            raise
        return done
    n = end["n_samples"]
    if (len(rows) if rows is not None else 0) != n:
        raise RuntimeError(f"shard {shard}: {0 if rows is None else len(rows)} rows assembled, expected {n}")
    paths = spec.layout.paths(shard)
    written = spec.writer(shard, rows, end, paths)
    complete = bool(end.get("complete", True))
    manifest = {
        "format": spec.layout.manifest_format, "version": spec.layout.manifest_version, "job": spec.job,
        "shard": shard, "run": spec.run, "input": dict(shard_input), "complete": complete,
        "incomplete_reason": None if complete else (end.get("detail") or None),
        "counts": written.counts, "totals": written.totals, **spec.facts, "sources": spec.sources,
        "schema": spec.schema_versions, "tarflow_version": tarflow.__version__, "outputs": written.outputs,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    extra = {k: v for k, v in end.items() if k not in ("n_samples", "complete", "detail")}
    if extra:
        manifest["extra"] = extra
    storage.write_bytes_atomic(paths["manifest"], json.dumps(manifest, indent=2).encode())
    for p in part_paths:
        try:
            storage.remove(p)
        except OSError:
            pass  # the run's parts folder is removed at its end anyway
    return shard_result(shard, complete, written.counts, written.totals, written.outputs)


def shard_result(shard: str, complete: bool, counts: dict, totals: dict, outputs: dict) -> dict:
    return {"shard": shard, "complete": complete, "counts": counts, "totals": totals,
            "bytes": sum(int(o.get("bytes", 0)) for o in outputs.values())}


def finished_by_this_run(spec: ShardJob, shard: str) -> dict | None:
    """The result of this shard's finalize, if this run already wrote its manifest (else None)."""
    try:
        m = json.loads(storage.read_bytes(spec.layout.paths(shard)["manifest"]))
    except (FileNotFoundError, ValueError):
        return None
    if not spec.run or m.get("run") != spec.run:
        return None
    return shard_result(shard, bool(m.get("complete")), m["counts"], m.get("totals", {}), m.get("outputs", {}))
