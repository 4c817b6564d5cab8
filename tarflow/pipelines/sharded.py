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
from tarflow.data.shards import ShardLayout, facts_mismatch  # the output's layout and manifests: data code
# the autoscaler's limits, which no public Ray API gives: one module holds every private Ray name tarflow uses
from tarflow.pipelines.ray_private import autoscaler_max_resources, autoscaler_running
from tarflow.preflight import UsageError

log = logging.getLogger("tarflow")


class OutputConflict(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------
# Rows


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


def guarded(stage: str, row_schema: pa.Schema | str):
    """Decorate a stage's `__call__(batch) -> table`: an exception fails the shards of that batch (a failed
    row each, with the reason and the traceback), never the job. `row_schema` is the stage's output schema, or
    the name of the instance attribute holding it.

    An accelerator error that poisons the device (`is_device_poisoning`: every later call on it would fail too)
    instead ends the actor (see `DeviceErrors`): Ray restarts it and runs its batch again, up to
    DEVICE_ERROR_BATCH_ATTEMPTS times; then the batch runs a row at a time, and a row that poisons the device
    on its own is recorded failed alone (`device_error`), the others written."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(self, batch: pa.Table):
            out_schema = row_schema if isinstance(row_schema, pa.Schema) else None
            devices = DeviceErrors.for_batch(stage, batch)
            if devices is not None and devices.row_by_row:
                return devices.run_row_by_row(lambda b: call_guarded(b, fn, self, devices), batch,
                                              out_schema or getattr(self, row_schema))
            return call_guarded(batch, fn, self, devices)

        def call_guarded(batch, fn, self, devices=None):
            try:
                return fn(self, batch)
            except Exception as e:  # noqa: BLE001 - whatever a library raises on one batch stays with it
                if is_device_poisoning(e) and in_actor():
                    (devices or DeviceErrors(stage, batch)).poisoned(e)  # does not return
                shards = pc.unique(batch.column("shard")).to_pylist() if len(batch) else []
                log.warning("%s failed on shards %s: %s: %s", stage, shards, type(e).__name__, e)
                detail = f"{stage}: {type(e).__name__}: {e}"
                out_schema = row_schema if isinstance(row_schema, pa.Schema) else getattr(self, row_schema)
                return rows_table([failed_row(s, f"{stage}_failed", detail, e) for s in shards], out_schema)
        return call
    return wrap


# ----------------------------------------------------------------------------------------------------------
# Poisoned accelerators

# A batch whose run poisoned the device this many times runs a row at a time on its next attempt.
DEVICE_ERROR_BATCH_ATTEMPTS = 2
# A batch in which more rows than this poison the device on their own fails its shards instead (a rerun redoes
# them): the device, not the rows, is then the likely cause.
DEVICE_ERROR_MAX_BAD_ROWS = 4
_POISON_MARKERS = ("CUDA error", "HIP error", "device-side assert", "illegal memory access",
                   "unspecified launch failure", "misaligned address", "CUBLAS_STATUS_EXECUTION_FAILED",
                   "uncorrectable ECC error", "cudaErrorIllegalAddress", "cudaErrorLaunchFailure")
LEDGER_CONFIG_KEY = "tarflow_device_error_ledger"  # DataContext config: the run's ledger actor's name
_RESTARTED_ACTOR: bool | None = None


def is_device_poisoning(e: BaseException) -> bool:
    """A sticky accelerator error, after which every call on the device fails (the CUDA context is broken):
    an illegal memory access, a device-side assert, a launch failure. torch raises torch.AcceleratorError for
    them (torch >= 2.8), older torch a RuntimeError whose text says `CUDA error`. An out-of-memory error is not
    one (the next, smaller batch can run)."""
    text = str(e)
    if "out of memory" in text.lower() or type(e).__name__ == "OutOfMemoryError":
        return False
    return type(e).__name__ == "AcceleratorError" or any(m in text for m in _POISON_MARKERS)


def in_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - outside Ray: a plain call
        return False


def batch_key(stage: str, batch: pa.Table) -> str:
    """A batch's identity, the same when Ray runs it again: its stage and its rows' (shard, idx, kind)."""
    import hashlib

    cols = batch.select(["shard", "idx", "kind"]).to_pydict()
    return hashlib.sha256(json.dumps([stage, cols["shard"], cols["idx"], cols["kind"]]).encode()).hexdigest()[:32]


class DeviceErrorLedger:
    """A Ray actor (one per run, named in the DataContext; the driver makes it): which batches poisoned a device,
    how often, and which of their rows did so alone. It outlives the stage actors that Ray restarts."""

    def __init__(self):
        self.batches: dict[str, dict] = {}

    def record(self, key: str, row: list | None = None) -> dict:
        b = self.batches.setdefault(key, {"attempts": 0, "bad": []})
        if row is None:
            b["attempts"] += 1
        elif row not in b["bad"]:
            b["bad"].append(row)
        return b

    def get(self, key: str) -> dict | None:
        return self.batches.get(key)

    def poisoned_batches(self) -> int:
        return len(self.batches)


def start_device_error_ledger(run: str):
    """The run's DeviceErrorLedger (before the stages are built: the DataContext carries its name to them)."""
    import ray
    import ray.data

    name = f"tarflow-device-errors-{run}"
    ledger = ray.remote(DeviceErrorLedger).options(name=name, num_cpus=0, max_restarts=0).remote()
    ray.data.DataContext.get_current().set_config(LEDGER_CONFIG_KEY, name)
    return ledger


class DeviceErrors:
    """A stage actor's view of one batch in the run's DeviceErrorLedger."""

    def __init__(self, stage: str, batch: pa.Table, state: dict | None = None, ledger=None):
        self.stage, self.batch, self.ledger = stage, batch, ledger
        self.key = batch_key(stage, batch)
        self.state = state or {"attempts": 0, "bad": []}
        self.current_row: list | None = None  # [shard, idx] being run alone

    @classmethod
    def for_batch(cls, stage: str, batch: pa.Table) -> "DeviceErrors | None":
        """Only in an actor that Ray restarted (the only place a batch that poisoned a device runs again): this
        batch's record, or None."""
        global _RESTARTED_ACTOR
        try:
            import ray

            if _RESTARTED_ACTOR is None:  # once per process: a restarted actor is a new process
                _RESTARTED_ACTOR = in_actor() and bool(ray.get_runtime_context().was_current_actor_reconstructed)
            if not _RESTARTED_ACTOR:
                return None
            ledger = _ledger()
            if ledger is None:
                return None
            state = ray.get(ledger.get.remote(batch_key(stage, batch)))
        except Exception:  # noqa: BLE001 - no ledger (a stage used outside run_sharded): plain calls
            return None
        return cls(stage, batch, state, ledger) if state else None

    @property
    def row_by_row(self) -> bool:
        return self.state["attempts"] >= DEVICE_ERROR_BATCH_ATTEMPTS

    def poisoned(self, e: BaseException) -> None:
        """Record the poisoning and end this actor's process: Ray restarts the actor (Ray Data's pools set
        max_restarts=-1) and submits its unfinished batches to it again (max_task_retries=-1)."""
        import ray

        ledger = self.ledger or _ledger()
        where = f"row {self.current_row}" if self.current_row else f"batch of {len(self.batch)} rows"
        state = None
        if ledger is not None:
            try:
                state = ray.get(ledger.record.remote(self.key, self.current_row), timeout=60)
            except Exception as le:  # noqa: BLE001
                log.error("%s: could not record a device error (%s: %s)", self.stage, type(le).__name__, le)
        log.error("%s: the accelerator is poisoned (%s: %s) on a %s; ending this actor so that Ray restarts it "
                  "(%s)\n%s", self.stage, type(e).__name__, str(e)[:300], where,
                  f"attempt {state['attempts']} of this batch, rows failed alone: {state['bad']}" if state else
                  "no ledger: the batch is retried without bound", traceback_text(e))
        for h in logging.getLogger().handlers + log.handlers:
            try:
                h.flush()
            except Exception:  # noqa: BLE001
                pass
        import sys

        sys.stderr.flush()
        os._exit(1)  # not ray.actor.exit_actor(): an intended exit is never restarted

    def run_row_by_row(self, run, batch: pa.Table, out_schema: pa.Schema) -> pa.Table:
        """This batch poisoned the device DEVICE_ERROR_BATCH_ATTEMPTS times: each row on its own; the rows that
        did so alone before are recorded failed (`device_error`), unless too many did (then the shards fail)."""
        bad = {tuple(r) for r in self.state["bad"]}
        if len(bad) > DEVICE_ERROR_MAX_BAD_ROWS:
            shards = pc.unique(batch.column("shard")).to_pylist()
            detail = (f"{self.stage}: {len(bad)} rows of one batch poisoned the accelerator each on its own; the "
                      "device is the likely cause (check it: nvidia-smi, dmesg for Xid errors)")
            return rows_table([failed_row(s, "device_failed", detail) for s in shards], out_schema)
        outs = []
        for i in range(len(batch)):
            row = batch.slice(i, 1)
            r = row.select(["shard", "idx"]).to_pylist()[0]
            self.current_row = [r["shard"], r["idx"]]
            if tuple(self.current_row) in bad:
                outs.append(self.failed_alone(row.to_pylist()[0], out_schema))
            else:
                outs.append(run(row).select(out_schema.names).cast(out_schema))
        self.current_row = None
        return pa.concat_tables(outs) if outs else out_schema.empty_table()

    def failed_alone(self, r: dict, out_schema: pa.Schema) -> pa.Table:
        detail = (f"this row poisoned the accelerator on every attempt (its batch {DEVICE_ERROR_BATCH_ATTEMPTS} "
                  "times, then alone); see the job's log file for the error")
        out = {k: r.get(k) for k in out_schema.names}
        out.update(ok=False, error_stage=self.stage, error_reason="device_error", error_detail=detail)
        return rows_table([out], out_schema)


def _ledger():
    import ray
    import ray.data

    name = ray.data.DataContext.get_current().get_config(LEDGER_CONFIG_KEY)
    if not name:
        return None
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


def dedupe_by_index(table: pa.Table) -> pa.Table:
    """A shard's rows in input order, each index once (a replayed block must not duplicate samples)."""
    table = table.take(pc.sort_indices(table, [("idx", "ascending")]))
    idx = table.column("idx").to_numpy()
    if len(idx) > 1 and (idx[1:] == idx[:-1]).any():
        table = table.filter(pa.array(np.concatenate([[True], idx[1:] != idx[:-1]])))
    return table


# ----------------------------------------------------------------------------------------------------------
# Planning (the layout, manifests and facts: tarflow.data.shards)


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


# ----------------------------------------------------------------------------------------------------------
# Driver side


@dataclass
class JobSummary:
    job: str = "tarflow"
    unit: str = "samples"
    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    shards_empty: int = 0  # written shards of no samples (an img2dataset shard whose every download failed)
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
        self.shards_empty += c["samples_in"] == 0
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
        if self.shards_empty:
            lines.append(f"  empty shards (no samples; written, with a manifest saying 0): {self.shards_empty}")
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


DEFAULT_STALL_TIMEOUT_S = 1800.0
# The flags that size each job's actor pool: what a stalled job's message tells to change.
POOL_FLAGS = {"tokenize": ("--min-encoders", "--cpus-per-encoder", "--gpus-per-encoder"),
              "caption": ("--min-workers", "--cpus-per-worker", "--gpus-per-worker"),
              "generate": ("--min-workers", "--cpus-per-worker", "--gpus-per-worker")}


class JobStalled(UsageError):
    """No row reached the driver for --stall-timeout seconds and the cluster did not grow meanwhile: a setting
    to change (exit status 2), one line per point."""


class StallWatch:
    """Watches that rows keep reaching the driver. A Ray Data job can wait forever on resources the cluster will
    never have: after a node loss Ray restarts the lost actors on the survivors, and if they take every CPU there
    the reader, decoder and writer tasks never run (reproduced: 2 encoders x 0.5 CPU on a 1-CPU cluster never
    finish; on 2 CPUs, 12 s); or an actor asks for a resource no node type offers. Ray logs nothing then.

    Every `after_s` without rows it warns, with the cluster's free and total resources. After `stall_timeout_s`
    without rows (0: never), if the cluster's resources did not change in that time either (no node came or
    went: an autoscaler that is adding nodes resets the clock), it ends the job: JobStalled is raised in the
    main thread (by a signal, which interrupts whatever the main thread waits on), naming the resources and the
    flags to change."""

    def __init__(self, job: str, after_s: float, resources: Callable[[], tuple[dict, dict]] | None = None,
                 stall_timeout_s: float = 0.0):
        import threading

        self.job, self.after_s, self.stall_timeout_s = job, after_s, stall_timeout_s
        self.resources = resources or _ray_resources
        self.last = time.monotonic()
        self.warnings = 0
        self.stalled: list[str] | None = None  # the message's lines, once the job is ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tarflow-stall-watch", daemon=True)
        self._previous_handler = None

    def __enter__(self) -> "StallWatch":
        import signal
        import threading

        if self.stall_timeout_s > 0 and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGUSR1, self._raise_stalled)
        else:
            self.stall_timeout_s = 0.0  # only the main thread can be interrupted: warn only
        if self.after_s > 0 or self.stall_timeout_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import signal

        self._stop.set()
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None

    def beat(self) -> None:
        self.last = time.monotonic()

    def _raise_stalled(self, signum, frame):
        if self.stalled and not self._stop.is_set():
            raise JobStalled(self.stalled)

    def _held(self) -> tuple[str, dict | None]:
        try:
            free, total = self.resources()
            return ", ".join(f"{k} {free.get(k, 0):g} free of {total[k]:g}" for k in ("CPU", "GPU") if k in total), \
                {k: total.get(k, 0) for k in ("CPU", "GPU")}
        except Exception as e:  # noqa: BLE001 - the watch must not fail the job
            return f"resources unknown ({type(e).__name__})", None

    def _run(self) -> None:
        import signal
        import threading

        warned_at = 0.0
        sizes: list[tuple[float, dict | None]] = []  # (when, total resources) while no row arrives
        periods = [p for p in (self.after_s, self.stall_timeout_s) if p > 0]
        while not self._stop.wait(min(min(periods) / 4, 15.0)):
            now = time.monotonic()
            idle = now - self.last
            if idle < min(periods):
                sizes.clear()
                continue
            held, total = self._held()
            sizes.append((now, total))
            sizes[:] = [x for x in sizes if x[0] >= self.last]
            if self.stall_timeout_s > 0 and idle >= self.stall_timeout_s and total is not None:
                changed_at = max((t for (t, tot), (_, before) in zip(sizes[1:], sizes) if tot != before),
                                 default=self.last)
                if now - changed_at >= self.stall_timeout_s and sizes[0][0] <= now - self.stall_timeout_s * 0.5:
                    min_flag, cpus_flag, gpus_flag = POOL_FLAGS.get(self.job, ("the pool's minimum",
                                                                               "its CPUs per worker",
                                                                               "its GPUs per worker"))
                    self.stalled = [
                        f"{self.job}: no rows for {idle:.0f} s and the cluster did not grow meanwhile ({held}): "
                        "stopped; nothing is lost, rerun the same command to resume",
                        f"an actor pool may hold what the reading, decoding and writing tasks need: lower "
                        f"{min_flag} or {cpus_flag}, or add nodes; or a request no node can satisfy is pending "
                        f"(check {gpus_flag}, `ray status`)",
                        f"to wait longer: --stall-timeout SECONDS (default {DEFAULT_STALL_TIMEOUT_S:.0f}; 0: never "
                        "stop)"]
                    log.error("%s", " ".join(self.stalled))
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                    return
            if idle < self.after_s or self.after_s <= 0 or now - warned_at < self.after_s:
                continue
            warned_at = now
            self.warnings += 1
            log.warning("%s: no rows for %.0f s (%s). If nothing is free, an actor pool may hold what the other "
                        "stages need (after a node loss Ray restarts actors on the nodes left): lower the pool's "
                        "size or CPUs per worker, or add nodes; if resources are free, a request no node can "
                        "satisfy may be pending (`ray status`)", self.job, idle, held)


