"""What every tarflow job shares: one output per input shard, written whole, manifest last, resumable.

A job's Ray Dataset yields rows that carry `shard`, `idx` (position in the shard), `kind` ("sample" or
"end") and, on the end row, `end_info` (JSON with at least `n_samples`). The driver hands each batch to a
`ShardAssembler`; when a shard's end row and all its samples have arrived it gets the shard's rows in order,
each index once, and the job's writer writes the shard. Manifests share `counts` {samples_in, ok, failed,
failed_by_reason}, `outputs` {name: {bytes, ...}} and `complete`, so `JobSummary` can count any job.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tarflow.data import storage

log = logging.getLogger("tarflow")


class OutputConflict(RuntimeError):
    pass


def end_row(shard: str, n_samples: int, **info) -> dict:
    """The row that closes a shard: after it and `n_samples` sample rows, the shard can be written."""
    return {"shard": shard, "idx": -1, "key": "", "kind": "end",
            "end_info": json.dumps({"n_samples": n_samples, **info})}


class ShardAssembler:
    """Collects rows per shard; hands back a shard's full table once its end row and every sample arrived."""

    def __init__(self, row_schema: pa.Schema):
        self.row_schema = row_schema
        self.parts: dict[str, list[pa.Table]] = defaultdict(list)
        self.counts: Counter = Counter()
        self.ends: dict[str, dict] = {}

    def add(self, batch: pa.Table) -> list[tuple[str, pa.Table, dict]]:
        kinds = batch.column("kind")
        samples = batch.filter(pc.equal(kinds, "sample"))
        for shard in pc.unique(samples.column("shard")).to_pylist():
            part = samples.filter(pc.equal(samples.column("shard"), shard))
            self.parts[shard].append(part)
            self.counts[shard] += len(part)
        for r in batch.filter(pc.equal(kinds, "end")).select(["shard", "end_info"]).to_pylist():
            self.ends[r["shard"]] = json.loads(r["end_info"])
        done = []
        for shard in [s for s, e in self.ends.items() if self.counts[s] >= e["n_samples"]]:
            table = self._dedupe(shard)
            if len(table) == self.ends[shard]["n_samples"]:
                self.parts.pop(shard, None)
                self.counts.pop(shard, None)
                done.append((shard, table, self.ends.pop(shard)))
        return done

    def _dedupe(self, shard: str) -> pa.Table:
        """The shard's rows in input order, each index once (a replayed block must not duplicate samples)."""
        parts = self.parts.get(shard) or [self.row_schema.empty_table()]
        table = pa.concat_tables(parts, promote_options="permissive")
        table = table.take(pc.sort_indices(table, [("idx", "ascending")]))
        idx = table.column("idx").to_numpy()
        if len(idx) > 1 and (idx[1:] == idx[:-1]).any():
            table = table.filter(pa.array(np.concatenate([[True], idx[1:] != idx[:-1]])))
        self.parts[shard], self.counts[shard] = [table], len(table)
        return table

    def unfinished(self) -> list[str]:
        return sorted(set(self.parts) | set(self.ends))


def plan_shards(names: Iterable[str], manifest_path: Callable[[str], str], read_manifest: Callable[[str], dict | None],
                mismatch: Callable[[Mapping], list[str]], same_input: Callable[[str, Mapping], bool],
                overwrite: bool, output: str) -> tuple[list[str], list[str]]:
    """Split shard names into (to do, already done).

    A finished shard whose manifest was made with other settings (`mismatch` lists the differences) is a
    conflict: refused unless `overwrite`. A finished shard whose input changed (`same_input` false) is redone.
    The manifests of shards to redo are removed first, so a stale manifest never describes new outputs.
    """
    todo, done, conflicts = [], [], []
    for name in names:
        manifest = read_manifest(manifest_path(name))
        if manifest is None:
            todo.append(name)
            continue
        diffs = mismatch(manifest)
        if diffs and not overwrite:
            conflicts.append(f"{name}: {'; '.join(diffs)}")
        elif diffs or not same_input(name, manifest):
            todo.append(name)
        else:
            done.append(name)
    if conflicts:
        raise OutputConflict(
            f"{output} already holds shards made with other settings; refusing to mix outputs:\n  "
            + "\n  ".join(conflicts[:10]) + ("\n  ..." if len(conflicts) > 10 else "")
            + "\nUse another --output, or pass --overwrite to redo these shards with the new settings.")
    for name in todo:
        storage.remove(manifest_path(name))
    return todo, done


