"""img2dataset output as input: finding its shards and reading their samples as raw bytes.

Supported: the `webdataset` output format (`{shard}.tar` beside `{shard}.parquet` and `{shard}_stats.json`) and
the `parquet` output format (image bytes in a column). Inputs are a folder or prefix, a brace pattern
(`.../{00000..00099}.tar`), a glob, a list file (one path per line, `.txt`/`.lst`), or one file; local or s3://.

Readers never decode images: they yield raw member bytes and a named reason for samples that are broken at
the container level (no image member, duplicate key, truncated tar).
"""
from __future__ import annotations

import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from tarflow.data import storage
from tarflow.data.images import IMAGE_SUFFIXES


DEFAULT_MAX_MEMBER_BYTES = 64 << 20


class InputError(ValueError):
    pass


@dataclass(frozen=True)
class ShardInput:
    path: str  # full path / URL of the tar or parquet file
    name: str  # shard name: file name without extension, e.g. "00000"
    format: str  # "webdataset" | "parquet"
    size: int

    @property
    def stats_path(self) -> str:
        """img2dataset's `{shard}_stats.json` beside the shard (written last by img2dataset)."""
        return self.path[: -len(os.path.splitext(self.path)[1])] + "_stats.json"


def resolve_inputs(spec: str | list[str], input_format: str = "auto") -> list[ShardInput]:
    """Turn an input spec into a sorted list of shards; fail clearly on nothing found or name clashes."""
    if input_format not in ("auto", "webdataset", "parquet"):
        raise InputError(f"--input-format {input_format!r}: choose auto, webdataset or parquet")
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for s in specs:
        paths.extend(_expand(s, input_format))
    if not paths:
        raise InputError(f"no shards found in {specs}: expected img2dataset output (.tar files, or .parquet with "
                         "image bytes for --input-format parquet)")
    shards, seen = [], {}
    for p in paths:
        base = posixpath.basename(p) if storage.is_remote(p) else os.path.basename(p)
        stem, ext = os.path.splitext(base)
        fmt = "webdataset" if ext == ".tar" else "parquet"
        if stem in seen and seen[stem] != p:
            raise InputError(f"two input shards share the name {stem!r} ({seen[stem]} and {p}); outputs are named "
                             "after the input file, so give inputs from one folder per job")
        if stem in seen:
            continue
        seen[stem] = p
        try:
            size = storage.size(p)
        except FileNotFoundError:
            raise InputError(f"input shard {p} does not exist") from None
        shards.append(ShardInput(path=p, name=stem, format=fmt, size=size))
    return sorted(shards, key=lambda s: s.name)


def _expand(spec: str, input_format: str) -> list[str]:
    spec = spec.strip()
    if "{" in spec and ".." in spec or "{" in spec and "," in spec:
        out = []
        for p in storage.expand_braces(spec):
            if not storage.exists(p):
                raise InputError(f"input shard {p} (from pattern {spec}) does not exist")
            out.append(p)
        return out
    if any(c in spec for c in "*?["):
        return _select(storage.glob(spec), input_format, spec)
    if storage.isdir(spec):
        return _select(storage.listdir(spec), input_format, spec)
    if not storage.exists(spec):
        by_prefix = _select(storage.glob(spec + "*"), input_format, spec)  # a key prefix: s3://b/laion/part-
        if by_prefix:
            return by_prefix
        raise InputError(f"input {spec} does not exist (give a folder, a prefix, a brace pattern, a glob, a list "
                         "file or a shard file)")
    if spec.endswith((".txt", ".lst")):
        lines = storage.read_bytes(spec).decode().splitlines()
        base = storage.dirname(spec)
        out = []
        for line in (ln.strip() for ln in lines):
            if line and not line.startswith("#"):
                p = line if (storage.is_remote(line) or os.path.isabs(line)) else storage.join(base, line)
                out.extend(_expand(p, input_format))
        return out
    return [spec]


def _select(files: list[str], input_format: str, spec: str) -> list[str]:
    tars = [f for f in files if f.endswith(".tar")]
    parquets = [f for f in files if f.endswith(".parquet")]
    if input_format == "webdataset" or (input_format == "auto" and tars):
        return tars  # the .parquet files beside img2dataset tars are metadata, not samples
    if input_format == "parquet" or input_format == "auto":
        return parquets
    return []


# ----------------------------------------------------------------------------------------------------------
# Reading samples


@dataclass
class RawSample:
    idx: int  # position in the shard (0-based), the output's row order
    key: str
    image: bytes | None = None
    image_suffix: str = ""
    txt: bytes | None = None
    json: bytes | None = None
    error: tuple[str, str, str] | None = None  # (stage, reason, detail) decided at read time


@dataclass
class ShardEnd:
    n_samples: int
    complete: bool = True
    detail: str = ""
    extra: dict = field(default_factory=dict)


