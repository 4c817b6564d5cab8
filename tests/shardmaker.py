"""Test helpers that make realistic (and deliberately broken) image shards.

Plain functions, no pytest fixtures; tests import this module as ``shardmaker``.

* :func:`sample_images` -- a few real photos shipped inside scikit-image, as JPEG bytes.
* :func:`build_with_img2dataset` -- runs the real ``img2dataset`` against a throw-away
  HTTP server on 127.0.0.1 and returns its output folder (``00000.tar``,
  ``00000.parquet``, ``00000_stats.json``, ...).
* :func:`write_tar` -- write a tar with exactly the given members, in order.
* :func:`bad_samples` -- hand-made samples for a "bad input" shard, with expected outcomes.
* :func:`truncate_file` -- cut a file to a fraction of its size (e.g. a tar cut mid-member).

Notes on img2dataset (1.47.0), checked against its source:

* ``resize_mode="no"`` alone still decodes with OpenCV and re-encodes (quality 95), so
  bytes change and EXIF is lost.  With ``skip_reencode=True`` (our default) and a JPEG
  source with ``encode_format="jpg"``, the downloaded bytes are stored unchanged (RGBA
  inputs are always re-encoded).  ``disable_all_reencoding=True`` would also keep bytes but
  leaves width/height as null.
* The ``sha256`` in the metadata is always that of the *downloaded* bytes.
* Tar members per sample are written sorted by extension (webdataset's TarWriter):
  ``{key}.jpg, {key}.json, {key}.txt`` but ``{key}.json, {key}.png, {key}.txt`` and
  ``{key}.json, {key}.txt, {key}.webp``.  Failed rows appear only in the sibling parquet, not in
  the tar.
* Keys are ``shard_id * 10**ceil(log10(number_sample_per_shard)) + row_index`` zero-padded
  to ``ceil(log10(number_sample_per_shard)) + 5`` digits: with 4 samples per shard that is
  6 digits (shard 0: 000000..000003, shard 1: 000010..), with 10000 it is 9 digits.
  Shard files are ``00000.tar`` etc. (5 digits).
* Sibling/output parquet columns: ``caption, url, key, status, error_message, width, height,
  original_width, original_height, exif, sha256`` (+ a binary column named after
  ``encode_format``, e.g. ``jpg``, for output_format="parquet"; there is no ``txt`` column,
  the caption is in ``caption``).  Failed rows have status "failed_to_download" and
  error_message "HTTP Error 404: Not Found".  ``exif`` is a JSON string ("{}" if none).
* A run takes ~7 s, mostly three Python processes importing img2dataset (torch via
  webdataset, wandb, cv2, albumentations); build once per test module/session if possible.
* Samples are fetched by a thread pool with ``imap_unordered``; we use one thread by
  default so the order of samples inside a tar is the url-list order.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading

from PIL import Image

__all__ = [
    "sample_images",
    "build_with_img2dataset",
    "write_tar",
    "bad_samples",
    "truncate_file",
    "DECOMPRESSION_BOMB_SIZE",
    "TEST_MAX_PIXELS",
]

# The "decompression_bomb" sample is DECOMPRESSION_BOMB_SIZE pixels (25 M pixels, a PNG of
# about 25 KB).  It is below PIL's default limit (~89 M pixels); tests must set their own
# pixel limit low, e.g. max_pixels=TEST_MAX_PIXELS (10 M), for it to be rejected.
DECOMPRESSION_BOMB_SIZE = (5000, 5000)
TEST_MAX_PIXELS = 10_000_000

_FIXED_MTIME = 1_700_000_000  # tar member mtime, for reproducible tars


# ----------------------------------------------------------------------------------------
# 1. real photos
# ----------------------------------------------------------------------------------------

# (skimage.data loader, output name, (width, height) to resize to or None, PIL mode, caption)
_SAMPLES = [
    ("astronaut", "astronaut", (320, 320), "RGB",
     "an astronaut in a white spacesuit posing in front of an american flag"),
    ("coffee", "coffee", None, "RGB",
     "a cup of coffee on a saucer with a spoon"),
    ("chelsea", "chelsea", None, "RGB",
     "a ginger tabby cat looking to the side"),
    ("rocket", "rocket", (384, 256), "RGB",
     "a rocket standing on its launch pad under a blue sky"),
    ("camera", "camera", (300, 300), "L",
     "a black and white photo of a man with a camera on a tripod"),
    ("horse", "horse", None, "L",
     "the black silhouette of a horse on a white background"),
    ("coins", "coins", None, "L",
     "a grayscale photo of old coins on a dark background"),
    ("immunohistochemistry", "immunohistochemistry", (256, 200), "RGB",
     "a microscope image of stained tissue cells"),
]


def _skimage_array(loader_name):
    from skimage import data  # local import: only needed here

    arr = getattr(data, loader_name)()
    if arr.dtype == bool:
        arr = (~arr).astype("uint8") * 255  # horse: True=horse -> black horse on white
    return arr


def _jpeg_bytes(img: Image.Image, quality: int = 90, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def sample_images() -> list[tuple[str, bytes, str]]:
    """Eight real photos from scikit-image as ``(name, jpeg_bytes, caption)``.

    Deterministic: same bytes on every call.  JPEG quality 90; three are grayscale (mode L);
    sizes differ (320x320, 600x400, 451x300, 384x256, 300x300, 400x328, 384x303, 256x200).
    """
    out = []
    for loader, name, size, mode, caption in _SAMPLES:
        img = Image.fromarray(_skimage_array(loader)).convert(mode)
        if size is not None:
            img = img.resize(size, Image.Resampling.LANCZOS)
        out.append((name, _jpeg_bytes(img), caption))
    return out


# ----------------------------------------------------------------------------------------
# 2. real img2dataset against a local HTTP server
# ----------------------------------------------------------------------------------------

class _QuietHandler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        body = self.routes.get(self.path.split("?", 1)[0])
        if body is None:
            self.send_error(404, "Not Found")
            return
        data, ctype = body
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # silence request logging
        pass


@contextlib.contextmanager
def _serve(routes: dict):
    """Serve ``{path: (bytes, content_type)}`` on 127.0.0.1:<free port>; yields base url."""
    handler = type("_Handler", (_QuietHandler,), {"routes": dict(routes)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


_CTYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

_RUNNER = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("ignore")
    import img2dataset
    if __name__ == "__main__":
        img2dataset.download(**json.loads(sys.argv[1]))
    """
)


