"""JobSummary: what a sharded job did (shards written, skipped, empty, failed with their reasons; samples by
outcome; throughput), accounted by the driver from each finalize task's small result and rendered as the
job's closing lines or --summary-json."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping


@dataclass
class JobSummary:
    job: str = "tarflow"
    unit: str = "samples"
    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    shards_empty: int = 0  # written shards of no samples (an img2dataset shard whose every download failed)
    shards_incomplete: list = field(default_factory=list)
    shards_failed: list = field(default_factory=list)
    failed_shard_reasons: dict = field(default_factory=dict)  # shard -> reason: detail
    samples_in: int = 0
    samples_ok: int = 0
    samples_failed: int = 0
    failed_by_reason: Counter = field(default_factory=Counter)
    extra: Counter = field(default_factory=Counter)  # job-specific totals, e.g. generated tokens
    output_bytes: int = 0
    seconds: float = 0.0
    plan_seconds: float = 0.0
    driver_bytes: int = 0  # bytes of metadata rows the driver received (the rows' payload stays on workers)
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

    def account(self, done: Mapping, elapsed: float) -> None:
        c = done["counts"]
        self.shards_done += 1
        self.shards_empty += c["samples_in"] == 0
        self.samples_in += c["samples_in"]
        self.samples_ok += c["ok"]
        self.samples_failed += c["failed"]
        self.failed_by_reason.update(c["failed_by_reason"])
        self.extra.update(done.get("totals", {}))
        self.output_bytes += done.get("bytes", 0)
        if not done["complete"]:
            self.shards_incomplete.append(done["shard"])
        self.shard_times.append((elapsed, c["samples_in"]))

    def fail(self, shard: str, reason: str) -> None:
        if shard not in self.failed_shard_reasons:
            self.shards_failed.append(shard)
            self.failed_shard_reasons[shard] = reason

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
            f"{len(self.shards_failed)} failed, of {self.shards_total}"
            + (" - INTERRUPTED: rerun the same command to finish" if self.interrupted else ""),
            f"  {u}: {self.samples_in} in = {self.samples_ok} ok + {self.samples_failed} failed",
        ]
        for reason, n in self.failed_by_reason.most_common():
            lines.append(f"    {reason:<22} {n}")
        if self.shards_empty:
            lines.append(f"  empty shards (no samples; written, with a manifest saying 0): {self.shards_empty}")
        for k, v in sorted(self.extra.items()):
            lines.append(f"  {k}: {v}")
        if self.shards_incomplete:
            lines.append(f"  incomplete input shards (kept what was readable): {', '.join(self.shards_incomplete)}")
        if self.shards_failed:
            lines.append("  FAILED shards (no manifest; a rerun redoes them):")
            for s in self.shards_failed[:20]:
                lines.append(f"    {s}: {self.failed_shard_reasons.get(s, '')}"[:300])
            if len(self.shards_failed) > 20:
                lines.append(f"    ... and {len(self.shards_failed) - 20} more (see --summary-json)")
        steady = f" ({self.steady_images_per_s:.1f} once started)" if self.steady_images_per_s else ""
        lines.append(f"  {self.images_per_s:.1f} {u}/s{steady} over {self.seconds:.1f} s; "
                     f"{self.output_bytes / 1e6:.2f} MB written to {self.output}")
        return "\n".join(lines)
