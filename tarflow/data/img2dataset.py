"""img2dataset output as input: finding its shards and reading their samples as raw bytes.

Supported: the `webdataset` output format (`{shard}.tar` beside `{shard}.parquet` and `{shard}_stats.json`) and
the `parquet` output format (image bytes in a column). Inputs are a folder or prefix, a brace pattern
(`.../{00000..00099}.tar`), a glob, a list file (one path per line, `.txt`/`.lst`), or one file; local or s3://.

Readers never decode images: they yield raw member bytes, and a named reason (stage "read") for samples that
are broken at the container level. `iter_samples` yields `RawSample`s in shard order, then one `ShardEnd`.

Reading a shard: `iter_samples` over the tar reader (tarflow.data.tar_reader: samples, truncation, per-sample
errors, memory) or the Parquet reader here, both through tarflow.data.retrying_file (transient errors
retried, other read errors fail the shard with a named reason). Parquet shards are read a row group at a time,
so their bound is the row group as written (image cells above the limit still become `member_too_large`).
"""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import Callable, Iterator

from tarflow.data import storage
from tarflow.data.images import IMAGE_SUFFIXES
from tarflow.data.retrying_file import DEFAULT_READ_RETRY, ReadRetry, RetryingFile, ShardReadError
from tarflow.data.tar_reader import DEFAULT_MAX_MEMBER_BYTES, RawSample, ShardEnd, iter_tar_samples


class InputError(ValueError):
    pass


@dataclass(frozen=True)
class ShardInput:
    path: str  # full path / URL of the tar or parquet file
    name: str  # shard name: file name without extension, e.g. "00000"
    format: str  # "webdataset" | "parquet" | "conversations" (a conversation table: tarflow.data.conversations)
    size: int

    @property
    def stats_path(self) -> str:
        """img2dataset's `{shard}_stats.json` beside the shard (written last by img2dataset)."""
        return self.path[: -len(os.path.splitext(self.path)[1])] + "_stats.json"


def resolve_inputs(spec: str | list[str], input_format: str = "auto") -> list[ShardInput]:
    """Turn an input spec into a sorted list of shards; fail clearly on nothing found or name clashes.

    Sizes come from folder listings (one request per 1,000 files on S3), never a request per shard: resolving
    500,000 shards costs 500 listings."""
    if input_format not in ("auto", "webdataset", "parquet", "conversations"):
        raise InputError(f"--input-format {input_format!r}: choose auto, webdataset, parquet or conversations")
    specs = [spec] if isinstance(spec, str) else list(spec)
    sizes: dict[str, int] = {}
    paths: list[str] = []
    for s in specs:
        paths.extend(_expand(s, input_format, sizes))
    if not paths:
        raise InputError(f"no shards found in {specs}: expected img2dataset output (.tar files, or .parquet with "
                         "image bytes for --input-format parquet) or conversation tables (.parquet with "
                         "`conversations`, or .json/.jsonl)")
    shards, seen = [], {}
    conversation_parquet = None  # auto: the first Parquet file's columns decide for all
    for p in paths:
        base = posixpath.basename(p) if storage.is_remote(p) else os.path.basename(p)
        stem, ext = os.path.splitext(base)
        fmt = "webdataset" if ext == ".tar" else "parquet"
        if input_format == "conversations" or ext.lower() in (".json", ".jsonl"):
            fmt = "conversations"
        elif fmt == "parquet" and input_format == "auto":
            if conversation_parquet is None:
                from tarflow.data.conversations import parquet_is_conversation_table

                conversation_parquet = _sniff(parquet_is_conversation_table, p)
            fmt = "conversations" if conversation_parquet else "parquet"
        if stem in seen and seen[stem] != p:
            raise InputError(f"two input shards share the name {stem!r} ({seen[stem]} and {p}); outputs are named "
                             "after the input file, so give inputs from one folder per job")
        if stem in seen:
            continue
        seen[stem] = p
        size = sizes.get(_norm(p))
        if size is None:
            try:
                size = storage.size(p)
            except FileNotFoundError:
                raise InputError(f"input shard {p} does not exist") from None
        shards.append(ShardInput(path=p, name=stem, format=fmt, size=size))
    return sorted(shards, key=lambda s: s.name)


