"""The data mix: several sources drawn by ratio, as the reference's `--data_path data.yaml`
(`scripts/data_demo.yaml`, `llava/data/dataset.py: WeightedDataset`), on code shards.

    # mix.yaml: the reference's shape; each path a tokenize output (code shards or conversation code shards),
    # a folder of them, Parquet files, or s3:// prefixes
    datasets:
      - json_path: [s3://b/llava-recap-118k-tatok/, s3://b/llava-sft-665k-tatok/]   # or `paths:`
        ratio: 2
        name: llava
      - paths: [s3://b/imagenet-t2i-tatok/]
        ratio: 4
        name: t2i

A source's `name` labels it in the metrics (the reference's files give every source the dataset class
`parquet` there: repeated names get the source's number appended, `parquet_1`, `parquet_2`, ...); `ratio`
defaults to 1, as in the reference.

What an epoch is with a mix. The reference draws a source per sample by ratio from sources that never end.
Here sources are read, not endless, so an epoch is defined by counts:
    E = the rows of all sources together (from their footers); source i supplies E x ratio_i / sum(ratios)
    rows, i.e. f_i = that / rows_i times its rows: its files are read ceil(f_i) times in the epoch (copies:
    `_copy` 0, 1, ... drawing anew) and each row of a copy is kept with probability f_i / ceil(f_i) (seeded
    by seed, epoch and the row: thinned rows are counted as `source_ratio`). So over an epoch the sources'
    samples are in the ratios' proportions, a small source is repeated and a large one thinned, and no file
    is read more often than its share needs.
    Each worker reads its split of every source (Ray Data, fixed order, a seeded local shuffle per source) and
    interleaves them row by row, drawing the next source with weights = the rows it still expects from each
    (so all end together); the draws come from a generator seeded by (seed, epoch, rank). The epoch ends when
    every source is read through on every worker (then all start the next one together). The data position is
    one count per worker, the rows drawn: a resumed run replays the same draws up to it, so resume is exact.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np

from tarflow.data import storage

COPY_COLUMN = "_copy"  # which reading of a repeated source a row comes from (draws differ per copy)
SOURCE_KEY = "_source"  # the source's index, in the row dicts a worker builds samples from


@dataclass
class MixSource:
    name: str
    paths: list[str]
    ratio: float
    files: list[str] = field(default_factory=list)
    rows: int = 0
    copies: int = 1  # readings per epoch
    keep: float = 1.0  # probability a row of a reading is kept

    def as_dict(self) -> dict:
        return asdict(self)


def read_mix_config(path: str, problems) -> list[MixSource]:
    """The sources of a mix file (YAML or JSON), every problem added to `problems` (tarflow.preflight)."""
    import yaml

    flag = f"--data-config {path}"
    fix = ("give `datasets:`, a list of {paths (or json_path): [tokenize outputs], ratio, name}, as the reference's "
           "scripts/data_demo.yaml")
    try:
        doc = yaml.safe_load(storage.read_bytes(path))
    except FileNotFoundError:
        problems.add(flag, "not found", "give the mix file (YAML)")
        return []
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        problems.add(flag, f"not YAML ({str(e).splitlines()[0]})", fix)
        return []
    entries = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        problems.add(flag, "has no `datasets:` list", fix)
        return []
    sources = []
    for k, e in enumerate(entries, 1):
        paths = (e.get("paths") or e.get("json_path")) if isinstance(e, dict) else None
        paths = [paths] if isinstance(paths, str) else paths
        ratio = e.get("ratio", 1) if isinstance(e, dict) else None
        ok = isinstance(paths, list) and paths and all(isinstance(p, str) for p in paths)
        ok = problems.check(ok, flag, f"source {k} has no paths", fix) and ok
        good_ratio = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0 \
            and math.isfinite(ratio)
        ok = problems.check(good_ratio, flag, f"source {k}: ratio {ratio!r} is not a positive number",
                            "give each source a ratio > 0 (drop a source to leave it out)") and ok
        if ok:
            name = str(e.get("name") or f"source_{k}")
            sources.append(MixSource(name=name, paths=list(paths), ratio=float(ratio)))
    names = [s.name for s in sources]
    for k, s in enumerate(sources, 1):
        if names.count(s.name) > 1:
            s.name = f"{s.name}_{k}"
    return sources


def plan_mix(sources: list[MixSource]) -> list[MixSource]:
    """Copies and keep probability per source from their row counts and ratios (see the module's epoch)."""
    total_rows, total_ratio = sum(s.rows for s in sources), sum(s.ratio for s in sources)
    for s in sources:
        factor = total_rows * s.ratio / total_ratio / max(s.rows, 1)
        s.copies = max(1, math.ceil(factor - 1e-9))
        s.keep = min(1.0, factor / s.copies)
    return sources


def mix_datasets(sources: list[MixSource]) -> dict:
    """The driver's Ray datasets, one per source (`mix_0`, ...): its files read `copies` times, each reading's
    rows tagged with its number."""
    import pyarrow as pa
    import ray.data

    def tag(copy: int):
        def add(batch: pa.Table) -> pa.Table:
            return batch.append_column(COPY_COLUMN, pa.array(np.full(len(batch), copy, np.int32)))
        return add

    out = {}
    for i, s in enumerate(sources):
        readings = [ray.data.read_parquet(s.files, shuffle=None).map_batches(tag(c), batch_format="pyarrow")
                    for c in range(s.copies)]
        out[dataset_name(i)] = readings[0].union(*readings[1:]) if len(readings) > 1 else readings[0]
    return out


def dataset_name(i: int) -> str:
    return f"mix_{i}"


class _Rows:
    """One source's rows on this worker, fetched a table at a time."""

    def __init__(self, batches, source: int):
        self.it, self.source, self.rows, self.done = iter(batches), source, [], False

    def pop(self):
        while not self.rows and not self.done:
            try:
                self.rows = next(self.it).to_pylist()[::-1]
            except StopIteration:
                self.done = True
        if self.done and not self.rows:
            return None
        row = self.rows.pop()
        row[SOURCE_KEY] = self.source
        return row

    def prime(self):
        row = self.pop()
        if row is not None:
            self.rows.append(row)


def mixed_epoch_rows(shards: list, sources: list[MixSource], seed: int, epoch: int, skip: int, rank: int,
                     world: int, read_rows: int, shuffle_buffer: int):
    """(position, row dicts) of this worker's mixed epoch from row `skip` on (the rows before are drawn and
    dropped: the same draws as the first time)."""
    streams = []
    for i, shard in enumerate(shards):
        shuffle = {"local_shuffle_buffer_size": shuffle_buffer,
                   "local_shuffle_seed": seed + epoch + 7919 * (i + 1)} if shuffle_buffer else {}
        streams.append(_Rows(shard.iter_batches(batch_size=read_rows, batch_format="pyarrow", prefetch_batches=1,
                                                **shuffle), i))
    # Ray Data starts a split's epoch when every worker has asked for it: each worker starts the sources in the
    # same order, or two workers could each wait on a source the other has not started
    for s in streams:
        s.prime()
    state = np.random.SeedSequence([seed, epoch, rank, 0x6D6978]).generate_state(2)
    rng = random.Random(int(state[0]) << 32 | int(state[1]))
    expected = [s.copies * s.rows / max(world, 1) for s in sources]
    taken = [0] * len(streams)
    pos, out = 0, []
    while True:
        live = [i for i, s in enumerate(streams) if not (s.done and not s.rows)]
        if not live:
            break
        i = rng.choices(live, weights=[max(expected[k] - taken[k], 1.0) for k in live])[0]
        row = streams[i].pop()
        if row is None:
            continue
        taken[i] += 1
        if pos >= skip:
            out.append(row)
        pos += 1
        if len(out) == read_rows:
            yield pos - len(out), out
            out = []
    if out:
        yield pos - len(out), out

