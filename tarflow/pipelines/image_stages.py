"""The stages that read and decode images on Ray Data: img2dataset shards (or conversation tables) -> raw bytes
(ShardReader, tasks) -> RGB uint8 at a model's input size (ImageDecoder, CPU tasks). The tokenize job's first two
stages, and what the TA-Tok trainer streams (`read_and_decode`); rows as tarflow.pipelines.sharded's protocol.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from hashlib import sha256
from typing import Iterator

import pyarrow as pa

from tarflow.data import schema
from tarflow.data.conversations import ConversationRow, iter_conversation_rows
from tarflow.data.images import DEFAULT_MAX_PIXELS, SampleError, decode_rgb
from tarflow.data.img2dataset import DEFAULT_MAX_MEMBER_BYTES, RawSample, ShardEnd, ShardInput, iter_samples
from tarflow.data.schema import (CONVERSATION_DECODED_ROWS, CONVERSATION_RAW_ROWS, TOKENIZE_DECODED_ROWS,
                                 TOKENIZE_RAW_ROWS)
from tarflow.pipelines.sharded import end_row, failed_row, guarded, read_failure_reason, rows_table

log = logging.getLogger("tarflow.tokenize")


class ShardReader:
    """Shard descriptions -> raw sample rows (bytes only), in chunks, then one "end" row per shard.

    Any exception while reading a shard (a read that failed after the reader's retries, a library error)
    fails that shard alone: a "failed" row with the reason instead of the end row."""

    MAX_CHUNK_BYTES = 256 << 20
    schema = TOKENIZE_RAW_ROWS

    def __init__(self, chunk_size: int = 64, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES):
        self.chunk_size, self.max_member_bytes = chunk_size, max_member_bytes

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for d in batch.to_pylist():
            shard = ShardInput(path=d["path"], name=d["name"], format=d["format"], size=d["size"])
            rows: list[dict] = []
            nbytes = 0
            try:
                for item in self._items(shard):
                    rows.append(self._row(shard.name, item))
                    nbytes += self._nbytes(item)
                    # by bytes too: a chunk of large members must stay far below Arrow's 2 GiB per array
                    if len(rows) >= self.chunk_size or nbytes >= self.MAX_CHUNK_BYTES:
                        yield pa.Table.from_pylist(rows, schema=self.schema)
                        rows, nbytes = [], 0
            except Exception as e:  # noqa: BLE001 - one bad shard must not stop the others
                reason = read_failure_reason(e)
                log.warning("shard %s failed while reading: %s: %s", shard.path, type(e).__name__, e)
                rows.append(failed_row(shard.name, reason, f"{shard.path}: {type(e).__name__}: {e}", e))
            yield rows_table(rows, self.schema)

    def _items(self, shard: ShardInput):
        return iter_samples(shard, max_member_bytes=self.max_member_bytes)

    @staticmethod
    def _nbytes(item) -> int:
        return len(getattr(item, "image", None) or b"")

    @staticmethod
    def _row(shard: str, item: RawSample | ShardEnd) -> dict:
        if isinstance(item, ShardEnd):
            return end_row(shard, item.n_samples, complete=item.complete, detail=item.detail, **item.extra)
        err = item.error or (None, None, None)
        return {"shard": shard, "idx": item.idx, "key": item.key, "kind": "sample", "error_stage": err[0],
                "error_reason": err[1], "error_detail": err[2], "image": item.image,
                "image_suffix": item.image_suffix, "txt": item.txt, "json": item.json}


class ImageDecoder:
    """Raw rows -> decoded rows: caption and metadata parsed, image decoded to RGB and resized to the TA-Tok
    input size as uint8 (TA-Tok's preprocessing up to the /255, which runs on the accelerator); with
    `vq_resolution`, also to that size for the pixel VQ, the same way; with `latent_resolution`, to that size
    for the VAE."""

    def __init__(self, input_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = False,
                 vq_resolution: int | None = None, latent_resolution: int | None = None):
        self.input_size, self.max_pixels, self.exif_transpose = input_size, max_pixels, exif_transpose
        self.vq_resolution, self.latent_resolution = vq_resolution, latent_resolution

    schema = TOKENIZE_DECODED_ROWS

    @guarded("decode", "schema")
    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        from tarflow.models.tatok import resize_uint8

        Image.MAX_IMAGE_PIXELS = None  # our own limit (max_pixels) applies, with a per-sample error
        out = []
        for r in batch.to_pylist():
            row = {k: r[k] for k in schema.ROW_FIELD_NAMES}
            row["ok"] = False
            if r["kind"] == "sample" and r["error_reason"] is None:
                try:
                    row.update(self._decode(r, resize_uint8))
                    row["ok"] = True
                except SampleError as e:
                    row.update(error_stage=e.stage, error_reason=e.reason, error_detail=e.detail)
            out.append(row)
        return pa.Table.from_pylist(out, schema=self.schema)

    def _decode(self, r: dict, resize_uint8) -> dict:
        caption = meta = url = None
        if r["txt"] is not None:
            try:
                caption = r["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise SampleError("decode", "invalid_utf8_caption", str(e)[:200]) from None
        if r["json"] is not None:
            try:
                meta = r["json"].decode("utf-8")
                parsed = json.loads(meta)
            except (UnicodeDecodeError, ValueError) as e:
                raise SampleError("decode", "invalid_json", str(e)[:200]) from None
            if isinstance(parsed, dict) and isinstance(parsed.get("url"), str):
                url = parsed["url"]
        data = r["image"]
        im = decode_rgb(data, max_pixels=self.max_pixels, exif_transpose=self.exif_transpose)
        return {"caption": caption, "meta": meta, "url": url, "sha256": sha256(data).hexdigest(),
                "width": im.width, "height": im.height,
                "pixels": resize_uint8(im, self.input_size).tobytes(),
                "vq_pixels": resize_uint8(im, self.vq_resolution).tobytes() if self.vq_resolution else None,
                "latent_pixels": (resize_uint8(im, self.latent_resolution).tobytes() if self.latent_resolution
                                  else None)}


class ConversationReader(ShardReader):
    """Conversation table files -> one raw row per conversation row (its images' bytes in order, its other
    columns in `passthrough`), in chunks by rows and bytes, then the file's "end" row (which carries the
    passthrough schema to the writer)."""

    schema = CONVERSATION_RAW_ROWS

    def __init__(self, chunk_size: int = 64, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 image_root: str | None = None):
        super().__init__(chunk_size, max_member_bytes)
        self.image_root = image_root

    def _items(self, shard: ShardInput):
        return iter_conversation_rows(shard, self.image_root, self.max_member_bytes)

    @staticmethod
    def _nbytes(item) -> int:
        return item.nbytes if isinstance(item, ConversationRow) else 0

    @staticmethod
    def _row(shard: str, item: ConversationRow | ShardEnd) -> dict:
        if isinstance(item, ShardEnd):
            return end_row(shard, item.n_samples, complete=item.complete, detail=item.detail, **item.extra)
        err = item.error or (None, None, None)
        return {"shard": shard, "idx": item.idx, "key": f"{item.idx:09d}", "kind": "sample", "error_stage": err[0],
                "error_reason": err[1], "error_detail": err[2], "images": item.images,
                "image_path": item.image_paths, "passthrough": item.passthrough}


class ConversationDecoder(ImageDecoder):
    """Raw conversation rows -> every image of a row decoded and resized as ImageDecoder does; any image that
    fails fails its row, with that image's reason."""

    schema = CONVERSATION_DECODED_ROWS

    def _decode(self, r: dict, resize_uint8) -> dict:
        images, n = r["images"], len(r["images"])
        decoded = []
        for k, data in enumerate(images):
            try:
                decoded.append(decode_rgb(data, max_pixels=self.max_pixels, exif_transpose=self.exif_transpose))
            except SampleError as e:
                path = r["image_path"][k]
                raise SampleError(e.stage, e.reason, f"image {k + 1} of {n}" + (f" ({path})" if path else "")
                                  + f": {e.detail}") from None
        return {"num_images": n, "image_sha256": [sha256(d).hexdigest() for d in images],
                "image_path": r["image_path"], "image_width": [im.width for im in decoded],
                "image_height": [im.height for im in decoded], "passthrough": r["passthrough"],
                "pixels": [resize_uint8(im, self.input_size).tobytes() for im in decoded]}

@dataclass
class ReadSettings:
    """How `read_and_decode` reads: the tokenize job's flags of these names (its TokenizeConfig has them all),
    with the job's defaults, for a caller that is not the job (the TA-Tok trainer)."""

    read_chunk: int = 64
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    max_concurrent_shards: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    exif_transpose: bool = False
    decode_batch_size: int = 32
    image_root: str | None = None


def read_and_decode(shards: list[ShardInput], cfg: ReadSettings, input_size: int, decode_cpus: float,
                    vq_resolution: int | None = None, latent_resolution: int | None = None):
    """The job's first two stages, also what the TA-Tok trainer streams: shard list --ShardReader (raw bytes)
    --ImageDecoder (RGB, resized to input_size as uint8) -> TOKENIZE_DECODED_ROWS, every shard's rows in order
    followed by its "end" row. Reads `cfg`'s read_chunk, max_member_bytes, max_concurrent_shards, max_pixels,
    exif_transpose and decode_batch_size."""
    return _read_and_decode(shards, cfg, ShardReader(cfg.read_chunk, cfg.max_member_bytes),
                            ImageDecoder(input_size, cfg.max_pixels, cfg.exif_transpose, vq_resolution,
                                         latent_resolution), decode_cpus)


def read_and_decode_conversations(shards: list[ShardInput], cfg: ReadSettings, input_size: int,
                                  decode_cpus: float):
    """read_and_decode for conversation tables: CONVERSATION_DECODED_ROWS, one per conversation row."""
    return _read_and_decode(shards, cfg, ConversationReader(cfg.read_chunk, cfg.max_member_bytes, cfg.image_root),
                            ConversationDecoder(input_size, cfg.max_pixels, cfg.exif_transpose), decode_cpus)


def _read_and_decode(shards: list[ShardInput], cfg: ReadSettings, reader: ShardReader, decoder, decode_cpus: float):
    import ray.data

    items = [{"path": s.path, "name": s.name, "format": s.format, "size": s.size} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(reader, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                        compute=ray.data.TaskPoolStrategy(size=max(1, min(cfg.max_concurrent_shards, len(items)))))
    return ds.map_batches(decoder, batch_size=cfg.decode_batch_size, batch_format="pyarrow", num_cpus=decode_cpus)
