"""What the de-tokenizer trainers share: code shards as training data, and the frozen TA-Tok that turns their
codes into conditions (rec features).

    driver:  --data -> code shard files (resolve_data); --tatok -> TATokHeader (header + streamed hash, no model)
    worker:  CodeRowsTask: micro-batches of rows as read, bad rows counted by reason (check_codes), the frozen
             TA-Tok decoder (frozen_decoder) that makes the condition features, the row metrics

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
from tarflow.train.core import Task

# check_codes' reasons, in the order of its codes 1, 2, 3 (a trainer may add its own after them)
CODE_SKIP_REASONS = ("missing", "length", "range")


def resolve_data(specs: list[str], problems: Problems) -> list[str]:
    """The code shard files of --data (a tokenize output: its finished shards), one problem line per bad spec."""
    from tarflow.data.codeshard import resolve_code_shards

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
        from tarflow.models.tatok import resolve_teacher, tatok_header

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


class CodeRowsTask(Task):
    """A de-tokenizer's task: micro-batches of `batch_size` rows as read (fixed size: every worker takes as many
    per epoch), bad rows dropped from a batch and counted by reason, the frozen TA-Tok decoder on the device.
    A subclass sets `sum_keys, total_keys = row_metric_keys(its reasons)` and supplies the model, the loss and
    `throughput`."""

    drop_last = True

    def __init__(self, cfg, config: dict, device, plan):
        super().__init__(cfg, config, device)
        self.read_rows = cfg.batch_size
        self.plan = plan
        self.tatok = frozen_decoder(cfg.tatok, device, bf16=device.type == "cuda" and cfg.optim.bf16)

    def batches(self, rows, epoch):
        for pos, table in rows:
            yield table, pos + len(table)

    @staticmethod
    def row_sums(n_rows: int, n_trained: int, skipped: dict[str, int]) -> dict:
        return {"rows_trained": n_trained, "rows": n_rows, **{f"skipped_{r}": n for r, n in skipped.items()}}

    def throughput(self, rows_per_s: float) -> dict:
        raise NotImplementedError

    def metrics(self, sums, totals, seconds):
        skipped = {k: int(v) for k, v in totals.items()}
        return {"loss": sums["loss_sum"] / sums["rows_trained"] if sums["rows_trained"] else float("nan"),
                "rows": int(sums["rows"]), "rows_trained": int(sums["rows_trained"]),
                **self.throughput(sums["rows_trained"] / max(seconds, 1e-9)),
                **skipped, "skipped_total": sum(skipped.values())}


def row_metric_keys(skip_reasons: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(sum_keys, total_keys) of a CodeRowsTask whose rows are skipped for `skip_reasons`."""
    skipped = tuple(f"skipped_{r}" for r in skip_reasons)
    return ("loss_sum", "rows_trained", "rows", *skipped), skipped