def _norm(path: str) -> str:
    return path if storage.is_remote(path) else os.path.abspath(path.removeprefix("file://"))


def _listed(folder: str, sizes: dict[str, int]) -> list[str]:
    """The files of `folder` (full paths), remembering their sizes."""
    found = storage.list_sizes(folder)
    sizes.update({_norm(p): n for p, n in found.items()})
    return sorted(found)


def _expand(spec: str, input_format: str, sizes: dict[str, int]) -> list[str]:
    spec = spec.strip()
    if "{" in spec and ".." in spec or "{" in spec and "," in spec:
        listed: dict[str, set] = {}
        return [_listed_file(p, f"from pattern {spec}", listed, sizes) for p in storage.expand_braces(spec)]
    if any(c in spec for c in "*?["):
        return _select(_globbed(spec, sizes), input_format, spec)
    if storage.isdir(spec):
        found = _select(_listed(spec, sizes), input_format, spec)
        if not found and storage.isdir(storage.join(spec, "data")):  # a Hugging Face dataset folder: data/*.parquet
            found = _select(_listed(storage.join(spec, "data"), sizes), input_format, spec)
        return found
    if not storage.exists(spec):
        by_prefix = _select(_globbed(spec + "*", sizes), input_format, spec)  # a key prefix: s3://b/laion/part-
        if by_prefix:
            return by_prefix
        raise InputError(f"input {spec} does not exist (give a folder, a prefix, a brace pattern, a glob, a list "
                         "file or a shard file)")
    if spec.endswith((".txt", ".lst")):
        return _from_list_file(spec, input_format, sizes)
    return [spec]


def _listed_file(path: str, source: str, listed: dict[str, set], sizes: dict[str, int]) -> str:
    """`path`, checked against one listing of its folder (kept in `listed` for the next file of that folder)."""
    parent = storage.dirname(path)
    if parent not in listed:
        listed[parent] = {_norm(x) for x in _listed(parent, sizes)}
    if _norm(path) not in listed[parent]:
        raise InputError(f"input shard {path} ({source}) does not exist")
    return path


def _globbed(pattern: str, sizes: dict[str, int]) -> list[str]:
    found = storage.glob_sizes(pattern)
    sizes.update({_norm(p): n for p, n in found.items()})
    return sorted(found)


def _from_list_file(spec: str, input_format: str, sizes: dict[str, int]) -> list[str]:
    """The shards a list file names, one a line. Lines naming shard files are checked against one listing of
    each folder they are in (a request per 1,000 files, not three per line); other lines (folders, globs,
    patterns) are expanded as inputs of their own."""
    base = storage.dirname(spec)
    out, listed = [], {}
    for line in (ln.strip() for ln in storage.read_bytes(spec).decode().splitlines()):
        if not line or line.startswith("#"):
            continue
        p = line if (storage.is_remote(line) or os.path.isabs(line)) else storage.join(base, line)
        if p.endswith((".tar", ".parquet")) and not any(c in p for c in "*?[{"):
            out.append(_listed_file(p, f"listed in {spec}", listed, sizes))
        else:
            out.extend(_expand(p, input_format, sizes))
    return out


def _select(files: list[str], input_format: str, spec: str) -> list[str]:
    tars = [f for f in files if f.endswith(".tar")]
    parquets = [f for f in files if f.endswith(".parquet")]
    if input_format == "webdataset" or (input_format == "auto" and tars):
        return tars  # the .parquet files beside img2dataset tars are metadata, not samples
    if input_format == "parquet" or (input_format in ("auto", "conversations") and parquets):
        return parquets
    if input_format in ("auto", "conversations"):  # conversation tables as JSON (Lines)
        return [f for f in files if f.lower().endswith((".json", ".jsonl"))]
    return []


def _sniff(test: Callable[[str], bool], path: str) -> bool:
    try:
        return test(path)
    except FileNotFoundError:
        raise InputError(f"input shard {path} does not exist") from None
    except Exception:  # noqa: BLE001 - not readable as Parquet: the reader says why, for that shard alone
        return False