def _offline_env(extra_path: str | None = None, tmpdir: str | None = None) -> dict:
    env = dict(os.environ)
    if tmpdir:
        # wandb makes tmp*wandb-media / tmp*wandb-artifacts dirs at import time and the
        # terminated pool workers never clean them up: keep them inside workdir.
        env.update(TMPDIR=tmpdir, TEMP=tmpdir, TMP=tmpdir)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(x for x in (extra_path, env.get("PYTHONPATH")) if x)
    no_proxy = "localhost,127.0.0.1,::1"
    for k in ("NO_PROXY", "no_proxy"):
        env[k] = ",".join(x for x in (env.get(k), no_proxy) if x)
    env.update(
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        WANDB_DISABLED="true",
        NO_ALBUMENTATIONS_UPDATE="1",
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore",
        TQDM_DISABLE="1",
    )
    return env


def build_with_img2dataset(
    workdir: str,
    items: list[tuple[str, bytes, str]],
    *,
    output_format: str = "webdataset",
    encode_format: str = "jpg",
    number_sample_per_shard: int = 4,
    extra_bad_urls: int = 0,
    skip_reencode: bool = True,
    resize_mode: str = "no",
    thread_count: int = 1,
    encode_quality: int | None = None,
    hide_torch: bool = True,
    timeout_s: float = 120.0,
) -> str:
    """Run the real ``img2dataset.download`` on ``items`` served from 127.0.0.1.

    ``items`` are ``(name, image_bytes, caption)`` (e.g. from :func:`sample_images`); the
    image format is sniffed from the bytes for the Content-Type / url suffix.  The url list
    is a parquet with columns ``url`` and ``caption`` (``caption_col="caption"``, so tars
    get ``.txt`` members).  ``extra_bad_urls`` urls answering 404 are interleaved at rows
    1, 3, 5, ... so they become ``failed_to_download`` rows in the sibling parquet.

    img2dataset runs in a subprocess (it installs a SIGINT handler and spawns processes;
    processes_count=1), wandb off.  Returns ``<workdir>/i2d_<output_format>`` holding
    ``00000.tar`` + ``00000.parquet`` + ``00000_stats.json`` ... (webdataset) or
    ``00000.parquet`` with the image bytes in a column named ``encode_format`` (parquet).
    Raises RuntimeError (with img2dataset's output) if it fails or exceeds ``timeout_s``.
    img2dataset's console output is kept in ``<workdir>/i2d_<output_format>.log``.

    ``hide_torch`` puts a stub ``torch`` package (raising ModuleNotFoundError) first on the
    subprocess's PYTHONPATH: webdataset then uses its torch-free fallbacks, which
    img2dataset's writer never needs, and each of the three processes starts ~1.5 s sooner.
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    out_dir = os.path.join(workdir, f"i2d_{output_format}")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)

    routes = {}
    good_rows = []
    for i, (name, data, caption) in enumerate(items):
        fmt = (_sniff_format(data) or "bin")
        path = f"/img/{i:03d}_{name}.{fmt}"
        routes[path] = (bytes(data), _CTYPES.get(fmt, "application/octet-stream"))
        good_rows.append((path, caption))
    rows = list(good_rows)
    for j in range(extra_bad_urls):
        bad = (f"/missing/{j:03d}.jpg", f"an image that no longer exists ({j})")
        rows.insert(min(2 * j + 1, len(rows)), bad)

    import pyarrow as pa
    import pyarrow.parquet as pq

    with _serve(routes) as base:
        url_list = os.path.join(workdir, f"urls_{output_format}.parquet")
        pq.write_table(
            pa.table({"url": [base + p for p, _ in rows], "caption": [c for _, c in rows]}),
            url_list,
        )
        kwargs = dict(
            url_list=url_list,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            output_folder=out_dir,
            output_format=output_format,
            encode_format=encode_format,
            # img2dataset's default 95 is rejected for png (there it is a 0-9 compression level)
            encode_quality=(9 if encode_format == "png" else 95) if encode_quality is None else encode_quality,
            resize_mode=resize_mode,
            skip_reencode=skip_reencode,
            number_sample_per_shard=number_sample_per_shard,
            processes_count=1,
            thread_count=thread_count,
            timeout=10,
            retries=0,
            enable_wandb=False,
            distributor="multiprocessing",
            # not "overwrite": that deletes output_folder/_tmp, which download() has just
            # created, and the run then hangs.  out_dir is fresh, so "incremental" is clean.
            incremental_mode="incremental",
        )
        extra_path = None
        if hide_torch:
            extra_path = os.path.join(workdir, "_i2d_notorch")
            os.makedirs(os.path.join(extra_path, "torch"), exist_ok=True)
            with open(os.path.join(extra_path, "torch", "__init__.py"), "w") as f:
                f.write('raise ModuleNotFoundError("torch hidden by shardmaker", name="torch")\n')
        tmpdir = os.path.join(workdir, "_i2d_tmp")
        os.makedirs(tmpdir, exist_ok=True)
        script = os.path.join(workdir, "_run_img2dataset.py")
        with open(script, "w") as f:
            f.write(_RUNNER)
        proc = subprocess.Popen(
            [sys.executable, script, json.dumps(kwargs)],
            cwd=workdir,
            env=_offline_env(extra_path, tmpdir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: its spawned workers die with it
        )
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()
            raise RuntimeError(
                f"img2dataset timed out after {timeout_s}s:\n"
                + stdout.decode("utf-8", "replace")[-4000:]
            ) from None
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    log = stdout.decode("utf-8", "replace")
    with open(os.path.join(workdir, f"i2d_{output_format}.log"), "w") as f:
        f.write(log)
    stats = [n for n in os.listdir(out_dir) if n.endswith("_stats.json")] if os.path.isdir(out_dir) else []
    if proc.returncode != 0 or not stats:
        raise RuntimeError(f"img2dataset failed (rc={proc.returncode}):\n{log[-4000:]}")
    return out_dir


def _sniff_format(data: bytes):
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


# ----------------------------------------------------------------------------------------
# 3. tar writing / 5. truncation
# ----------------------------------------------------------------------------------------

def write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    """Write an uncompressed tar with exactly ``members`` (name, bytes), in that order.

    Member metadata mimics webdataset's TarWriter (mode 0o444, user/group "bigdata"), with a
    fixed mtime so the file is reproducible.
    """
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            data = bytes(data)
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = _FIXED_MTIME
            ti.mode = 0o444
            ti.uname = ti.gname = "bigdata"
            tf.addfile(ti, io.BytesIO(data))


def truncate_file(path: str, keep_fraction: float) -> int:
    """Cut ``path`` to ``int(size * keep_fraction)`` bytes; returns the new size."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError("keep_fraction must be within [0, 1]")
    new_size = int(os.path.getsize(path) * keep_fraction)
    os.truncate(path, new_size)
    return new_size


