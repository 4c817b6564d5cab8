"""A torch checkpoint's structure without its tensor data: args, key names, shapes and dtypes.

The driver of a job needs a model's facts (its args, codebook size, grid) and the file's hash, never its
weights. `read_header` reads only the pickle record (`data.pkl`) of a torch zip checkpoint, through range
reads on object stores, and rebuilds every tensor on the `meta` device: shapes and dtypes without storage.
For a 2.4 GB `ta_tok.pth` that is a few hundred KB read and no memory to speak of. Unpickling goes through
torch's weights-only unpickler, so only plain containers and tensors are accepted, as in `read_checkpoint`.
"""
from __future__ import annotations

import io
import zipfile
from typing import Any

import torch

from tarflow.data import storage


class HeaderError(ValueError):
    pass


def _meta_storage(saved_id) -> torch.storage.TypedStorage:
    # torch's zip format: ('storage', storage_type, key, location, numel)
    if not isinstance(saved_id, tuple) or not saved_id or str(saved_id[0]) not in ("storage", "b'storage'"):
        raise HeaderError(f"unexpected persistent id {saved_id!r}")
    storage_type, _key, _location, numel = saved_id[1:5]
    dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
    return torch.storage.TypedStorage(int(numel), dtype=dtype, device="meta", _internal=True)


def read_header(path: str) -> Any:
    """The checkpoint at `path` (local or s3://) as saved, with every tensor a `meta` tensor."""
    from torch import _weights_only_unpickler

    fs, p = storage.filesystem(path)
    try:
        with fs.open(p, "rb", block_size=1 << 20) as f:
            with zipfile.ZipFile(f) as z:
                names = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if not names:
                    raise HeaderError(f"{path}: no data.pkl record; not a torch checkpoint")
                record = z.read(names[0])
    except zipfile.BadZipFile as e:
        raise HeaderError(f"{path}: not a torch zip checkpoint ({e})") from None
    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(record), encoding="utf-8")
    unpickler.persistent_load = _meta_storage
    try:
        return unpickler.load()
    except Exception as e:  # the weights-only unpickler raises UnpicklingError/RuntimeError on foreign objects
        raise HeaderError(f"{path}: its record does not unpickle as tensors and containers ({e})") from None