# ----------------------------------------------------------------------------------------------------------
# parquet, and the common entry point


def iter_parquet_samples(shard: ShardInput, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                         retry: ReadRetry = DEFAULT_READ_RETRY) -> Iterator[RawSample | ShardEnd]:
    """Samples of img2dataset's `parquet` output format: an image-bytes column (jpg/png/webp), txt, json
    metadata columns. Rows whose status is not success (no image bytes) are not samples and are skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with RetryingFile(shard.path, retry) as f:
        try:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
        except pa.ArrowException as e:
            raise ShardReadError("corrupt_parquet", f"{type(e).__name__}: {e}", shard.path) from None
        image_col = next((c for c in IMAGE_SUFFIXES if c in names), None)
        if image_col is None:
            raise InputError(f"{shard.path}: no image column ({'/'.join(IMAGE_SUFFIXES[:4])}) in {names}; is this "
                             "img2dataset's parquet output format (and not the metadata beside its tars)?")
        meta_cols = [c for c in names if c not in (image_col, "txt")]
        idx = 0
        batches = pf.iter_batches(batch_size=256)
        while True:
            try:
                batch = next(batches, None)
            except pa.ArrowException as e:
                raise ShardReadError("corrupt_parquet", f"after {idx} samples: {type(e).__name__}: {e}",
                                     shard.path) from None
            if batch is None:
                break
            for r in batch.to_pylist():
                if r.get("status") not in (None, "success") or r.get(image_col) is None:
                    continue
                key = str(r.get("key") if r.get("key") is not None else idx)
                txt = r.get("txt")
                if txt is None and r.get("caption") is not None:
                    txt = r["caption"]
                meta = {c: r[c] for c in meta_cols}
                s = RawSample(idx=idx, key=key, image=r[image_col], image_suffix=image_col,
                              txt=txt.encode() if isinstance(txt, str) else txt,
                              json=json.dumps(meta, default=str).encode())
                if len(s.image) > max_member_bytes:
                    s.error = ("read", "member_too_large", f"{image_col} cell holds {len(s.image)} bytes, above the "
                                                           f"limit of {max_member_bytes} bytes (--max-member-bytes)")
                    s.image = None
                yield s
                idx += 1
    yield ShardEnd(n_samples=idx)


def iter_samples(shard: ShardInput, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, *,
                 retry: ReadRetry = DEFAULT_READ_RETRY) -> Iterator[RawSample | ShardEnd]:
    """The samples of one shard, then its ShardEnd. Raises ShardReadError when the shard cannot be read
    reliably (see the module doc); per-sample problems are in `RawSample.error`."""
    if shard.format == "webdataset":
        it = iter_tar_samples(shard, max_member_bytes, retry)
    else:
        it = iter_parquet_samples(shard, max_member_bytes, retry)
    end = None
    for item in it:
        if isinstance(item, ShardEnd):
            end = item
        else:
            yield item
    _check_against_stats(shard, end, retry)
    yield end


def _check_against_stats(shard: ShardInput, end: ShardEnd, retry: ReadRetry) -> None:
    """img2dataset's _stats.json counts the samples it wrote: fewer in the tar means it lost some."""
    if shard.format != "webdataset" or not end.complete:
        return
    try:
        with RetryingFile(shard.stats_path, retry) as f:
            raw = f.read()
    except ShardReadError as e:
        if e.reason == "not_found":
            return  # no stats beside the tar: nothing to check against
        raise
    try:
        stats = json.loads(raw)
    except ValueError:
        return
    expected = stats.get("successes") if isinstance(stats, dict) else None
    if isinstance(expected, int) and end.n_samples < expected:
        end.complete = False
        end.detail = (f"the tar holds {end.n_samples} samples but {os.path.basename(shard.stats_path)} reports "
                      f"{expected} successes")
    end.extra["img2dataset_successes"] = expected


def read_all(shard: ShardInput, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, *,
             retry: ReadRetry = DEFAULT_READ_RETRY) -> tuple[list[RawSample], ShardEnd]:
    items = list(iter_samples(shard, max_member_bytes, retry=retry))
    return items[:-1], items[-1]  # type: ignore[return-value]