def file_log() -> logging.Logger:
    """The logger of the job's log file alone (see runtime.open_job_log): tracebacks stay off the output."""
    return logging.getLogger("tarflow.logfile")


def _ray_resources() -> tuple[dict, dict]:
    import ray

    return ray.available_resources(), ray.cluster_resources()


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
    --min-encoders 2 x 0.5 CPU on a 1-CPU cluster never finishes; min 1, max 2 does).

    Only what cannot run is refused. Actors that need GPUs run on GPU nodes and take those nodes' CPUs: the
    CPUs of nodes without GPUs stay for the tasks. The CPUs counted are those up now or, if more, those the
    autoscaler can add. Where an autoscaler runs but its limits cannot be read (the v1 autoscaler does not
    publish them), the check cannot know what will come up: it warns, and --stall-timeout ends the job if it
    does starve."""
    if cpus_per_worker <= 0:
        return
    held = pool.min_workers * cpus_per_worker
    cpu_only, on_gpu_nodes = _cpus_by_node_kind()
    if pool.gpus_per_worker > 0:
        left = cpu_only + max(0.0, on_gpu_nodes - held)
    else:
        left = cpu_only + on_gpu_nodes - held
    limits = autoscaler_max_resources()
    if limits.get("CPU"):
        left = max(left, limits["CPU"] - held)
    if left >= task_cpus or cpu_only + on_gpu_nodes <= 0:
        return
    where = "GPU nodes' " if pool.gpus_per_worker > 0 else ""
    problem = (f"{min_flag} {pool.min_workers} x {cpus_flag} {cpus_per_worker:g} holds {held:g} of this cluster's "
               f"{where}CPUs ({cpu_only + on_gpu_nodes:g} in all, {cpu_only:g} on nodes without GPUs), leaving less "
               f"than the {task_cpus:g} that reading, decoding and writing tasks need")
    if not limits and autoscaler_running():
        log.warning("%s, counting the nodes up now; this cluster's autoscaler may add more, but its limits cannot "
                    "be read, so the job goes on (if it starves, --stall-timeout ends it)", problem)
        return
    raise UsageError([f"{problem} (the job would wait forever): lower {min_flag} or {cpus_flag}, or add CPUs"])


def _cpus_by_node_kind() -> tuple[float, float]:
    """(CPUs of the alive nodes without GPUs, CPUs of those with GPUs)."""
    import ray

    cpu_only = on_gpu = 0.0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        if res.get("GPU", 0) > 0:
            on_gpu += res.get("CPU", 0.0)
        else:
            cpu_only += res.get("CPU", 0.0)
    return cpu_only, on_gpu
