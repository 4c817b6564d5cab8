"""Decoding one image member into RGB, with a named reason for every way it can fail.

Conversion rules (documented in the README):
- Everything that Pillow opens is converted with `Image.convert("RGB")`, exactly as Tar's reference does: CMYK,
  palette, grayscale and 1-bit images convert; alpha is dropped (not composited), as the reference does.
- 16-bit grayscale (modes I;16*, and I from PNG) is scaled to 8 bits (>> 8) first; Pillow's own convert would
  clip every value above 255 to white.
- EXIF orientation is NOT applied by default: the reference and img2dataset (OpenCV, IMREAD_UNCHANGED) both
  ignore it, so Tar saw pixels as stored. `exif_transpose=True` rotates upright first; width/height are then
  those of the rotated image.
- An image whose width * height exceeds `max_pixels` is refused before its pixels are decoded
  (decompression-bomb guard; default Pillow's own limit).
"""
from __future__ import annotations

import io
import warnings

import numpy as np

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


class SampleError(Exception):
    """A sample that cannot be tokenized. `reason` is a short stable tag; `detail` is for humans."""

    def __init__(self, stage: str, reason: str, detail: str = ""):
        self.stage, self.reason, self.detail = stage, reason, detail
        super().__init__(f"{stage}/{reason}: {detail}" if detail else f"{stage}/{reason}")


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = False):
    """bytes -> PIL RGB image, or SampleError(stage='decode', reason=...)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) == 0:
        raise SampleError("decode", "empty_image", "image member has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        reason = "corrupt_image" if looks_like_image(data) else "not_an_image"
        raise SampleError("decode", reason, str(e)[:200]) from None
    except Image.DecompressionBombError as e:
        raise SampleError("decode", "decompression_bomb", str(e)[:200]) from None
    except Exception as e:  # malformed headers raise many types
        raise SampleError("decode", "corrupt_image", f"{type(e).__name__}: {e}"[:200]) from None
    w, h = im.size
    if w * h > max_pixels:
        raise SampleError("decode", "decompression_bomb", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    if w == 0 or h == 0:
        raise SampleError("decode", "corrupt_image", f"image has size {w}x{h}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except Image.DecompressionBombError as e:
        raise SampleError("decode", "decompression_bomb", str(e)[:200]) from None
    except Exception as e:
        raise SampleError("decode", "corrupt_image", f"{type(e).__name__}: {e}"[:200]) from None


_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def looks_like_image(data: bytes) -> bool:
    """Whether the bytes start like a known image format (then a decode failure means a damaged image)."""
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _to_rgb(im):
    from PIL import Image

    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        a = np.asarray(im).astype(np.uint32)
        im = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), mode="L")
    elif im.mode in ("I", "F"):
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")
