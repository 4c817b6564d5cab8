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
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tarflow.data import schema, storage

log = logging.getLogger("tarflow")

PARTS_DIR = "_parts"


class OutputConflict(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------
# Rows


def end_row(shard: str, n_samples: int, **info) -> dict:
    """The row that closes a shard: after it and `n_samples` sample rows, the shard can be written."""
    return {"shard": shard, "idx": -1, "key": "", "kind": "end",
            "end_info": json.dumps({"n_samples": n_samples, **info})}


def failed_row(shard: str, reason: str, detail: str) -> dict:
    """A row that fails a whole shard: no manifest is written, the summary lists the reason."""
    return {"shard": shard, "idx": -1, "key": "", "kind": "failed",
            "end_info": json.dumps({"reason": reason, "detail": str(detail)[:500]})}


def rows_table(rows: list[dict], row_schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in row_schema.names} for r in rows], schema=row_schema)


def guarded(stage: str, row_schema: pa.Schema | str):
    """Decorate a stage's `__call__(batch) -> table`: an exception fails the shards of that batch (a failed
    row each, with the reason), never the job. `row_schema` is the stage's output schema, or the name of the
    instance attribute holding it."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(self, batch: pa.Table):
            try:
                return fn(self, batch)
            except Exception as e:  # noqa: BLE001 - whatever a library raises on one batch stays with it
                shards = pc.unique(batch.column("shard")).to_pylist() if len(batch) else []
                log.warning("%s failed on shards %s: %s: %s", stage, shards, type(e).__name__, e)
                detail = f"{stage}: {type(e).__name__}: {e}"
                out_schema = row_schema if isinstance(row_schema, pa.Schema) else getattr(self, row_schema)
                return rows_table([failed_row(s, f"{stage}_failed", detail) for s in shards], out_schema)
        return call
    return wrap


def dedupe_by_index(table: pa.Table) -> pa.Table:
    """A shard's rows in input order, each index once (a replayed block must not duplicate samples)."""
    table = table.take(pc.sort_indices(table, [("idx", "ascending")]))
    idx = table.column("idx").to_numpy()
    if len(idx) > 1 and (idx[1:] == idx[:-1]).any():
        table = table.filter(pa.array(np.concatenate([[True], idx[1:] != idx[:-1]])))
    return table


# ----------------------------------------------------------------------------------------------------------
# Layout, manifests, facts


@dataclass(frozen=True)
class ShardLayout:
    """Where a job writes: per shard the files named by `files` ({name: pattern with {shard}}), and
    `_manifest/{shard}.json` last. Manifests of every job share `format`, `version`, `shard`, `input`,
    `complete`, `counts` {samples_in, ok, failed, failed_by_reason}, `totals`, `outputs`, the job's facts at
    the top level, and `sources` (where the models were read from: informative, never compared)."""

    output: str
    files: tuple[tuple[str, str], ...]
    manifest_format: str
    manifest_version: int

    def paths(self, shard: str) -> dict[str, str]:
        out = {name: storage.join(self.output, *pattern.format(shard=shard).split("/"))
               for name, pattern in self.files}
        out["manifest"] = self.manifest_path(shard)
        return out

    def manifest_path(self, shard: str) -> str:
        return storage.join(self.output, schema.MANIFEST_DIR, f"{shard}.json")

    @property
    def parts_root(self) -> str:
        return storage.join(self.output, PARTS_DIR)

    def parse_manifest(self, data: bytes, path: str) -> dict | None:
        """A manifest's content, or None when it is unreadable (it is then redone; an atomic write never
        leaves one half-written, so this is damage from outside, logged)."""
        try:
            manifest = json.loads(data)
        except ValueError as e:
            log.warning("%s: manifest is not valid JSON (%s); the shard will be redone", path, e)
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != self.manifest_format:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise schema.SchemaError(f"{path}: format {found!r} is not {self.manifest_format}; is this output "
                                     "folder another job's? Use another --output")
        return manifest

    def read_manifest(self, shard: str) -> dict | None:
        path = self.manifest_path(shard)
        try:
            return self.parse_manifest(storage.read_bytes(path), path)
        except FileNotFoundError:
            return None


def facts_mismatch(facts: Mapping[str, Any], manifest: Mapping[str, Any], version: int) -> list[str]:
    """What differs between a job's facts and a finished shard's manifest ([] if nothing)."""
    if manifest.get("version") != version:
        return [f"manifest version {manifest.get('version')} (made by another tarflow) != {version}"]
    diffs = []
    for k, v in facts.items():
        diffs += _leaf_diffs(k, _jsonable(manifest.get(k)), _jsonable(v))
    return diffs[:6]


