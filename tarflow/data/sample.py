"""The bundled sample, created on first use, offline.

- A few real photos that scikit-image ships (public domain / CC0) with captions, written as img2dataset
  WebDataset shards (`00000.tar` + `00000.parquet` + `00000_stats.json`), so the tokenize job has something
  real to run on with no download.
- A prompt table of their captions, for the generate job's demo.

Both live under $TARFLOW_HOME (default ~/.cache/tarflow). The demo models (a small random TA-Tok, ...) made for
them: tarflow.models.demo.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from pathlib import Path

from tarflow.data.storage import tarflow_home

# (skimage.data function, caption)
SAMPLE_PHOTOS = [
    ("astronaut", "Portrait of astronaut Eileen Collins in an orange flight suit in front of the US flag."),
    ("coffee", "A cup of coffee on a saucer with a spoon, seen from above."),
    ("chelsea", "A tabby cat named Chelsea looking to the side."),
    ("rocket", "A rocket on the launch pad under a clear sky."),
    ("camera", "Black and white photo of a man with a camera on a tripod."),
    ("horse", "The black silhouette of a horse on a white background."),
    ("stereo_motorcycle", "A motorcycle parked in a garage."),
    ("hubble_deep_field", "The Hubble deep field: hundreds of distant galaxies on black."),
]
SAMPLES_PER_SHARD = 4


def sample_photos() -> list[tuple[str, bytes, str]]:
    """(name, JPEG bytes, caption) for each bundled photo; deterministic."""
    import numpy as np
    import skimage.data
    from PIL import Image

    out = []
    for name, caption in SAMPLE_PHOTOS:
        a = getattr(skimage.data, name)()
        if isinstance(a, tuple):
            a = a[0]
        if a.dtype == bool:  # the horse: True where the horse is
            a = np.where(a, 0, 255).astype(np.uint8)
        im = Image.fromarray(np.asarray(a))
        buf = io.BytesIO()
        im.convert("L" if im.mode in ("L", "I", "I;16", "F") else "RGB").save(buf, format="JPEG", quality=90)
        out.append((name, buf.getvalue(), caption))
    return out


def write_img2dataset_shards(folder: str | Path, photos: list[tuple[str, bytes, str]],
                             samples_per_shard: int = SAMPLES_PER_SHARD) -> list[Path]:
    """Write `photos` in img2dataset's WebDataset layout; return the tar paths.

    Keys follow img2dataset: shard_id * 10**ceil(log10(samples_per_shard)) + row, zero-padded to
    ceil(log10(samples_per_shard)) + 5 digits; `_stats.json` is written last, as img2dataset does.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = math.ceil(math.log10(samples_per_shard)) if samples_per_shard > 1 else 0
    key_stride = 10**digits
    tars = []
    for shard_id in range(math.ceil(len(photos) / samples_per_shard)):
        rows = []
        tar_path = folder / f"{shard_id:05d}.tar"
        with tarfile.open(tar_path, "w") as tar:
            for row, (name, data, caption) in enumerate(
                    photos[shard_id * samples_per_shard:(shard_id + 1) * samples_per_shard]):
                key = f"{shard_id * key_stride + row:0{digits + 5}d}"
                w, h = Image.open(io.BytesIO(data)).size
                meta = {"url": f"https://example.invalid/skimage/{name}.jpg", "caption": caption, "key": key,
                        "status": "success", "error_message": None, "width": w, "height": h,
                        "original_width": w, "original_height": h, "exif": None,
                        "sha256": hashlib.sha256(data).hexdigest()}
                for suffix, payload in (("jpg", data), ("txt", caption.encode()),
                                        ("json", json.dumps(meta, indent=4).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
                rows.append(meta)
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard_id:05d}.parquet")
        stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0,
                 "duration": 0.0, "status_dict": {"success": len(rows)}}
        (folder / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats, indent=4))
        tars.append(tar_path)
    return tars


def ensure_sample_shards(home: Path | None = None) -> Path:
    """The bundled sample's shard folder, created once."""
    folder = (home or tarflow_home()) / "sample" / "skimage-photos"
    expected = math.ceil(len(SAMPLE_PHOTOS) / SAMPLES_PER_SHARD)
    if not all((folder / f"{i:05d}_stats.json").exists() for i in range(expected)):
        write_img2dataset_shards(folder, sample_photos())
    return folder


# Where `make demo` (jobs/demo.py) and `make run` write their code shards: what the trainers read with no --data
DEMO_CODES = "out/demo/codes"
RUN_CODES = "out/tokenize-sample"
DEMO_QUESTION = "Describe the image shortly."


def ensure_demo_prompts(home: Path | None = None) -> Path:
    """A prompt table (JSONL: id, prompt) with the sample's captions, for the generate job's demo."""
    path = (home or tarflow_home()) / "sample" / "prompts.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [json.dumps({"id": name, "prompt": caption}) for name, caption in SAMPLE_PHOTOS]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(rows) + "\n")
        os.replace(tmp, path)
    return path