@dataclass
class JobSummary:
    job: str = "tarflow"
    unit: str = "samples"
    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    shards_incomplete: list = field(default_factory=list)
    shards_failed: list = field(default_factory=list)
    samples_in: int = 0
    samples_ok: int = 0
    samples_failed: int = 0
    failed_by_reason: Counter = field(default_factory=Counter)
    extra: Counter = field(default_factory=Counter)  # job-specific totals, e.g. generated tokens
    output_bytes: int = 0
    seconds: float = 0.0
    output: str = ""
    interrupted: bool = False  # stopped by SIGINT/SIGTERM: shards not listed as done are redone by a rerun
    shard_times: list = field(default_factory=list, repr=False)  # (seconds since start, samples) per shard

    @property
    def images_per_s(self) -> float:
        return self.samples_in / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Throughput between the first and the last shard written: start-up (model loads) excluded."""
        if len(self.shard_times) < 2:
            return 0.0
        span = self.shard_times[-1][0] - self.shard_times[0][0]
        return sum(n for _, n in self.shard_times[1:]) / span if span > 0 else 0.0

    def account(self, manifest: Mapping, elapsed: float) -> None:
        c = manifest["counts"]
        self.shards_done += 1
        self.samples_in += c["samples_in"]
        self.samples_ok += c["ok"]
        self.samples_failed += c["failed"]
        self.failed_by_reason.update(c["failed_by_reason"])
        self.extra.update(manifest.get("totals", {}))
        self.output_bytes += sum(o.get("bytes", 0) for o in manifest["outputs"].values())
        if not manifest["complete"]:
            self.shards_incomplete.append(manifest["shard"])
        self.shard_times.append((elapsed, c["samples_in"]))

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "shard_times"}
        d["failed_by_reason"] = dict(self.failed_by_reason)
        d["extra"] = dict(self.extra)
        d[f"{self.unit}_per_s"] = round(self.images_per_s, 2)
        d[f"steady_{self.unit}_per_s"] = round(self.steady_images_per_s, 2)
        return d

    def render(self) -> str:
        u = self.unit
        lines = [
            f"tarflow {self.job}: {self.shards_done} shards written, {self.shards_skipped} skipped (already done), "
            f"{len(self.shards_failed)} failed, of {self.shards_total}",
            f"  {u}: {self.samples_in} in = {self.samples_ok} ok + {self.samples_failed} failed",
        ]
        for reason, n in self.failed_by_reason.most_common():
            lines.append(f"    {reason:<22} {n}")
        for k, v in sorted(self.extra.items()):
            lines.append(f"  {k}: {v}")
        if self.shards_incomplete:
            lines.append(f"  incomplete input shards (kept what was readable): {', '.join(self.shards_incomplete)}")
        if self.shards_failed:
            lines.append(f"  FAILED shards (no manifest; rerun to redo): {', '.join(self.shards_failed)}")
        steady = f" ({self.steady_images_per_s:.1f} once started)" if self.steady_images_per_s else ""
        lines.append(f"  {self.images_per_s:.1f} {u}/s{steady} over {self.seconds:.1f} s; "
                     f"{self.output_bytes / 1e6:.2f} MB written to {self.output}")
        return "\n".join(lines)


def drain(ds, assembler: ShardAssembler, write_shard: Callable[[str, pa.Table, dict], dict], summary: JobSummary,
          n_todo: int, t0: float, progress_every_s: float = 10.0) -> None:
    """Run the dataset, write each shard as soon as it is whole, keep the summary and log progress."""
    last = time.time()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for name, table, end in assembler.add(batch):
                summary.account(write_shard(name, table, end), time.time() - t0)
                if time.time() - last > progress_every_s or summary.shards_done == n_todo:
                    last = time.time()
                    log.info("%s progress: %d/%d shards, %d %s (%d failed), %.1f %s/s", summary.job,
                             summary.shards_done, n_todo, summary.samples_in, summary.unit, summary.samples_failed,
                             summary.samples_in / max(time.time() - t0, 1e-9), summary.unit)
    except KeyboardInterrupt:
        summary.interrupted = True
        return
    summary.shards_failed = assembler.unfinished()
