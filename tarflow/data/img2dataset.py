"""img2dataset output as input: finding its shards and reading their samples as raw bytes.

Supported: the `webdataset` output format (`{shard}.tar` beside `{shard}.parquet` and `{shard}_stats.json`) and
the `parquet` output format (image bytes in a column). Inputs are a folder or prefix, a brace pattern
(`.../{00000..00099}.tar`), a glob, a list file (one path per line, `.txt`/`.lst`), or one file; local or s3://.

Readers never decode images: they yield raw member bytes, and a named reason (stage "read") for samples that
are broken at the container level. `iter_samples` yields `RawSample`s in shard order, then one `ShardEnd`.

Faults, and what each becomes:
- Transient read errors (`is_transient`: the OSError family but FileNotFoundError/PermissionError, i.e. a
  connection reset, a timeout, a read that ends before the file's size; and the S3 client's retryable errors,
  which s3fs raises as they are once its own retries are spent) are retried: the file is reopened and read on
  from the same position, with exponential backoff (`ReadRetry`). When the attempts run out the whole shard
  fails: `ShardReadError("read_failed")`. No sample of it is kept, so a rerun reads it again; nothing
  transient is ever recorded as lost. Any other error of the reading (a TypeError, a KeyError: a bug, not the
  link) is not retried: the shard fails at once, `ShardReadError("unexpected_error")` with the error as cause.
- A tar is truncated only when that is proven: every byte up to the file's size was read and the tar framing
  needs more (a member's data or a header runs past the end, or the end-of-archive blocks are missing). Then
  the samples before the cut are kept, the cut sample is `truncated_tar` and the ShardEnd has
  `complete=False`. Any other damage to the framing (not a tar, an invalid header in the middle, data after
  the end-of-archive marker) fails the shard: `ShardReadError("corrupt_tar")`.
- Per-sample problems stay per-sample errors: `no_image` (the detail lists the member suffixes and the kind of
  any non-file member, e.g. `jpg (symlink)`), `duplicate_key`, `truncated_tar`, `member_too_large` (a member
  declaring more than `max_member_bytes`; the detail gives the declared size), `bad_member_name` (a name that
  is not valid UTF-8), `member_unreadable` (any other library error on one member whose framing is intact).

Accounting: every member of a tar belongs to exactly one sample, except directory entries (not samples;
counted in `ShardEnd.extra["tar_directories"]` when there are any). Members are grouped in tar order: a member
starts a new sample when its key differs from the previous member's or when it repeats a suffix already in
the current sample (1,000 consecutive `rep.jpg` are 1,000 samples); a sample whose key was used before is a
`duplicate_key` error. So samples = ok + failed, and equal a count made from tarfile's member list by the same
rule.

Memory: a tar member is read into memory only if it declares at most `max_member_bytes` and the reader uses it
(an image, `.txt` or `.json` member of a sample with no error so far); any other member is skipped by seeking,
never read. The reader holds one sample's members at a time, so its own peak is at most
(len(IMAGE_SUFFIXES) + 2) * max_member_bytes plus a few small buffers whatever a tar declares, and in practice
one sample's size. A tar header (pax or GNU long name) asking for more than `max_member_bytes` fails the shard
(`corrupt_tar`) instead of being read. Parquet shards are read a row group at a time, so their bound is the
row group as written (image cells above the limit still become `member_too_large`).
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import random
import tarfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from tarflow.data import hub, storage
from tarflow.data.images import IMAGE_SUFFIXES

# 64 MiB: far above any image img2dataset writes (it resizes by default; even kept originals are a few MB, and
# an image that passes the decoder's 89 M pixel limit compresses well below this), and small enough that one
# sample's members, or a chunk of rows, fit a reader worker's memory many times over.
DEFAULT_MAX_MEMBER_BYTES = 64 << 20


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


class ShardReadError(Exception):
    """A shard that cannot be read reliably. The caller fails this shard alone (no manifest, `reason` in the
    summary) and a rerun reads it again. Reasons: read_failed, not_found, access_denied, changed_during_read,
    corrupt_tar, corrupt_parquet, unexpected_error (an error a retry cannot cure, raised by the reading itself)."""

    def __init__(self, reason: str, detail: str, path: str = ""):
        super().__init__(reason, detail, path)  # args as given: the error pickles (Ray) and rebuilds
        self.reason, self.detail, self.path = reason, " ".join(str(detail).split()), path

    def __str__(self) -> str:
        return f"shard {self.path or '?'} cannot be read ({self.reason}): {self.detail}"


@dataclass(frozen=True)
class ReadRetry:
    """How hard to try before a read error fails a shard.

    One read (one position) is tried at most `attempts` times, waiting backoff_s, 2*backoff_s, ... (capped at
    max_backoff_s, with jitter) between tries; a file gets at most `max_retries` retries in all, so a link that
    fails on every read cannot stretch a shard forever. Defaults: up to 5 retries over 8-16 s per read, on
    top of s3fs's own retries.
    """
    attempts: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 20.0
    max_retries: int = 50

    def delay(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + 0.5 * random.random())


DEFAULT_READ_RETRY = ReadRetry()


class _EarlyEOF(OSError):
    """The underlying read returned nothing before the file's known size: a broken stream, not an end."""