# ----------------------------------------------------------------------------------------
# 4. hand-made bad samples
# ----------------------------------------------------------------------------------------

def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _base_rgb(size=(160, 120)) -> Image.Image:
    """A small deterministic RGB crop of chelsea the cat."""
    img = Image.fromarray(_skimage_array("chelsea")).convert("RGB")
    return img.resize(size, Image.Resampling.LANCZOS)


def _meta(key: str, caption: str, data: bytes | None, size, exif: dict | None = None) -> dict:
    w, h = size if size else (None, None)
    return {
        "caption": caption,
        "url": f"http://127.0.0.1:8000/img/{key}",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": w,
        "height": h,
        "original_width": w,
        "original_height": h,
        "exif": json.dumps(exif or {}),
        "sha256": hashlib.sha256(data).hexdigest() if data is not None else None,
    }


def bad_samples() -> list[tuple[str, list[tuple[str, bytes]], str]]:
    """Samples for a "bad input" shard: ``(key, members, expected_outcome)``.

    Keys are "000000000", "000000001", ... in order.  Members mimic img2dataset
    (``{key}.<ext>``, ``{key}.json``, ``{key}.txt``, sorted by name as img2dataset writes
    them, so .png/.webp come after .json; json has img2dataset's fields, indent=4).  ``expected_outcome`` is "ok" or one of:
    "corrupt_image" (truncated/garbled JPEG, PNG or WebP), "empty_image" (0-byte file),
    "not_an_image" (text named .jpg), "decompression_bomb" (25 M pixel PNG -- only with a
    pixel limit such as TEST_MAX_PIXELS = 10 M set by the test), "no_image" (.txt/.json
    only), "invalid_utf8_caption", "invalid_json".
    """
    base = _base_rgb()
    good_jpg = _jpeg_bytes(base)

    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))

    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0

    i16 = Image.fromarray(
        (_skimage_array("camera")[:120, :160].astype("uint16") * 257)
    )
    assert i16.mode == "I;16", i16.mode

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    exif_jpg = _jpeg_bytes(base, exif=exif.tobytes())

    png = _encode(base, "PNG")
    ihdr_end = 8 + 8 + 13 + 4  # signature + IHDR (len, type, 13 data bytes, crc)
    corrupt_png = png[:ihdr_end] + bytes((i * 131 + 7) % 256 for i in range(600))

    webp = _encode(base, "WEBP", quality=80)
    bomb = _encode(Image.new("L", DECOMPRESSION_BOMB_SIZE, 200), "PNG", optimize=True)

    # (ext, image bytes or None, caption bytes, json bytes or None (-> generated), size, outcome)
    specs = [
        ("jpg", good_jpg, "a ginger cat", None, base.size, "ok"),
        ("jpg", good_jpg[: len(good_jpg) // 2], "a truncated jpeg", None, base.size, "corrupt_image"),
        ("png", corrupt_png, "a png with garbage after its header", None, base.size, "corrupt_image"),
        ("webp", webp[: len(webp) // 2], "a truncated webp", None, base.size, "corrupt_image"),
        ("jpg", b"", "an empty file", None, None, "empty_image"),
        ("jpg", b"<html><body>404 Not Found</body></html>\n", "a text file named .jpg",
         None, None, "not_an_image"),
        ("jpg", _jpeg_bytes(base.convert("CMYK")), "a cmyk jpeg", None, base.size, "ok"),
        ("png", _encode(i16, "PNG"), "a 16-bit grayscale png", None, i16.size, "ok"),
        ("png", _encode(pal, "PNG"), "a palette png with transparency", None, pal.size, "ok"),
        ("png", _encode(rgba, "PNG"), "an rgba png", None, rgba.size, "ok"),
        ("jpg", exif_jpg, "a jpeg with exif orientation 6", None, base.size, "ok"),
        ("png", bomb, "a huge single-colour png", None, DECOMPRESSION_BOMB_SIZE, "decompression_bomb"),
        (None, None, "a sample without an image", None, None, "no_image"),
        ("jpg", good_jpg, b"\xff\xfe\xfa", None, base.size, "invalid_utf8_caption"),
        ("jpg", good_jpg, "a sample with broken json", b'{"key": "0000000", "caption": ',
         base.size, "invalid_json"),
    ]

    out = []
    for i, (ext, data, caption, json_bytes, size, outcome) in enumerate(specs):
        key = f"{i:09d}"
        txt = caption if isinstance(caption, bytes) else caption.encode("utf-8")
        if json_bytes is None:
            cap_str = caption if isinstance(caption, str) else caption.decode("utf-8", "replace")
            exif_dict = {"Image Orientation": "Rotated 90 CW"} if data is exif_jpg else None
            json_bytes = json.dumps(_meta(key, cap_str, data, size, exif_dict), indent=4).encode()
        members = []
        if ext is not None:
            members.append((f"{key}.{ext}", data))
        members.append((f"{key}.json", json_bytes))
        members.append((f"{key}.txt", txt))
        members.sort(key=lambda m: m[0])  # same order as img2dataset's tars
        out.append((key, members, outcome))
    return out
