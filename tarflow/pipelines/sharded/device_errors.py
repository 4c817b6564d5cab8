"""Poisoned accelerators: a sticky device error (illegal memory access, device-side assert) ends the stage
actor so that Ray restarts it; a run-wide ledger actor counts each batch's attempts, runs a batch that keeps
poisoning a row at a time, and records the rows that poison the device alone as failed."""
from __future__ import annotations

import json
import logging
import os

import pyarrow as pa
import pyarrow.compute as pc

from tarflow.pipelines.sharded.rows import failed_row, rows_table, traceback_text

log = logging.getLogger("tarflow")

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
