"""Shared pieces of the tokenize benchmarks: synthetic shards and the single-process baseline."""
from __future__ import annotations

import io
import json
import os
import time

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
    from tarflow.pipelines.tokenize import (ImageDecoder, ShardReader, TATokEncoder, TokenizeConfig,
                                            encoded_schema, model_facts)

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
        table = pa.concat_tables(parts) if parts else encoded_schema(scales, enc.model.codebook_size).empty_table()
        writer(shard.name, table, {}, layout.paths(shard.name))
        n += len(table)
    return n, time.time() - t0


def write_results(res: dict, path: str | None, name: str) -> None:
    """Print the results as JSON and keep them in `path`, or in $OUT/{name} on the device machine."""
    out = path or (os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res))
