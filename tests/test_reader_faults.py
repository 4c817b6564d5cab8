"""The img2dataset tar reader under faults: transient errors are retried, never recorded as loss; only a proven
truncation keeps a partial shard; memory is bounded whatever a tar declares; every member is counted.

Faults are injected into the byte stream (a filesystem whose files fail at a chosen offset) and, for S3,
through a loopback proxy in front of the session's S3 server that resets connections. No Ray here.
"""
from __future__ import annotations

import io
import os
import pickle
import posixpath
import tarfile
import tracemalloc

import pytest
import shardmaker
from faultproxy import FaultProxy

from tarflow.data import img2dataset as i2d
from tarflow.data import storage

FAST = i2d.ReadRetry(attempts=3, backoff_s=0.001, max_backoff_s=0.002)


@pytest.fixture(scope="module")
def photos():
    return shardmaker.sample_images()[:6]


def _members(photos, first=0) -> list[tuple[str, bytes]]:
    out = []
    for i, (name, data, cap) in enumerate(photos):
        key = f"{first + i:06d}"
        out += [(f"{key}.jpg", data), (f"{key}.json", b'{"caption": "%s"}' % cap.encode()),
                (f"{key}.txt", cap.encode())]
    return out


def _shard(path) -> i2d.ShardInput:
    return i2d.ShardInput(path=str(path), name=os.path.basename(str(path)).split(".")[0], format="webdataset",
                          size=os.path.getsize(path))


def _summary(samples) -> list[tuple[str, str | None]]:
    return [(s.key, s.error and s.error[1]) for s in samples]


@pytest.fixture
def good_tar(tmp_path, photos):
    path = tmp_path / "00000.tar"
    shardmaker.write_tar(str(path), _members(photos))
    return path


# ----------------------------------------------------------------------------------------------------------
# Faults in the byte stream


class FlakyFS:
    """The local filesystem, but every file it opens breaks when a read reaches `fault_at`: it returns the
    bytes before that point, then raises `error` (or, with error=None, returns b"" as if the stream ended),
    `times` times in all (None: every time). `on_fault` runs after each fault (e.g. to replace the file)."""

    def __init__(self, fault_at: int, error: Exception | None, times: int | None = 1, on_fault=None):
        self.fault_at, self.error, self.times, self.on_fault = fault_at, error, times, on_fault
        self.opens, self.faults = 0, 0

    def open(self, path, mode="rb", **kw):
        self.opens += 1
        return _FlakyFile(open(path, "rb"), self)

    def size(self, path):
        return os.path.getsize(path)

    def take(self) -> bool:
        if self.times is not None and self.faults >= self.times:
            return False
        self.faults += 1
        return True


class _FlakyFile:
    def __init__(self, f, fs: FlakyFS):
        self.f, self.fs, self.broken = f, fs, False

    def seek(self, pos, whence=0):
        return self.f.seek(pos, whence)

    def read(self, n=-1):
        if self.broken:
            if self.fs.on_fault:
                self.fs.on_fault()
            if self.fs.error is None:
                return b""
            raise self.fs.error
        pos = self.f.tell()
        end = pos + (n if n >= 0 else 1 << 62)
        if pos <= self.fs.fault_at < end and self.fs.take():
            self.broken = True
            if self.fs.fault_at > pos:
                return self.f.read(self.fs.fault_at - pos)  # the bytes before the fault, then it breaks
            return self.read(n)
        return self.f.read(n)

    def close(self):
        self.f.close()


@pytest.fixture
def flaky(monkeypatch):
    """Install a FlakyFS for local paths: flaky(fault_at, error, times) -> the FlakyFS."""
    real = storage.filesystem

    def install(*args, **kw):
        fs = FlakyFS(*args, **kw)
        monkeypatch.setattr(storage, "filesystem",
                            lambda p: (fs, os.path.abspath(str(p))) if not storage.is_remote(p) else real(p))
        return fs
    return install


def _raised_while_handling(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except type(inner):
            raise outer
    except type(outer) as e:
        return e


def _client_payload_error():
    import aiohttp

    return aiohttp.ClientPayloadError("Response payload is not completed")


@pytest.mark.parametrize("error", [ConnectionResetError(104, "Connection reset by peer"),
                                   _client_payload_error(),  # what s3fs raises once its own retries are spent
                                   # a library tripping over a broken connection (s3fs raised this after resets)
                                   _raised_while_handling(IndexError("pop from an empty deque"),
                                                          ConnectionResetError(104, "Connection reset by peer")),
                                   None],  # an early EOF: the stream ends before the file's size
                         ids=["connection_reset", "s3_payload_error", "error_while_handling_a_reset", "early_eof"])
def test_a_transient_fault_mid_shard_is_retried_and_every_sample_read(good_tar, flaky, error):
    clean, clean_end = i2d.read_all(_shard(good_tar))
    fs = flaky(fault_at=os.path.getsize(good_tar) // 2, error=error, times=1)
    samples, end = i2d.read_all(_shard(good_tar), retry=FAST)
    assert fs.faults == 1 and fs.opens >= 2  # it did break, and was reopened
    assert end.complete and end.n_samples == clean_end.n_samples == 6
    assert [(s.key, s.image, s.txt, s.json, s.error) for s in samples] == \
           [(s.key, s.image, s.txt, s.json, s.error) for s in clean]


@pytest.mark.parametrize("error", [ConnectionResetError(104, "Connection reset by peer"), None],
                         ids=["connection_reset", "early_eof"])
def test_a_persistent_fault_fails_the_shard_after_the_retries(good_tar, flaky, error):
    fs = flaky(fault_at=os.path.getsize(good_tar) // 2, error=error, times=None)
    with pytest.raises(i2d.ShardReadError) as e:
        i2d.read_all(_shard(good_tar), retry=FAST)
    assert e.value.reason == "read_failed" and fs.faults == FAST.attempts
    assert str(good_tar) in str(e.value) and "\n" not in str(e.value)
    # it travels between processes (Ray) intact
    again = pickle.loads(pickle.dumps(e.value))
    assert (again.reason, again.detail, str(again)) == (e.value.reason, e.value.detail, str(e.value))


def test_missing_or_forbidden_files_are_not_retried(good_tar, flaky, tmp_path):
    fs = flaky(fault_at=0, error=PermissionError(13, "Access Denied"), times=None)
    with pytest.raises(i2d.ShardReadError) as e:
        i2d.read_all(_shard(good_tar), retry=FAST)
    assert e.value.reason == "access_denied" and fs.faults == 1
    with pytest.raises(i2d.ShardReadError) as e:
        i2d.read_all(i2d.ShardInput(str(tmp_path / "gone.tar"), "gone", "webdataset", 1), retry=FAST)
    assert e.value.reason == "not_found"


def test_a_file_replaced_while_being_read_fails_the_shard(good_tar, flaky, photos):
    def replace():
        shardmaker.write_tar(str(good_tar), _members(photos[:2]))
    flaky(fault_at=os.path.getsize(good_tar) // 2, error=ConnectionResetError(104, "reset"), on_fault=replace)
    with pytest.raises(i2d.ShardReadError, match="changed_during_read"):
        i2d.read_all(_shard(good_tar), retry=FAST)


def test_a_truncated_file_keeps_what_was_readable_even_with_a_fault_on_the_way(tmp_path, photos, flaky):
    path = tmp_path / "00000.tar"
    shardmaker.write_tar(str(path), _members(photos))
    with tarfile.open(path) as t:
        cut = t.getmember("000004.jpg")
    os.truncate(path, cut.offset_data + cut.size // 2)
    fs = flaky(fault_at=cut.offset_data // 2, error=ConnectionResetError(104, "reset"))
    samples, end = i2d.read_all(_shard(path), retry=FAST)
    assert fs.faults == 1
    assert _summary(samples) == [(f"{i:06d}", None) for i in range(4)] + [("000004", "truncated_tar")]
    assert not end.complete and end.n_samples == 5 and "truncated" in end.detail
    assert all(s.image == photos[i][1] for i, s in enumerate(samples[:4]))


def test_damage_that_is_not_a_truncation_fails_the_shard(tmp_path, photos):
    path = tmp_path / "00000.tar"
    shardmaker.write_tar(str(path), _members(photos))
    with tarfile.open(path) as t:
        third = t.getmember("000002.jpg")
    data = bytearray(path.read_bytes())
    data[third.offset:third.offset + 100] = b"\x07" * 100  # a garbled header in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(i2d.ShardReadError) as e:
        i2d.read_all(_shard(path))
    assert e.value.reason == "corrupt_tar" and f"offset {third.offset}" in e.value.detail

    path.write_bytes(b"<html>not a tar</html>" * 100)
    with pytest.raises(i2d.ShardReadError, match="corrupt_tar"):
        i2d.read_all(_shard(path))

    one = tmp_path / "00001.tar"
    shardmaker.write_tar(str(one), _members(photos[:2]))
    two = tmp_path / "00002.tar"
    shardmaker.write_tar(str(two), _members(photos[2:4], first=2))
    (tmp_path / "cat.tar").write_bytes(one.read_bytes() + two.read_bytes())  # `cat a.tar b.tar`
    with pytest.raises(i2d.ShardReadError, match="after the end-of-archive marker"):
        i2d.read_all(_shard(tmp_path / "cat.tar"))


def test_parquet_shards_get_the_same_retries(tmp_path, photos, flaky):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"key": f"{i:06d}", "jpg": d, "caption": c, "status": "success"} for i, (_, d, c) in enumerate(photos)]
    path = tmp_path / "00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    shard = i2d.ShardInput(str(path), "00000", "parquet", os.path.getsize(path))
    fs = flaky(fault_at=os.path.getsize(path) // 2, error=ConnectionResetError(104, "reset"), times=1)
    samples, end = i2d.read_all(shard, retry=FAST)
    assert fs.faults == 1 and [s.image for s in samples] == [d for _, d, _ in photos] and end.n_samples == 6
    flaky(fault_at=os.path.getsize(path) // 2, error=ConnectionResetError(104, "reset"), times=None)
    with pytest.raises(i2d.ShardReadError, match="read_failed"):
        i2d.read_all(shard, retry=FAST)
    path.write_bytes(path.read_bytes()[:-100])  # no footer
    flaky(fault_at=0, error=None, times=0)
    with pytest.raises(i2d.ShardReadError, match="corrupt_parquet"):
        i2d.read_all(i2d.ShardInput(str(path), "00000", "parquet", os.path.getsize(path)), retry=FAST)


# ----------------------------------------------------------------------------------------------------------
# Bounded memory


def _raw_member(name: str, data: bytes = b"", size: int | None = None, type=tarfile.REGTYPE, linkname="") -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.linkname, ti.mtime = len(data) if size is None else size, type, linkname, 1_700_000_000
    return ti.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


def test_a_small_tar_declaring_a_1gb_member(tmp_path, photos):
    """The shape seen in the wild: 20 KB on disk, a header saying 1 GB. Nothing is read for it."""
    path = tmp_path / "00000.tar"
    body = b"".join(_raw_member(n, d) for n, d in _members(photos[:2]))
    body += _raw_member("000002.jpg", size=1 << 30) + os.urandom(20_000)
    path.write_bytes(body)
    tracemalloc.start()
    try:
        samples, end = i2d.read_all(_shard(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _summary(samples) == [("000000", None), ("000001", None), ("000002", "member_too_large")]
    assert str(1 << 30) in samples[2].error[2] and samples[2].image is None
    assert not end.complete  # the file ends inside the member it declares: a proven truncation
    assert peak < 4 << 20, peak


def test_a_real_1gib_member_is_skipped_without_reading_it(tmp_path, photos):
    """A sparse 1 GiB member between good samples: recorded as too large, the samples after it are fine."""
    path = tmp_path / "00000.tar"
    with open(path, "wb") as f:
        f.write(b"".join(_raw_member(n, d) for n, d in _members(photos[:2])))
        f.write(_raw_member("000002.jpg", size=1 << 30))
        f.seek(1 << 30, io.SEEK_CUR)  # a hole: no disk used, reads as zeros
        f.write(b"".join(_raw_member(n, d) for n, d in _members(photos[2:4], first=3)) + b"\0" * 10240)
    assert os.path.getsize(path) > 1 << 30
    tracemalloc.start()
    try:
        samples, end = i2d.read_all(_shard(path), max_member_bytes=16 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _summary(samples) == [("000000", None), ("000001", None), ("000002", "member_too_large"),
                                 ("000003", None), ("000004", None)]
    assert samples[3].image == photos[2][1] and samples[4].txt == photos[3][2].encode()
    assert end.complete and end.n_samples == 5
    assert peak < 4 << 20, peak  # the old reader held the whole GiB


def test_the_member_limit_applies_to_ordinary_images(good_tar, photos):
    limit = sorted(len(d) for _, d, _ in photos)[3]  # some images above it, some at or below
    samples, end = i2d.read_all(_shard(good_tar), max_member_bytes=limit)
    for s, (_, data, _) in zip(samples, photos):
        assert (s.error and s.error[1]) == ("member_too_large" if len(data) > limit else None)
    assert end.complete and len(samples) == 6


# ----------------------------------------------------------------------------------------------------------
# Accounting


def _independent_count(path) -> int:
    """Samples by the documented rule, from tarfile's own full member list (random access, not the reader):
    non-directory members in tar order; a new sample when the key changes or a suffix repeats in a sample."""
    n, key, suffixes = 0, None, set()
    with tarfile.open(path) as t:
        for m in t.getmembers():
            if m.isdir():
                continue
            d, base = posixpath.split(m.name)
            stem, _, suffix = base.partition(".")
            k = posixpath.join(d, stem) if d else stem
            if k != key or suffix.lower() in suffixes:
                n, key, suffixes = n + 1, k, set()
            suffixes.add(suffix.lower())
    return n


def test_every_member_is_accounted_for(tmp_path, photos):
    _, jpg, cap = photos[0]
    raw = [_raw_member("000000.jpg", jpg), _raw_member("000000.txt", cap.encode())]
    raw += [_raw_member("rep.jpg", jpg)] * 1000  # 1,000 consecutive members with one name
    raw += [_raw_member("images/", type=tarfile.DIRTYPE),
            _raw_member("images/link.jpg", type=tarfile.SYMTYPE, linkname="../000000.jpg"),  # a symlink only
            _raw_member("hard.jpg", type=tarfile.LNKTYPE, linkname="000000.jpg"),
            _raw_member("hard.txt", b"a hard link and a caption")]
    raw += [_raw_member(n, d) for n, d in _members(photos[1:3], first=1)]
    path = tmp_path / "00000.tar"
    path.write_bytes(b"".join(raw) + b"\0" * 10240)

    samples, end = i2d.read_all(_shard(path))
    reasons = [s.error and s.error[1] for s in samples]
    ok = sum(r is None for r in reasons)
    assert end.complete and end.n_samples == len(samples) == _independent_count(path) == 1005
    assert ok + sum(r is not None for r in reasons) == len(samples)
    assert [s.idx for s in samples] == list(range(len(samples)))
    assert _summary(samples[:3]) == [("000000", None), ("rep", None), ("rep", "duplicate_key")]
    assert reasons.count("duplicate_key") == 999 and ok == 1 + 1 + 2
    link, hard = samples[1001], samples[1002]
    assert (link.key, link.error[1]) == ("images/link", "no_image") and "jpg (symlink)" in link.error[2]
    assert (hard.key, hard.error[1]) == ("hard", "no_image") and "jpg (hardlink)" in hard.error[2]
    assert end.extra["tar_directories"] == 1


def test_a_member_name_that_is_not_utf8_is_a_sample_error(tmp_path, photos):
    import pyarrow as pa

    _, jpg, cap = photos[0]
    bad = "bad-\udcff\udcfe.jpg"  # the bytes 0xff 0xfe in a name, as tarfile decodes them
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as t:
        for name, data in [("000000.jpg", jpg), (bad, jpg), ("000002.jpg", jpg)]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    assert b"bad-\xff\xfe.jpg" in path.read_bytes()
    samples, end = i2d.read_all(_shard(path))
    assert _summary(samples) == [("000000", None), ("bad-\\xff\\xfe", "bad_member_name"), ("000002", None)]
    assert end.complete
    # every field of the bad sample is valid text: it fits an Arrow row
    pa.table({"key": [s.key for s in samples], "detail": [s.error and s.error[2] for s in samples]})


# ----------------------------------------------------------------------------------------------------------
# S3 through a proxy that resets connections


@pytest.fixture
def s3_tar(s3_bucket, good_tar):
    url = f"{s3_bucket}/laion/00000.tar"
    fs, p = storage.filesystem(url)
    fs.put_file(str(good_tar), p)
    return i2d.ShardInput(path=url, name="00000", format="webdataset", size=os.path.getsize(good_tar))


def _through(monkeypatch, proxy: FaultProxy):
    """storage.filesystem for s3:// through the proxy, in a fresh s3fs instance whose own retries are off, so
    that the faults reach the reader (s3fs retries a reset itself; after its retries it raises the same way)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": proxy.url},
                           config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"}})
    fs.retries = 1
    monkeypatch.setattr(storage, "filesystem", lambda p: (fs, p.removeprefix("s3://")))
    return fs


def test_s3_read_survives_a_connection_reset(s3_endpoint, s3_tar, good_tar, monkeypatch):
    clean, _ = i2d.read_all(_shard(good_tar))
    with FaultProxy(s3_endpoint, reset_after_bytes=s3_tar.size // 3, resets=1, lifetime_s=60) as proxy:
        fs = _through(monkeypatch, proxy)
        with pytest.raises(Exception):  # the fault does escape s3fs here: the reader's own retry is what helps
            with fs.open(s3_tar.path, "rb") as f:
                f.read()
        proxy.resets_left = 1
        samples, end = i2d.read_all(s3_tar, retry=FAST)
    assert proxy.resets_done == 2
    assert end.complete and [(s.key, s.image, s.error) for s in samples] == [(s.key, s.image, s.error)
                                                                             for s in clean]


def test_s3_read_with_persistent_resets_fails_the_shard(s3_endpoint, s3_tar, monkeypatch):
    with FaultProxy(s3_endpoint, reset_after_bytes=s3_tar.size // 3, resets=None, lifetime_s=60) as proxy:
        _through(monkeypatch, proxy)
        with pytest.raises(i2d.ShardReadError) as e:
            i2d.read_all(s3_tar, retry=FAST)
    assert e.value.reason == "read_failed" and proxy.resets_done == FAST.attempts
    assert s3_tar.path in str(e.value)
