"""What the de-tokenizer trainers share: code shards as training data, and the frozen TA-Tok that turns their
codes into conditions (rec features).

    driver:  --data -> code shard files (resolve_data); --tatok -> TATokHeader (header + streamed hash, no model)
    worker:  code column -> (codes, bad-row reasons) (check_codes); frozen_decoder(--tatok) -> condition features

The AR de-tokenizer (tarflow.train.ar_detok) and the diffusion de-tokenizer (tarflow.train.diffusion_detok) use
these; each keeps its own targets (VQ codes, VAE latents) and loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tarflow.data import storage
from tarflow.preflight import Problems

# check_codes' reasons, in the order of its codes 1, 2, 3 (a trainer may add its own after them)
CODE_SKIP_REASONS = ("missing", "length", "range")


def resolve_data(specs: list[str], problems: Problems) -> list[str]:
    """The code shard files of --data (a tokenize output: its finished shards), one problem line per bad spec."""
    from tarflow.pipelines.caption import resolve_code_shards

    files = []
    for spec in specs:
        try:
            files += [c.path for c in resolve_code_shards(spec)]
        except FileNotFoundError:
            problems.add(f"--data {spec}", "not found, or holds no code shards",
                         "give the tokenize job's output folder, a folder of code shards or shard files")
    return files


def check_codes(col: pa.ChunkedArray, n: int, codebook: int) -> tuple[np.ndarray, np.ndarray]:
    """-> codes (rows, n) int64 (zeros where bad), and per row 0 = good or 1 + the index of its reason in
    CODE_SKIP_REASONS (no codes, another length, a code outside the codebook)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(arr)
    bad = np.where(lengths.is_null().to_numpy(zero_copy_only=False), 1, 0)
    bad[(bad == 0) & (lengths.fill_null(0).to_numpy(zero_copy_only=False) != n)] = 2
    codes = np.zeros((len(arr), n), dtype=np.int64)
    rows = np.flatnonzero(bad == 0)
    if len(rows):
        values = pc.list_flatten(arr.filter(pa.array(bad == 0)))
        null = values.is_null().to_numpy(zero_copy_only=False).reshape(-1, n).any(1)
        v = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, n)
        out_of_range = ((v < 0) | (v >= codebook)).any(1)
        bad[rows[null]] = 1
        bad[rows[~null & out_of_range]] = 3
        codes[rows] = np.where((null | out_of_range)[:, None], 0, v)
    return codes, bad


@dataclass
class TATokHeader:
    """What the driver needs of a TA-Tok, from the checkpoint's header and a streamed hash: a real ta_tok.pth is
    2.4 GB, and building it on the driver would hold all of it."""

    sha256: str
    codebook_size: int
    grid: int
    hidden_size: int  # the rec features' width: the de-tokenizers' condition width

    @classmethod
    def read(cls, path: str) -> "TATokHeader":
        from tarflow.models.tatok import resolve_teacher
        from tarflow.pipelines.tokenize import tatok_header

        args, grid = tatok_header(path)
        return cls(sha256=storage.sha256(path), codebook_size=args.codebook_size, grid=grid,
                   hidden_size=resolve_teacher(args.teacher, path).hidden_size)

    def num_tokens(self, pool_scale: int) -> int:
        return (self.grid // pool_scale) ** 2


def check_tatok(path: str | None, problems: Problems) -> TATokHeader | None:
    """The --tatok of a de-tokenizer trainer, checked on the driver (None, with a problem, when unusable)."""
    from tarflow.models.checkpoint import CheckpointError

    if not path:
        problems.add("--tatok", "missing", "give the TA-Tok checkpoint that made the codes")
    elif not storage.exists(path):
        problems.add(f"--tatok {path}", "not found", "give the TA-Tok checkpoint (ta_tok.pth) that made the codes")
    else:
        try:
            return TATokHeader.read(path)
        except CheckpointError as e:
            problems.add(f"--tatok {path}", str(e).removeprefix(f"{path}: "))
    return None


def frozen_decoder(path: str, device, bf16: bool):
    """The TA-Tok on `device`, frozen, for its decoder (codes -> rec features): the SigLIP encoder is dropped,
    as it never runs here."""
    import torch

    from tarflow.models.tatok import TATok

    tatok = TATok.from_checkpoint(path)
    tatok.encoder = None
    return tatok.to(device, torch.bfloat16 if bf16 else torch.float32).requires_grad_(False).eval()