def _split_member(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the file name; suffix = the rest."""
    d, base = posixpath.split(name)
    stem, _, suffix = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), suffix.lower()


def _finish(key: str, members: dict[str, bytes], idx: int) -> RawSample:
    s = RawSample(idx=idx, key=key, txt=members.get("txt"), json=members.get("json"))
    for suffix in IMAGE_SUFFIXES:
        if suffix in members:
            s.image, s.image_suffix = members[suffix], suffix
            break
    else:
        s.error = ("read", "no_image", f"members: {sorted(members) or 'none'}")
    return s


def iter_tar_samples(shard: ShardInput) -> Iterator[RawSample | ShardEnd]:
    """Stream the samples of an img2dataset tar in order; the last item is a ShardEnd.

    A tar cut off mid-member keeps every sample before the cut; the cut sample becomes a `truncated_tar` error
    and the ShardEnd says the shard is incomplete.
    """
    fs, p = storage.filesystem(shard.path)
    idx, seen = 0, set()
    key, members = None, {}
    complete, detail = True, ""
    with fs.open(p, "rb", block_size=8 << 20) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    k, suffix = _split_member(m.name)
                    if k != key:
                        if key is not None:
                            yield _finish_checked(key, members, idx, seen)
                            idx += 1
                        key, members = k, {}
                    data = tar.extractfile(m).read()
                    if len(data) != m.size:
                        raise tarfile.ReadError("unexpected end of data")
                    members[suffix] = data
                end_of_members = tar.offset
            if shard.size - end_of_members < 1024:
                # tar writers end an archive with two zero blocks: a file cut at a member boundary lacks them
                complete, detail = False, "the tar ends without its end-of-archive blocks (file cut short?)"
        except (tarfile.ReadError, EOFError, OSError) as e:
            complete, detail = False, f"tar truncated or damaged after {idx} samples: {e}"
            if key is not None:
                s = RawSample(idx=idx, key=key, error=("read", "truncated_tar", detail))
                yield s
                idx += 1
                key = None
    if key is not None:
        yield _finish_checked(key, members, idx, seen)
        idx += 1
    yield ShardEnd(n_samples=idx, complete=complete, detail=detail)


def _finish_checked(key, members, idx, seen) -> RawSample:
    s = _finish(key, members, idx)
    if key in seen:
        s.error = ("read", "duplicate_key", f"key {key} appears twice in the tar")
    seen.add(key)
    return s


def iter_parquet_samples(shard: ShardInput) -> Iterator[RawSample | ShardEnd]:
    """Samples of img2dataset's `parquet` output format: an image-bytes column (jpg/png/webp), txt, json
    metadata columns. Rows whose status is not success (no image bytes) are not samples and are skipped."""
    import pyarrow.parquet as pq

    fs, p = storage.filesystem(shard.path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        image_col = next((c for c in IMAGE_SUFFIXES if c in names), None)
        if image_col is None:
            raise InputError(f"{shard.path}: no image column ({'/'.join(IMAGE_SUFFIXES[:4])}) in {names}; is this "
                             "img2dataset's parquet output format (and not the metadata beside its tars)?")
        meta_cols = [c for c in names if c not in (image_col, "txt")]
        idx = 0
        for batch in pf.iter_batches(batch_size=256):
            rows = batch.to_pylist()
            for r in rows:
                if r.get("status") not in (None, "success") or r.get(image_col) is None:
                    continue
                key = str(r.get("key") if r.get("key") is not None else idx)
                txt = r.get("txt")
                if txt is None and r.get("caption") is not None:
                    txt = r["caption"]
                meta = {c: r[c] for c in meta_cols}
                yield RawSample(idx=idx, key=key, image=r[image_col], image_suffix=image_col,
                                txt=txt.encode() if isinstance(txt, str) else txt,
                                json=json.dumps(meta, default=str).encode())
                idx += 1
    yield ShardEnd(n_samples=idx)


def iter_samples(shard: ShardInput, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[RawSample | ShardEnd]:
    it = iter_tar_samples(shard) if shard.format == "webdataset" else iter_parquet_samples(shard)
    end = None
    for item in it:
        if isinstance(item, ShardEnd):
            end = item
        else:
            yield item
    _check_against_stats(shard, end)
    yield end


def _check_against_stats(shard: ShardInput, end: ShardEnd) -> None:
    """img2dataset's _stats.json counts the samples it wrote: fewer in the tar means it lost some."""
    if shard.format != "webdataset" or not end.complete:
        return
    try:
        stats = json.loads(storage.read_bytes(shard.stats_path))
    except (FileNotFoundError, ValueError, OSError):
        return
    expected = stats.get("successes")
    if isinstance(expected, int) and end.n_samples < expected:
        end.complete = False
        end.detail = (f"the tar holds {end.n_samples} samples but {os.path.basename(shard.stats_path)} reports "
                      f"{expected} successes")
    end.extra["img2dataset_successes"] = expected


def read_all(shard: ShardInput) -> tuple[list[RawSample], ShardEnd]:
    items = list(iter_samples(shard))
    return items[:-1], items[-1]  # type: ignore[return-value]