def _leaf_diffs(path: str, old, new) -> list[str]:
    """The dotted paths where two JSON values differ, with both values (shortened)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _leaf_diffs(f"{path}.{k}", old.get(k), new.get(k))
        return out
    return [] if old == new else [f"{path} {_short(old, 40)} != {_short(new, 40)}"]


def _jsonable(v):
    return json.loads(json.dumps(v, sort_keys=True, default=str))


def _short(v, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def file_identity(path: str) -> dict:
    """A model file's identity for facts: its content hash (memory-flat, cached per path/size/mtime)."""
    return {"sha256": storage.sha256(path)}


def folder_identity(path: str) -> dict:
    """A model folder's identity: one hash over its files' relative paths and content hashes, so the same
    model copied elsewhere is the same model and a model replaced at the same path is another one."""
    import hashlib

    root = path.rstrip("/")
    files = storage.list_sizes(root, recursive=True)
    if not files:
        raise FileNotFoundError(f"{path}: no files found there; check the path (s3:// needs AWS credentials)")
    entries = sorted((p[len(root) + 1:], storage.sha256(p)) for p in files
                     if not os.path.basename(p).startswith("."))
    return {"sha256": hashlib.sha256(json.dumps(entries).encode()).hexdigest()}


# ----------------------------------------------------------------------------------------------------------
# Planning


@dataclass
class Plan:
    todo: list[str]
    done: list[str]
    seconds: float = 0.0
    manifests_read: int = 0


def plan_shards(layout: ShardLayout, names: Iterable[str], facts: Mapping[str, Any],
                same_input: Callable[[str, Mapping], bool], overwrite: bool) -> Plan:
    """Split shard names into to-do and done with one listing of `_manifest/` and concurrent reads of only
    the manifests that exist (no request per missing shard: 100,000 shards plan in seconds). Manifests are read
    a chunk at a time and only the decision is kept, so the driver's memory does not grow with them.

    A finished shard whose manifest was made with other facts is a conflict: refused unless `overwrite`.
    A finished shard whose input changed (`same_input` false) or whose manifest is damaged is redone.
    The manifests of shards to redo are removed first, so a stale manifest never describes new outputs.
    """
    t0 = time.time()
    names = list(names)
    listed = {os.path.basename(p) for p in storage.list_sizes(storage.join(layout.output, schema.MANIFEST_DIR))}
    existing = {layout.manifest_path(n): n for n in names if f"{n}.json" in listed}
    del listed
    finished = set()
    conflicts, n_conflicts, redo = [], 0, []
    for path, data in storage.iter_read_many(list(existing)):
        name = existing[path]
        manifest = layout.parse_manifest(data, path) if data is not None else None
        if manifest is None:
            if data is not None:
                redo.append(name)
            continue
        diffs = facts_mismatch(facts, manifest, layout.manifest_version)
        if diffs and not overwrite:
            n_conflicts += 1
            if len(conflicts) < 10:  # the message names 10; a million conflicts must not fill the driver
                conflicts.append(f"{name}: {'; '.join(diffs)}")
        elif diffs or not same_input(name, manifest):
            redo.append(name)
        else:
            finished.add(name)
    if conflicts:
        raise OutputConflict(
            f"{layout.output} already holds shards made with other settings; refusing to mix outputs:\n  "
            + "\n  ".join(conflicts) + (f"\n  ... and {n_conflicts - 10} more" if n_conflicts > 10 else "")
            + "\nUse another --output, or pass --overwrite to redo these shards with the new settings.")
    storage.remove_many([layout.manifest_path(name) for name in redo])
    todo = [n for n in names if n not in finished]
    return Plan(todo=todo, done=[n for n in names if n in finished], seconds=time.time() - t0,
                manifests_read=len(existing))


# ----------------------------------------------------------------------------------------------------------
# Worker side: parts, assembly, writing


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
        out = [{"shard": r["shard"], "kind": r["kind"], "path": None, "idx": None, "end_info": r["end_info"]}
               for r in batch.filter(pc.not_equal(kinds, "sample")).select(["shard", "kind", "end_info"]).to_pylist()]
        samples = batch.filter(pc.equal(kinds, "sample"))
        for shard in pc.unique(samples.column("shard")).to_pylist():
            part = samples.filter(pc.equal(samples.column("shard"), shard))
            idx = part.column("idx").to_pylist()
            path = storage.join(self.parts_dir, shard, f"{min(idx):09d}-{uuid.uuid4().hex[:12]}.arrow")
            storage.write_bytes_atomic(path, _ipc_bytes(part))
            out.append({"shard": shard, "kind": "part", "path": path, "idx": idx, "end_info": None})
        return pa.Table.from_pylist(out, schema=PART_META_SCHEMA)


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def read_parts(paths: list[str]) -> pa.Table:
    tables = [pa.ipc.open_stream(storage.read_bytes(p)).read_all() for p in paths]
    return pa.concat_tables(tables, promote_options="permissive")


