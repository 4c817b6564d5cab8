"""Stage variants for pipeline tests (imported by Ray workers by module name: the tests folder is on their
PYTHONPATH)."""
from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa

from tarflow.data.schema import GENERATED_ROWS
from tarflow.pipelines.generate import T2IGenerator
from tarflow.pipelines.sharded import guarded
from tarflow.pipelines.tokenize import TATokEncoder


class EncoderFailingOnShard(TATokEncoder):
    """Raises on every batch that holds a row of `bad_shard` (a library bug that leaves the device usable)."""

    def __init__(self, *a, bad_shard: str, **kw):
        super().__init__(*a, **kw)
        self.bad_shard = bad_shard

    @guarded("encode", "schema")
    def __call__(self, batch):
        if self.bad_shard in batch.column("shard").to_pylist():
            raise KeyError("a library bug on this shard (injected)")
        return super().__call__(batch)


POISON = "CUDA error: an illegal memory access was encountered (injected)"


class EncoderPoisoningTheDevice(TATokEncoder):
    """Raises a sticky CUDA error, as a poisoned device does: on every batch that holds the row `always` (a row
    that breaks the device whenever it runs), and on the first batch that holds the row `once` (a fault of the
    device, not of the row; `marker`, a file, records it). Appends {pid, keys} per batch it encodes to `log`."""

    def __init__(self, *a, always: str, once: str, marker: str, log: str, **kw):
        super().__init__(*a, **kw)
        self.always, self.once, self.marker, self.log = always, once, marker, log

    @guarded("encode", "schema")
    def __call__(self, batch):
        import json

        keys = batch.column("key").to_pylist()
        if self.always in keys:
            raise RuntimeError(POISON)
        if self.once in keys and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError(POISON)
        out = TATokEncoder.__call__.__wrapped__(self, batch)  # the encoder itself, without a second guard
        with open(self.log, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "keys": keys}) + "\n")
        return out


class FakeCaptioner:
    """No model: every sample's caption is `caption of KEY`."""

    def __init__(self, *a, **kw):
        pass

    def __call__(self, batch):
        from tarflow.data.schema import CAPTIONED_ROWS

        rows = batch.to_pylist()
        for r in rows:
            r.pop("codes", None)
            ok = r["kind"] == "sample"
            r.update(ok=ok, prompt="q" if ok else None, caption=f"caption of {r['key']}" if ok else None,
                     prompt_tokens=1 if ok else None, caption_tokens=3 if ok else None, finished=True if ok else None)
        return pa.Table.from_pylist(rows, schema=CAPTIONED_ROWS)


class EncoderWithBallast(TATokEncoder):
    """Adds `ballast_bytes` of payload to every row, as caption text or images would."""

    def __init__(self, *a, ballast_bytes: int, **kw):
        super().__init__(*a, **kw)
        self.ballast = b"x" * ballast_bytes

    def __call__(self, batch):
        out = super().__call__(batch)
        return out.append_column("ballast", pa.array([self.ballast] * len(out), pa.binary()))


class SlowEncoder(TATokEncoder):
    def __init__(self, *a, delay_s: float, **kw):
        super().__init__(*a, **kw)
        self.delay_s = delay_s

    def __call__(self, batch):
        time.sleep(self.delay_s)
        return super().__call__(batch)


class FakeGenerator(T2IGenerator):
    """No models: 8x8 pixels from the seed, slowly; records which manifests existed when each shard's requests
    were generated (to show that shards are written while later requests are still being processed)."""

    def __init__(self, *a, delay_s: float = 0.3, probe: str = "", output: str = "", wait_in: str = "",
                 wait_for: str = "", wait_s: float = 300.0, **kw):
        self.delay_s, self.probe, self.output = delay_s, probe, output
        # before generating shard `wait_in`'s rows, wait (up to wait_s) for manifest `wait_for`: a job that writes
        # shards while it generates gets there on any machine; one that writes only at the end never does
        self.wait_in, self.wait_for, self.wait_s = wait_in, wait_for, wait_s

    def __call__(self, batch):
        rows = batch.to_pylist()
        time.sleep(self.delay_s)
        manifests = os.path.join(self.output, "_manifest")
        if self.wait_for and any(r["shard"] == self.wait_in for r in rows):
            deadline = time.monotonic() + self.wait_s
            while time.monotonic() < deadline and not os.path.exists(os.path.join(manifests, self.wait_for)):
                time.sleep(0.2)
        done = sorted(os.listdir(manifests)) if os.path.isdir(manifests) else []
        for r in rows:
            r.update(ok=False, codes=None, codes_fix=None, width=None, height=None, pixels=None)
            if r["kind"] == "sample" and r["error_reason"] is None:
                px = np.random.default_rng(r["seed"]).integers(0, 255, (8, 8, 3), dtype=np.uint8)
                r.update(ok=True, codes=[1, 2, 3, 4], codes_fix="ok", width=8, height=8, pixels=px.tobytes())
                with open(self.probe, "a") as f:
                    f.write(f"{r['shard']} {','.join(done)}\n")
        return pa.Table.from_pylist(rows, schema=GENERATED_ROWS)


class EncoderReportingPlacement(SlowEncoder):
    """Appends {node, gpu_ids, pid} per batch to `log`: where the pool's actors ran. With `hold_until_nodes`, each
    batch waits (up to `hold_s`) until that many nodes have logged a batch: the work cannot all be done by the
    first actor before the autoscaler's second node is up, however slow the machine starts nodes."""

    def __init__(self, *a, log: str, hold_until_nodes: int = 0, hold_s: float = 240.0, **kw):
        super().__init__(*a, **kw)
        self.log = log
        self.hold_until_nodes = hold_until_nodes
        self.hold_s = hold_s

    def __call__(self, batch):
        import json

        import ray

        ctx = ray.get_runtime_context()
        with open(self.log, "a") as f:
            f.write(json.dumps({"node": ctx.get_node_id(), "gpu_ids": ray.get_gpu_ids(), "pid": os.getpid()}) + "\n")
        deadline = time.monotonic() + self.hold_s
        while self.hold_until_nodes and time.monotonic() < deadline:
            with open(self.log) as f:
                if len({json.loads(line)["node"] for line in f if line.strip()}) >= self.hold_until_nodes:
                    break
            time.sleep(0.5)
        self.hold_until_nodes = 0  # held once (seen or timed out): the rest of the run goes at full speed
        return super().__call__(batch)
