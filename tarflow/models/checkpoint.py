"""Reading checkpoints safely from local disk or object storage.

Every model of the family loads through here so that: checkpoints are never unpickled freely
(`torch.load(weights_only=True)` only), local and s3:// paths behave the same, and every failure names the
file and what is wrong with it instead of surfacing as a bare KeyError deep inside a model.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from tarflow.data import storage


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, of another format, or inconsistent."""

    def __init__(self, path: str, problem: str, fix: str | None = None):
        self.path, self.problem, self.fix = path, problem, fix
        msg = f"checkpoint {path}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)

    def __reduce__(self):  # rebuilt from its parts when Ray brings it back from an actor (args hold the message)
        return type(self), (self.path, self.problem, self.fix)


@dataclass
class LoadedCheckpoint:
    path: str
    obj: Any
    sha256: str
    nbytes: int


def read_checkpoint(path: str) -> LoadedCheckpoint:
    """Load `path` (local or any fsspec URL) with `torch.load(weights_only=True)` onto the CPU."""
    path = str(path)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise CheckpointError(path, "file not found", "check the path; s3:// paths need AWS credentials") from None
    except IsADirectoryError:
        raise CheckpointError(path, "is a folder, not a checkpoint file") from None
    if not data:
        raise CheckpointError(path, "file is empty (0 bytes)", "the download or copy was interrupted; fetch it again")
    digest = hashlib.sha256(data).hexdigest()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            problem = f"holds Python objects that are not plain tensors/containers ({text})"
            fix = "tarflow never unpickles arbitrary objects; re-save the checkpoint with plain tensors and dicts"
        else:
            problem = f"is truncated or not a torch checkpoint ({type(e).__name__}: {text})"
            fix = "the file is damaged or incomplete; fetch it again and compare its sha256"
        raise CheckpointError(path, problem, fix) from None
    return LoadedCheckpoint(path=path, obj=obj, sha256=digest, nbytes=len(data))


def unwrap_model_entry(ckpt: LoadedCheckpoint, required: tuple[str, ...]) -> Mapping[str, Any]:
    """Return `ckpt.obj['model']` after checking it is a dict holding `required` keys."""
    obj = ckpt.obj
    if not isinstance(obj, Mapping) or "model" not in obj:
        found = sorted(obj.keys())[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            ckpt.path,
            f"expected the reference format {{'model': {{{', '.join(repr(k) for k in required)}}}}}, found {found}",
            "is this the right kind of checkpoint for this model?",
        )
    entry = obj["model"]
    missing = [k for k in required if not isinstance(entry, Mapping) or k not in entry]
    if missing:
        found = sorted(entry.keys())[:8] if isinstance(entry, Mapping) else type(entry).__name__
        raise CheckpointError(
            ckpt.path,
            f"ckpt['model'] lacks {missing}; found {found}",
            "is this the right kind of checkpoint for this model?",
        )
    return entry


def load_state_dict_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: str) -> None:
    """`module.load_state_dict(sd, strict=True)` with an error that lists what disagrees."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs args {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and isinstance(sd[k], torch.Tensor) and tuple(sd[k].shape) != tuple(v.shape)
    ]
    not_tensor = [k for k in sd if not isinstance(sd[k], torch.Tensor)]
    if missing or unexpected or wrong or not_tensor:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:3]})")
        if not_tensor:
            parts.append(f"non-tensor entries {not_tensor[:3]}")
        raise CheckpointError(
            path,
            "args and tensors disagree: " + "; ".join(parts),
            "the checkpoint's args do not describe its weights, or the file belongs to another model",
        )
    module.load_state_dict(sd, strict=True)