@dataclass
class ShardWritten:
    """What a job's writer reports for one shard; the core adds it to the manifest."""

    outputs: dict  # name -> {path, bytes, rows?}
    counts: dict  # samples_in, ok, failed, failed_by_reason
    totals: dict = field(default_factory=dict)


@dataclass
class ShardJob:
    """Everything a finalize task needs (pickled once per shard): the layout, the job's facts and sources,
    and the job's `writer(shard, rows, end, paths) -> ShardWritten`."""

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


def split_failed(rows: pa.Table, shard: str) -> tuple[pa.Table, pa.Table, dict]:
    """A shard's rows -> (the ok rows, the errors/ table of the failed ones, failed count by reason).

    Every job's rows carry `ok`, `key`, `error_stage`, `error_reason`, `error_detail`; all jobs write the same
    errors format."""
    import tarflow

    ok_mask = rows.column("ok")
    failed = rows.filter(pc.invert(ok_mask))
    errors = pa.table({
        "key": failed.column("key"),
        "shard": pa.array([shard] * len(failed), pa.string()),
        "stage": failed.column("error_stage"),
        "reason": failed.column("error_reason"),
        "detail": failed.column("error_detail"),
    }).cast(schema.with_metadata(schema.ERRORS_SCHEMA, schema.ERRORS_FORMAT, schema.ERRORS_VERSION,
                                 {"tarflow_version": tarflow.__version__}))
    return rows.filter(ok_mask), errors, dict(Counter(failed.column("error_reason").to_pylist()))


def parquet_bytes(table: pa.Table) -> bytes:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Driver side


