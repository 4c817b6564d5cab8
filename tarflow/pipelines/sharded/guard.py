"""The per-batch guard of every stage (`guarded`): an exception fails the shards of its batch alone, as
failed rows with the reason and traceback; a device-poisoning error goes to device_errors (the actor ends and
Ray restarts it)."""
from __future__ import annotations

import functools
import logging

import pyarrow as pa
import pyarrow.compute as pc

from tarflow.pipelines.sharded.device_errors import DeviceErrors, in_actor, is_device_poisoning
from tarflow.pipelines.sharded.rows import failed_row, rows_table

log = logging.getLogger("tarflow")


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
