"""Shared pieces of the benchmarks: synthetic shards, the single-process baseline, timing on CPU or GPU,
time budgets and results files."""
from __future__ import annotations

import io
import json
import os
import sys
import time
import traceback

import numpy as np


def photo_like_jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """`n` JPEGs of size x size that compress and decode like photos: crops of the bundled sample photos,
    resized, with noise so no two are the same."""
    from PIL import Image

    from tarflow.data.sample import sample_photos

    rng = np.random.default_rng(seed)
    bases = [Image.open(io.BytesIO(b)).convert("RGB") for _, b, _ in sample_photos()]
    out = []
    for i in range(n):
        im = bases[i % len(bases)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        a = np.asarray(im.crop((x, y, x + cw, y + ch)).resize((size, size), Image.BICUBIC), dtype=np.int16)
        a = np.clip(a + rng.integers(-8, 9, a.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(folder: str, jpegs: list[bytes], per_shard: int) -> list[str]:
    """img2dataset-style tars (jpg + txt + json per sample)."""
    import tarfile

    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(0, len(jpegs), per_shard):
        path = os.path.join(folder, f"{s // per_shard:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i, data in enumerate(jpegs[s:s + per_shard]):
                key = f"{s + i:09d}"
                for ext, payload in (("jpg", data), ("txt", f"photo {key}".encode()),
                                     ("json", json.dumps({"key": key, "url": f"http://x/{key}"}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def plain_loop(shard_folder: str, tatok: str, output: str, scales, batch_size: int, device="cpu",
               dtype="float32") -> tuple[int, float]:
    """Read, decode, encode, write in one process, one shard after another. Returns (images, seconds)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from tarflow.data.codeshard import CodeShardWriter, code_shard_layout
    from tarflow.data.img2dataset import resolve_inputs
    from tarflow.data.schema import tokenize_encoded_rows
    from tarflow.pipelines.image_stages import ImageDecoder, ShardReader
    from tarflow.pipelines.tokenize import TATokEncoder, TokenizeConfig, model_facts

    t0 = time.time()
    enc = TATokEncoder(tatok, scales, dtype=dtype, device=device)
    facts = model_facts(TokenizeConfig(input=shard_folder, output=output, tatok=tatok, scales=list(scales)))
    writer, layout = CodeShardWriter(facts), code_shard_layout(output)
    decoder = ImageDecoder(enc.model.input_size)
    n = 0
    for shard in resolve_inputs(shard_folder):
        raw = pa.concat_tables(list(ShardReader(chunk_size=10**9)(pa.Table.from_pylist([vars(shard)]))))
        samples = raw.filter(pc.equal(raw.column("kind"), "sample"))
        parts = []
        for i in range(0, len(samples), batch_size):
            parts.append(enc(decoder(samples.slice(i, batch_size))))
        table = pa.concat_tables(parts) if parts else tokenize_encoded_rows(scales, enc.model.codebook_size).empty_table()
        writer(shard.name, table, {}, layout.paths(shard.name))
        n += len(table)
    return n, time.time() - t0


def results_path(path: str | None, name: str) -> str | None:
    """Where a benchmark keeps its JSON: `path`, or $OUT/{name} on the device machine, or nowhere."""
    return path or (os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else None)


def sync(device) -> None:
    """Wait for the device's queued work (timings of CUDA work are meaningless without it)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn, device) -> float:
    """Seconds that `fn()` takes, its device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu"


class Budget:
    """A time budget: what is left of it, and whether a step that needs `need` seconds still fits."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = float(seconds), time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def fits(self, need: float) -> bool:
        return self.left() >= need


def error_tail(limit: int = 1500) -> str:
    """The current exception's traceback, its last `limit` characters (the frames nearest the error)."""
    return traceback.format_exc()[-limit:]


def free_device_memory() -> None:
    """Give cached GPU memory back after a measurement, so the next one starts from an empty device."""
    import gc

    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()


def compiler(device):
    """How a benchmark compiles: on GPU `torch.compile` as given; on CPU (the --tiny runs) Dynamo's capture
    with the eager backend, which traces the same code (graph breaks and unsupported code show up here too)
    without Inductor's C++ build, minutes on a 2-core machine."""
    import torch

    if str(device).startswith("cuda"):
        return torch.compile
    return lambda fn, mode=None, **kw: torch.compile(fn, backend="eager", **kw)


class Results:
    """One measurement's results: facts about the run, figures, and per variant an error (traceback tail) or
    the reason it was skipped. Saved to `path` after every change, so a run stopped at its time limit keeps
    what it had measured."""

    def __init__(self, name: str, path: str | None = None, **facts):
        self.path = path
        self.data = {"name": name, **facts, "figures": {}, "errors": {}, "skipped": {}}

    @property
    def figures(self) -> dict:
        return self.data["figures"]

    def save(self) -> None:
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=2)
            os.replace(tmp, self.path)

    def set(self, **facts) -> None:
        self.data.update(facts)
        self.save()

    def figure(self, **figures) -> None:
        self.figures.update(figures)
        self.save()

    def attempt(self, variant: str, fn, *, budget: Budget | None = None, need_s: float = 0.0):
        """fn(), or None with the error recorded (the other variants still run); skipped when the budget has
        less than `need_s` seconds left."""
        if budget is not None and not budget.fits(need_s):
            self.data["skipped"][variant] = (f"{max(budget.left(), 0):.0f} s left of the time budget; "
                                             f"this needs about {need_s:.0f} s")
            print(f"{variant}: skipped ({self.data['skipped'][variant]})", flush=True)
            self.save()
            return None
        try:
            return fn()
        except Exception as e:
            self.data["errors"][variant] = error_tail()
            print(f"{variant}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            self.save()
            return None
        finally:
            free_device_memory()