@dataclass
class JobSummary:
    job: str = "tarflow"
    unit: str = "samples"
    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    shards_incomplete: list = field(default_factory=list)
    shards_failed: list = field(default_factory=list)
    failed_shard_reasons: dict = field(default_factory=dict)  # shard -> reason: detail
    samples_in: int = 0
    samples_ok: int = 0
    samples_failed: int = 0
    failed_by_reason: Counter = field(default_factory=Counter)
    extra: Counter = field(default_factory=Counter)  # job-specific totals, e.g. generated tokens
    output_bytes: int = 0
    seconds: float = 0.0
    plan_seconds: float = 0.0
    driver_bytes: int = 0  # bytes of metadata rows the driver received (the rows' payload stays on workers)
    output: str = ""
    interrupted: bool = False  # stopped by SIGINT/SIGTERM: shards not listed as done are redone by a rerun
    shard_times: list = field(default_factory=list, repr=False)  # (seconds since start, samples) per shard

    @property
    def images_per_s(self) -> float:
        return self.samples_in / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Throughput between the first and the last shard written: start-up (model loads) excluded."""
        if len(self.shard_times) < 2:
            return 0.0
        span = self.shard_times[-1][0] - self.shard_times[0][0]
        return sum(n for _, n in self.shard_times[1:]) / span if span > 0 else 0.0

    def account(self, done: Mapping, elapsed: float) -> None:
        c = done["counts"]
        self.shards_done += 1
        self.samples_in += c["samples_in"]
        self.samples_ok += c["ok"]
        self.samples_failed += c["failed"]
        self.failed_by_reason.update(c["failed_by_reason"])
        self.extra.update(done.get("totals", {}))
        self.output_bytes += done.get("bytes", 0)
        if not done["complete"]:
            self.shards_incomplete.append(done["shard"])
        self.shard_times.append((elapsed, c["samples_in"]))

    def fail(self, shard: str, reason: str) -> None:
        if shard not in self.failed_shard_reasons:
            self.shards_failed.append(shard)
            self.failed_shard_reasons[shard] = reason

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "shard_times"}
        d["failed_by_reason"] = dict(self.failed_by_reason)
        d["extra"] = dict(self.extra)
        d[f"{self.unit}_per_s"] = round(self.images_per_s, 2)
        d[f"steady_{self.unit}_per_s"] = round(self.steady_images_per_s, 2)
        return d

    def render(self) -> str:
        u = self.unit
        lines = [
            f"tarflow {self.job}: {self.shards_done} shards written, {self.shards_skipped} skipped (already done), "
            f"{len(self.shards_failed)} failed, of {self.shards_total}"
            + (" - INTERRUPTED: rerun the same command to finish" if self.interrupted else ""),
            f"  {u}: {self.samples_in} in = {self.samples_ok} ok + {self.samples_failed} failed",
        ]
        for reason, n in self.failed_by_reason.most_common():
            lines.append(f"    {reason:<22} {n}")
        for k, v in sorted(self.extra.items()):
            lines.append(f"  {k}: {v}")
        if self.shards_incomplete:
            lines.append(f"  incomplete input shards (kept what was readable): {', '.join(self.shards_incomplete)}")
        if self.shards_failed:
            lines.append("  FAILED shards (no manifest; a rerun redoes them):")
            for s in self.shards_failed[:20]:
                lines.append(f"    {s}: {self.failed_shard_reasons.get(s, '')}"[:300])
            if len(self.shards_failed) > 20:
                lines.append(f"    ... and {len(self.shards_failed) - 20} more (see --summary-json)")
        steady = f" ({self.steady_images_per_s:.1f} once started)" if self.steady_images_per_s else ""
        lines.append(f"  {self.images_per_s:.1f} {u}/s{steady} over {self.seconds:.1f} s; "
                     f"{self.output_bytes / 1e6:.2f} MB written to {self.output}")
        return "\n".join(lines)


class StallWatch:
    """Warns, every `after_s` while it lasts, that no row has reached the driver for `after_s` seconds, with the
    cluster's free and total resources. A Ray Data job can wait forever on resources the cluster will never
    have: after a node loss Ray restarts the lost actors on the survivors, and if they take every CPU there the
    reader, decoder and writer tasks never run (reproduced: 2 encoders x 0.5 CPU on a 1-CPU cluster never
    finish; on 2 CPUs, 12 s); or an actor asks for a resource no node type offers. Ray logs nothing then."""

    def __init__(self, job: str, after_s: float, resources: Callable[[], tuple[dict, dict]] | None = None):
        import threading

        self.job, self.after_s = job, after_s
        self.resources = resources or _ray_resources
        self.last = time.monotonic()
        self.warnings = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tarflow-stall-watch", daemon=True)

    def __enter__(self) -> "StallWatch":
        if self.after_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def beat(self) -> None:
        self.last = time.monotonic()

    def _run(self) -> None:
        warned_at = 0.0
        while not self._stop.wait(min(self.after_s / 4, 15.0)):
            idle = time.monotonic() - self.last
            if idle < self.after_s or time.monotonic() - warned_at < self.after_s:
                continue
            warned_at = time.monotonic()
            try:
                free, total = self.resources()
                held = ", ".join(f"{k} {free.get(k, 0):g} free of {total[k]:g}" for k in ("CPU", "GPU") if k in total)
            except Exception as e:  # noqa: BLE001 - the warning must not fail the job
                held = f"resources unknown ({type(e).__name__})"
            self.warnings += 1
            log.warning("%s: no rows for %.0f s (%s). If nothing is free, an actor pool may hold what the other "
                        "stages need (after a node loss Ray restarts actors on the nodes left): lower the pool's "
                        "size or CPUs per worker, or add nodes; if resources are free, a request no node can "
                        "satisfy may be pending (`ray status`)", self.job, idle, held)


def _ray_resources() -> tuple[dict, dict]:
    import ray

    return ray.available_resources(), ray.cluster_resources()


@dataclass
class _Open:
    idx: set = field(default_factory=set)
    parts: list = field(default_factory=list)
    end: dict | None = None


def execute(ds, spec: ShardJob, inputs: Mapping[str, dict], summary: JobSummary, t0: float,
            max_writers: int = 8, progress_every_s: float = 10.0, finalize_fn=None, stall_warn_s: float = 300.0) -> None:
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
                summary.fail(shard, f"write_failed: {type(cause).__name__}: {str(cause).splitlines()[0][:200]}")
                log.error("%s: shard %s could not be written: %s", summary.job, shard, cause)
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

    with StallWatch(summary.job, stall_warn_s) as watch:
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
                finalize_fn=None) -> JobSummary:
    """Plan-independent part of every job: a fresh parts folder for this run, the stages (a Ray Dataset of
    rows for the shards `todo`, made by `build_stages(todo, parts_dir)` and ending in PartWriter), the
    finalize tasks, then the parts folder removed."""
    warn_if_local_output_on_many_nodes(spec.layout.output)
    storage.remove_tree(spec.layout.parts_root)  # a killed run's leftovers: their shards are redone now
    run = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    parts_dir = storage.join(spec.layout.parts_root, run)
    spec = replace(spec, run=run)
    try:
        ds = build_stages(list(inputs), parts_dir)
        execute(ds, spec, inputs, summary, t0, max_writers, progress_every_s, finalize_fn)
    finally:
        if not summary.interrupted:
            storage.remove_tree(spec.layout.parts_root)
    summary.seconds = time.time() - t0
    return summary


def warn_if_local_output_on_many_nodes(output: str) -> None:
    import ray

    if storage.is_remote(output):
        return
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1:
        log.warning("--output %s is a local path and this cluster has %d nodes: workers write the shards, so it "
                    "must be a filesystem shared by every node (NFS, FUSE); otherwise use s3://", output, len(alive))


# ----------------------------------------------------------------------------------------------------------
# Pools that follow the cluster


@dataclass
class PoolPlan:
    gpus_per_worker: float
    min_workers: int
    max_workers: int

    @property
    def concurrency(self) -> tuple[int, int]:
        return (self.min_workers, self.max_workers)


def plan_pool(device: str = "auto", gpus_per_worker: float | None = None, min_workers: int | None = None,
              max_workers: int | None = None) -> PoolPlan:
    """The accelerator request and the bounds of an autoscaling actor pool, from what the cluster can offer,
    not from what happens to be up now: an autoscaling cluster that starts with 0 GPU nodes still gets GPU
    actors (the pending actors make the autoscaler add nodes), and the pool grows to every GPU the
    autoscaler's node types can offer.

    GPUs are requested when `gpus_per_worker` > 0, `device` is cuda, or (device auto) the cluster has or can
    add GPUs."""
    import ray

    present = ray.cluster_resources().get("GPU", 0)
    offered = autoscaler_max_resources().get("GPU", 0)
    if gpus_per_worker is None:
        wants_gpu = device.startswith("cuda") or (device == "auto" and (present or offered))
        gpus_per_worker = 1.0 if wants_gpu else 0.0
        if not wants_gpu and device == "auto":
            log.info("no GPU in the cluster now and none declared by its autoscaler: the models run on CPU. On "
                     "an autoscaling cluster that adds GPU nodes on demand, pass --device cuda")
    if gpus_per_worker:
        cap = max(present, min(offered, 4096))
        default_max = max(1, int(cap // gpus_per_worker))
    else:
        default_max = 1
    hi = max(1, max_workers or default_max)
    lo = max(1, min(min_workers or 1, hi))
    return PoolPlan(gpus_per_worker=float(gpus_per_worker), min_workers=lo, max_workers=hi)


def check_pool_leaves_cpus(pool: PoolPlan, cpus_per_worker: float, task_cpus: float, min_flag: str,
                           cpus_flag: str) -> None:
    """Refuse a pool whose minimum takes so many CPUs that no CPU task of the job (the largest asks `task_cpus`)
    fits beside it: Ray Data starts the minimum at once and the job then waits forever, silently (reproduced:
    --min-encoders 2 x 0.5 CPU on a 1-CPU cluster never finishes; min 1, max 2 does). The CPUs counted are
    those up now or, if more, those the autoscaler can add."""
    import ray

    from tarflow.preflight import UsageError

    cpus = max(ray.cluster_resources().get("CPU", 0.0), autoscaler_max_resources().get("CPU", 0.0))
    held = pool.min_workers * cpus_per_worker
    if cpus_per_worker > 0 and cpus > 0 and cpus - held < task_cpus:
        raise UsageError([f"{min_flag} {pool.min_workers} x {cpus_flag} {cpus_per_worker:g} holds {held:g} of this "
                          f"cluster's {cpus:g} CPUs, leaving less than the {task_cpus:g} that reading, decoding and "
                          f"writing tasks need (the job would wait forever): lower {min_flag} or {cpus_flag}, or "
                          f"add CPUs"])


def autoscaler_max_resources() -> dict:
    """The most of each resource the cluster's autoscaler may bring up ({} without an autoscaler)."""
    try:
        from ray._private.state import state

        return dict(state.get_max_resources_from_cluster_config() or {})
    except Exception:  # noqa: BLE001 - an older Ray, or no GCS-side config: behave as a static cluster
        return {}
