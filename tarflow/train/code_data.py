"""What the de-tokenizer trainers share: code shards as training data, and the frozen TA-Tok that turns their
codes into conditions (rec features).

    driver:  --data -> code shard files (footers.code_shard_files), checked against the TA-Tok and the targets
             (plan_code_shards);
             --tatok -> TATokHeader (header + streamed hash, no model)
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

from tarflow.data import schema, storage
from tarflow.preflight import Problems
from tarflow.train.core import Task
from tarflow.train.footers import check_one_tatok, code_shard_files, read_footers

# check_codes' reasons, in the order of its codes 1, 2, 3 (a trainer may add its own after them)
CODE_SKIP_REASONS = ("missing", "length", "range")


@dataclass(frozen=True)
class Targets:
    """What a de-tokenizer learns to produce, as the code shards' footers describe it (an entry of their metadata
    with its `column` and the `sha256` of the model that made it)."""

    key: str  # the footer entry: "vq", "latents"
    model: str  # the model that made them, in messages: "VQ", "VAE"
    missing: str  # a shard without them
    tokenize_flags: str  # the tokenize job's flags that write them
    column_flag: str  # the trainer's flag that picks the column


def plan_code_shards(data: list[str], tatok: TATokHeader, tatok_flag: str, scales: list[int], scales_flag: str,
                     targets: Targets, column: str | None, problems: Problems | None = None
                     ) -> tuple[list[str], dict | None]:
    """(code shard files of --data, their `targets` footer entry): every shard from this TA-Tok, with every scale and
    targets of one setting (of `column`, when given). Problems (each naming the shards and the fix) go to
    `problems`; without it they are raised (UsageError) at the end. The entry is None when anything is wrong."""
    own = problems is None
    problems = problems if problems is not None else Problems()
    files = code_shard_files(data, problems)
    footers = read_footers(files)
    for f in footers:
        if f.error or f.meta is None:
            problems.add(f.path, f.error or "not a code shard (no tarflow metadata in its footer)",
                         f"give code shards written by the tokenize job (with --{targets.key})")
    shards = [f for f in footers if f.meta]
    check_one_tatok(shards, problems, (tatok.sha256, tatok_flag))
    for scale in scales:
        no_scale = [f.path for f in shards if scale not in f.meta["scales"]]
        if no_scale:
            problems.add(", ".join(no_scale[:5]), f"no {schema.code_column(scale)} column (the shards hold scales "
                         f"{shards[0].meta['scales'] if shards else []})",
                         f"choose {'another' if scales_flag == '--scale' else 'other'} {scales_flag} or tokenize at it")
    lacking = [f.path for f in shards if not f.meta.get(targets.key)]
    if lacking:
        problems.add(", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""),
                     targets.missing, f"re-run the tokenize job with {targets.tokenize_flags} --overwrite to make "
                     "training data")
    found = [(f.path, f.meta[targets.key]) for f in shards if f.meta.get(targets.key)]
    if column:
        wrong = [path for path, t in found if t["column"] != column]
        if wrong:
            problems.add(", ".join(wrong[:5]), f"no {targets.column_flag} {column} (they hold {found[0][1]['column']})",
                         f"leave out {targets.column_flag} to use the shards' own")
    settings = {(t["sha256"], t["column"]): path for path, t in found}
    if len(settings) > 1:
        problems.add("--data", f"shards of several {targets.model} settings: " + "; ".join(
            f"{path} has {c} from {targets.model} {sha[:12]}" for (sha, c), path in settings.items()),
            f"train on shards of one {targets.model} setting")
    if own:
        problems.raise_if_any()
    return files, (found[0][1] if found and not problems else None)


def data_plan_or_raise(cfg, tatok: TATokHeader | None, problems: Problems, plan_data):
    """A de-tokenizer trainer's `plan_data(cfg, tatok, problems)`, or UsageError with every problem found so far;
    without a usable --tatok only whether --data holds code shards is checked."""
    if tatok is None:
        code_shard_files(cfg.data, problems)
        problems.raise_if_any()
    plan = plan_data(cfg, tatok, problems)
    problems.raise_if_any()
    return plan


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