_NOT_FOUND = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
_S3_RETRYABLE: tuple | None = None


def _s3_retryable() -> tuple:
    """The S3 stack's errors of a broken or slow link, as s3fs retries them itself (s3fs.core.S3_RETRYABLE_ERRORS:
    botocore's HTTP client errors, aiohttp's payload errors, parser errors of throttled responses) plus
    botocore's connection errors and aiohttp's client errors; () where those packages are absent."""
    global _S3_RETRYABLE
    if _S3_RETRYABLE is None:
        found: list = []
        try:
            import s3fs.core

            found += list(s3fs.core.S3_RETRYABLE_ERRORS)
        except ImportError:
            pass
        try:
            import botocore.exceptions as be

            found += [be.ConnectionError, be.HTTPClientError, be.IncompleteReadError]
        except ImportError:
            pass
        try:
            import aiohttp

            found.append(aiohttp.ClientError)
        except ImportError:
            pass
        import http.client

        found.append(http.client.HTTPException)  # IncompleteRead of a cut response
        _S3_RETRYABLE = tuple(found)
    return _S3_RETRYABLE


def is_transient(e: BaseException) -> bool:
    """Whether a retry can cure `e`: an OSError (a reset, a timeout, an early end of stream; s3fs turns S3's
    throttling and server errors into OSError too) or one of the S3 client's retryable errors, or an error
    raised while handling one (a library tripping over a broken connection). Not a missing or forbidden file."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, _NOT_FOUND + (PermissionError,)):
            return False
        if isinstance(e, OSError) or isinstance(e, _s3_retryable()):
            return True
        e = e.__cause__ or e.__context__
    return False


class RetryingFile(io.RawIOBase):
    """A read-only, seekable view of one file (local or fsspec URL) that survives transient read errors.

    Every read returns exactly the bytes asked for, up to the file's size learnt at open: an error, or an empty
    read before that size, closes the underlying file, waits, reopens it and seeks back (see ReadRetry). So a
    short read means the real end of the file, and `at_end` tells that a read asked for bytes beyond it, which
    is what proves a truncation. A reopened file with another size or ETag is `changed_during_read`. A single
    read of more than `max_read_bytes` raises `corrupt_tar` (only an oversized tar header asks for that).
    """

    def __init__(self, path: str, retry: ReadRetry = DEFAULT_READ_RETRY, max_read_bytes: int | None = None,
                 block_size: int = 8 << 20, sleep: Callable[[float], None] = time.sleep):
        super().__init__()
        self.path, self.retry, self.max_read_bytes = str(path), retry, max_read_bytes
        self.block_size, self._sleep = block_size, sleep
        self._fs, self._p = storage.filesystem(self.path)
        self._f, self._fpos, self._pos = None, 0, 0
        self.size: int | None = None
        self._etag = None
        self.at_end = False
        self.retries = 0  # retries made, all reads together
        self._retrying("open", self._open)

    # -- the underlying file
    def _open(self) -> None:
        f = self._fs.open(self._p, "rb", block_size=self.block_size)
        try:
            size = getattr(f, "size", None)
            size = int(self._fs.size(self._p) if size is None else size)
            details = getattr(f, "details", None)
            etag = details.get("ETag") if isinstance(details, dict) else None
        except BaseException:
            f.close()
            raise
        if self.size is None:
            self.size, self._etag = size, etag
        elif size != self.size or (etag and self._etag and etag != self._etag):
            f.close()
            raise ShardReadError("changed_during_read", f"the file changed while it was read (size {self.size} -> "
                                 f"{size}, etag {self._etag} -> {etag}); rerun once its writer is done", self.path)
        self._f, self._fpos = f, 0

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:
                pass  # a broken connection may fail to close too; the next try opens a fresh one

    def _retrying(self, what: str, fn: Callable):
        attempt = 0
        while True:
            try:
                return fn()
            except ShardReadError:
                raise
            except _NOT_FOUND as e:
                raise ShardReadError("not_found", f"{type(e).__name__}: {e}", self.path) from e
            except PermissionError as e:
                raise ShardReadError("access_denied", f"{e}; check the credentials' read access", self.path) from e
            except Exception as e:  # noqa: BLE001 -- sorted below: transient or not
                if type(e).__name__ == "FileExpired":  # s3fs: the ETag changed under an open file
                    raise ShardReadError("changed_during_read", str(e), self.path) from e
                if hub.is_hub(self.path) and (reason := hub.permanent_error(e)):
                    raise ShardReadError(reason, " ".join(str(e).split())[:300], self.path) from e
                if not is_transient(e):  # a bug or a lasting condition: a retry cannot help, the shard fails now
                    raise ShardReadError("unexpected_error", f"{what}: {type(e).__name__}: {e} (not a transient "
                                         "error: not retried; traceback in the job's log file)", self.path) from e
                self._drop()
                attempt += 1
                self.retries += 1
                if attempt >= self.retry.attempts or self.retries > self.retry.max_retries:
                    raise ShardReadError("read_failed", f"{what} failed {attempt} times ({self.retries} retries for "
                                         f"this file), last: {type(e).__name__}: {e}", self.path) from e
                self._sleep(self.retry.delay(attempt))

    # -- io.RawIOBase
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + pos < 0:
            raise ValueError(f"negative seek position {base + pos}")
        self._pos = base + pos  # the underlying file seeks lazily, on the next read
        return self._pos

    def read(self, n: int = -1) -> bytes:
        self._checkClosed()
        want = self.size - self._pos if n is None or n < 0 else n
        n = max(0, min(want, self.size - self._pos))
        if n < want:
            self.at_end = True  # asked for bytes past the end of the file
        if n == 0:
            return b""
        if self.max_read_bytes is not None and n > self.max_read_bytes:
            raise ShardReadError("corrupt_tar", f"a tar header at offset {self._pos} asks to read {n} bytes, more "
                                 f"than the member limit of {self.max_read_bytes} (--max-member-bytes)", self.path)
        chunks: list[bytes] = []
        pos, got = self._pos, 0

        def read_rest() -> None:
            nonlocal got
            if self._f is None:
                self._open()
            if self._fpos != pos + got:
                self._f.seek(pos + got)
                self._fpos = pos + got
            while got < n:
                c = self._f.read(n - got)
                if not c:
                    raise _EarlyEOF(f"the stream ended at byte {pos + got} of {self.size}")
                chunks.append(c)
                got += len(c)
                self._fpos += len(c)

        self._retrying(f"reading {n} bytes at offset {pos}", read_rest)
        self._pos += n
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def pread(self, pos: int, n: int) -> bytes:
        self.seek(pos)
        return self.read(n)

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


# ----------------------------------------------------------------------------------------------------------
# webdataset tars

_USED_SUFFIXES = frozenset(IMAGE_SUFFIXES) | {"txt", "json"}
_SCAN_CHUNK = 1 << 16
_KINDS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char device",
          tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo", tarfile.DIRTYPE: "directory"}


def _split_member(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the file name; suffix = the rest."""
    d, base = posixpath.split(name)
    stem, _, suffix = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), suffix.lower()


def _printable(name: str) -> str:
    """A member name that tarfile decoded with surrogate escapes, as valid text (bad bytes shown as \\xNN)."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class _Gathering:
    """The sample whose members are being read."""
    idx: int
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # suffix -> bytes, the used members only
    listed: list[str] = field(default_factory=list)  # every member's suffix, with its kind if not a file
    suffixes: set[str] = field(default_factory=set)
    error: tuple[str, str, str] | None = None

    def fail(self, reason: str, detail: str) -> None:
        if self.error is None:  # the first problem found is the sample's reason
            self.error = ("read", reason, detail)

    def finish(self) -> RawSample:
        s = RawSample(idx=self.idx, key=self.key, txt=self.members.get("txt"), json=self.members.get("json"))
        if self.error is not None:
            s.txt = s.json = None
            s.error = self.error
            return s
        for suffix in IMAGE_SUFFIXES:
            if suffix in self.members:
                s.image, s.image_suffix = self.members[suffix], suffix
                break
        else:
            s.error = ("read", "no_image", f"members: {self.listed or 'none'}")
        return s


def iter_tar_samples(shard: ShardInput, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                     retry: ReadRetry = DEFAULT_READ_RETRY) -> Iterator[RawSample | ShardEnd]:
    """Stream the samples of an img2dataset tar in order; the last item is a ShardEnd (see the module doc)."""
    with RetryingFile(shard.path, retry, max_read_bytes=max(max_member_bytes, _SCAN_CHUNK)) as f:
        yield from _tar_samples(f, max_member_bytes)


def _tar_samples(f: RetryingFile, limit: int) -> Iterator[RawSample | ShardEnd]:
    if f.size == 0:
        yield ShardEnd(n_samples=0, complete=False, detail="the tar is empty (0 bytes): cut before its first member")
        return
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except ShardReadError:
        raise
    except Exception as e:  # noqa: BLE001
        if f.at_end and f.size < 512 and f.pread(257, 5) == b"ustar":
            yield ShardEnd(n_samples=0, complete=False, detail=f"the tar ends inside its first header ({f.size} "
                                                                 "bytes)")
            return
        raise ShardReadError("corrupt_tar", f"not a tar file: {type(e).__name__}: {e}", f.path) from None
    idx, seen, cur, directories = 0, set(), None, 0
    complete, detail = True, ""
    while True:
        offset = tar.offset
        try:
            m = tar.next()
        except ShardReadError:
            raise
        except Exception as e:  # noqa: BLE001 -- tarfile raises ReadError, ValueError, UnicodeError, ...
            if f.at_end:
                complete = False
                detail = f"the tar ends at byte {f.size}, inside the framing after offset {offset}: {e}"
                break
            raise ShardReadError("corrupt_tar", f"bad tar header at offset {offset}: {type(e).__name__}: {e}",
                                 f.path) from None
        if m is None:
            break
        tar.members.clear()  # tarfile keeps every header it read; nothing here looks back
        name, bad_name = m.name, False
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            name, bad_name = _printable(name), True
        if m.isdir():
            directories += 1
            continue
        key, suffix = _split_member(name)
        if cur is None or key != cur.key or suffix in cur.suffixes:
            if cur is not None:
                yield cur.finish()
                idx += 1
            cur = _Gathering(idx=idx, key=key)
            if key in seen:
                cur.fail("duplicate_key", f"key {key} appears more than once in the tar (again at member {name} "
                                          f"at offset {m.offset})")
            seen.add(key)
        kind = "" if m.isreg() else _KINDS.get(m.type, f"type {m.type!r}")
        cur.suffixes.add(suffix)
        cur.listed.append(f"{suffix} ({kind})" if kind else suffix)
        if bad_name:
            cur.fail("bad_member_name", f"member name {name} is not valid UTF-8")
        if not (m.isreg() or m.type not in tarfile.SUPPORTED_TYPES):
            continue  # links, devices, fifos: no data in the tar
        if m.size > limit:
            cur.fail("member_too_large", f"{name} declares {m.size} bytes, above the limit of {limit} bytes "
                                         "(--max-member-bytes); not read")
        if not m.issparse() and m.offset_data + m.size > f.size:
            complete = False
            detail = (f"tar truncated after {idx} samples: member {name} needs bytes up to "
                      f"{m.offset_data + m.size} but the file has {f.size}")
            cur.fail("truncated_tar", detail)
            break
        if cur.error is not None or m.size > limit or not m.isreg() or suffix not in _USED_SUFFIXES:
            continue  # not needed: skipped by seeking, never read
        try:
            data = tar.extractfile(m).read() if m.issparse() else f.pread(m.offset_data, m.size)
        except ShardReadError:
            raise
        except Exception as e:  # noqa: BLE001 -- a library error on one member: its framing is intact
            if isinstance(e, tarfile.ReadError) and f.at_end:
                complete, detail = False, f"tar truncated after {idx} samples, inside member {name}: {e}"
                cur.fail("truncated_tar", detail)
                break
            cur.fail("member_unreadable", f"{name}: {type(e).__name__}: {e}")
            continue
        cur.members[suffix] = data
    if complete:
        complete, detail = _check_end_of_archive(f, tar.offset)
    if cur is not None:
        yield cur.finish()
        idx += 1
    yield ShardEnd(n_samples=idx, complete=complete, detail=detail,
                   extra={"tar_directories": directories} if directories else {})


def _check_end_of_archive(f: RetryingFile, offset: int) -> tuple[bool, str]:
    """tarfile stopped at `offset` without an error: at the end-of-archive blocks (two zero blocks, then only
    zero padding), at the file's end (cut), or at a header it could not parse (damage) -- it does not say."""
    rest = f.size - offset
    if rest <= 0:
        return False, "the tar ends without its end-of-archive blocks (cut at a member boundary?)"
    head = f.pread(offset, min(rest, 1024))
    if head[:512].count(0) != len(head[:512]):
        if rest < 512:
            return False, f"the tar is cut inside the member header at offset {offset}"
        raise ShardReadError("corrupt_tar", f"invalid tar header at offset {offset} of {f.size} bytes; the members "
                             "after it cannot be found", f.path)
    if head.count(0) != len(head):
        raise ShardReadError("corrupt_tar", f"a single zero block at offset {offset} followed by data", f.path)
    if rest < 1024:
        return False, "the tar's end-of-archive blocks are cut short"
    pos = offset + 1024
    while pos < f.size:
        chunk = f.read(min(_SCAN_CHUNK, f.size - pos))
        if chunk.count(0) != len(chunk):
            at = pos + len(chunk) - len(chunk.lstrip(b"\0"))
            raise ShardReadError("corrupt_tar", f"data at offset {at} after the end-of-archive marker at {offset} "
                                 "(concatenated tars?); rewrite the shard as one tar", f.path)
        pos += len(chunk)
    return True, ""


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
