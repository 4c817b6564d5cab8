"""The reader of one img2dataset (webdataset) tar: its samples as raw member bytes, in tar order, then a
ShardEnd; memory bounded by one sample's members whatever the tar declares; a cut tar is reported only when
proven (every byte read and the framing needs more), any other damage fails the shard.

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
(`corrupt_tar`) instead of being read.

Where the proof stands: tarfile parses the headers (`TarFile.next`, `TarInfo.offset_data`: where a member's
data starts) and `RetryingFile.at_end` says that a read asked for bytes past the file's end. A framing error
with `at_end` is a cut; without it, damage. After the last header tarfile returns None, which does not say
why: `_check_end_of_archive` reads what follows (end-of-archive blocks, a cut, or a bad header).
"""
from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from tarflow.data.images import IMAGE_SUFFIXES
from tarflow.data.retrying_file import DEFAULT_READ_RETRY, ReadRetry, RetryingFile, ShardReadError

if TYPE_CHECKING:
    from tarflow.data.img2dataset import ShardInput

# 64 MiB: far above any image img2dataset writes (it resizes by default; even kept originals are a few MB, and
# an image that passes the decoder's 89 M pixel limit compresses well below this), and small enough that one
# sample's members, or a chunk of rows, fit a reader worker's memory many times over.
DEFAULT_MAX_MEMBER_BYTES = 64 << 20

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
