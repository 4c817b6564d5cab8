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
    Worker w of W reads rows [w N/W, (w+1) N/W) of each source (its files in order, N its rows; only the row
    groups they lie in), through a local shuffle buffer seeded by (seed, epoch, worker, source), and
    interleaves the sources row by row, drawing the next one with weights = the rows each still has (so all
    end together) from a generator seeded by (seed, epoch, worker). The epoch ends when every worker has read
    its rows (then all start the next one together). The data position is one count per worker, the rows
    drawn: a resumed run replays the same draws up to it, so resume is exact.
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
    file_rows: list[int] = field(default_factory=list)  # rows per file (their footers')
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


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [lo, hi) of a source (its files in order) that worker `rank` of `world` reads."""
    return rows * rank // world, rows * (rank + 1) // world


def _read_range(files: list[str], file_rows: list[int], lo: int, hi: int, read_rows: int):
    """Rows lo..hi-1 of the files taken in order, as lists of row dicts: only the row groups they lie in are read,
    `read_rows` at a time."""
    import pyarrow.parquet as pq

    start = 0
    for path, n in zip(files, file_rows):
        a, b = max(lo - start, 0), min(hi - start, n)  # this file's rows a..b-1
        start += n
        if a >= b:
            if start >= hi:
                break
            continue
        fs, p = storage.filesystem(path)
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            groups, first, at = [], None, 0
            for g in range(pf.num_row_groups):
                m = pf.metadata.row_group(g).num_rows
                if at + m > a and at < b:
                    groups.append(g)
                    first = at if first is None else first
                at += m
            k = first
            for batch in pf.iter_batches(batch_size=read_rows, row_groups=groups):
                i, j = max(a - k, 0), min(b - k, batch.num_rows)
                if i < j:
                    yield batch.slice(i, j - i).to_pylist()
                k += batch.num_rows
                if k >= b:
                    break


def _rng(*key) -> random.Random:
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def source_rows(source: MixSource, index: int, seed: int, epoch: int, rank: int, world: int, read_rows: int,
                shuffle_buffer: int):
    """This worker's rows of one source for an epoch: its row range, `copies` times (each row tagged with its
    reading and its source), through a local shuffle buffer seeded by (seed, epoch, rank, source)."""
    lo, hi = row_range(source.rows, rank, world)
    rng = _rng(seed, epoch, rank, index, 0x73687566)
    buffer = []
    for copy in range(source.copies):
        for rows in _read_range(source.files, source.file_rows, lo, hi, read_rows):
            for row in rows:
                row[COPY_COLUMN], row[SOURCE_KEY] = copy, index
                if shuffle_buffer <= 1:
                    yield row
                    continue
                buffer.append(row)
                if len(buffer) >= shuffle_buffer:
                    k = rng.randrange(len(buffer))
                    buffer[k], buffer[-1] = buffer[-1], buffer[k]
                    yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def mixed_epoch_rows(sources: list[MixSource], seed: int, epoch: int, skip: int, rank: int, world: int,
                     read_rows: int, shuffle_buffer: int):
    """(position, row dicts) of this worker's mixed epoch from row `skip` on (the rows before are drawn and
    dropped: the same draws as the first time). The worker reads its sources itself (pyarrow, row group by row
    group, from local or s3:// files): one Ray Data execution per source would split the cluster's CPUs between
    them, and each would start its epochs in lockstep over the workers."""
    streams = [source_rows(s, i, seed, epoch, rank, world, read_rows, shuffle_buffer) for i, s in enumerate(sources)]
    remaining = [s.copies * (lambda r: r[1] - r[0])(row_range(s.rows, rank, world)) for s in sources]
    rng = _rng(seed, epoch, rank, 0x6D6978)
    pos, out = 0, []
    while True:
        live = [i for i, n in enumerate(remaining) if n > 0]
        if not live:
            break
        i = rng.choices(live, weights=[remaining[k] for k in live])[0]
        row = next(streams[i])
        remaining[i] -= 1
        if pos >= skip:
            out.append(row)
        pos += 1
        if len(out) == read_rows:
            yield pos - len(out), out
            out = []
    if out:
        yield pos - len(out), out
