"""Where a model runs and in which precision when a job says "auto": the one rule every model loader follows.

    device "auto" (or None): cuda when this process sees a GPU, else cpu
    dtype  "auto" (or None): bfloat16 on a CUDA device (as Tar's reference runs), float32 elsewhere
"""
from __future__ import annotations

import torch


def resolve_device_dtype(device: str | torch.device | None = "auto",
                         dtype: str | torch.dtype | None = "auto") -> tuple[torch.device, torch.dtype]:
    """(device, dtype) with "auto" resolved; the dtype follows the device's type, so "cuda:1" gets bfloat16 too."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None or dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype
