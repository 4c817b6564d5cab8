"""One file (local, s3://, hf://) read as if the link never failed: `RetryingFile` retries transient errors
(reopen, seek back, backoff) and fails the shard with a named reason (`ShardReadError`) once they outlast
`ReadRetry`; a short read happens only at the file's real end, which is what proves a truncation.

Faults, and what each becomes:
- Transient read errors (`is_transient`: the OSError family but FileNotFoundError/PermissionError, i.e. a
  connection reset, a timeout, a read that ends before the file's size; and the S3 client's retryable errors,
  which s3fs raises as they are once its own retries are spent) are retried: the file is reopened and read on
  from the same position, with exponential backoff (`ReadRetry`). When the attempts run out the whole shard
  fails: `ShardReadError("read_failed")`. No sample of it is kept, so a rerun reads it again; nothing
  transient is ever recorded as lost. Any other error of the reading (a TypeError, a KeyError: a bug, not the
  link) is not retried: the shard fails at once, `ShardReadError("unexpected_error")` with the error as cause.
"""
from __future__ import annotations

import io
import random
import time
from dataclasses import dataclass
from typing import Callable

from tarflow.data import hub, storage


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
