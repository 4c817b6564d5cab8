"""One way to reach files, local or in object storage.

Paths are plain local paths or fsspec URLs (s3://bucket/key, ...). s3fs follows AWS_ENDPOINT_URL and the usual
AWS_* variables, so the same code runs against AWS, MinIO, or a test server on 127.0.0.1. hf:// paths (model and
dataset repos on the Hugging Face Hub) go through tarflow.data.hub: a model file is read from the node's hub cache
(downloaded there once), dataset files by byte ranges; listings and checks work as for s3://.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs

from tarflow.data import hub


def tarflow_home() -> Path:
    """tarflow's folder on this machine, $TARFLOW_HOME (default ~/.cache/tarflow): the bundled sample and demo
    models, job logs, the hash cache, model folders copied from object storage."""
    return Path(os.environ.get("TARFLOW_HOME", Path.home() / ".cache" / "tarflow"))


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def filesystem(path: str):
    """Return (fs, path-inside-fs) for `path`."""
    path = str(path)
    if hub.is_hub(path):
        return hub.filesystem(path)
    if is_remote(path):
        return url_to_fs(path, **_storage_options(path))
    return fsspec.filesystem("file"), os.path.abspath(path.removeprefix("file://"))


def _storage_options(path: str) -> dict:
    if path.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def protocol_prefix(path: str) -> str:
    path = str(path)
    return path.split("://", 1)[0] + "://" if is_remote(path) else ""


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(path: str) -> str:
    path = str(path)
    if is_remote(path):
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(os.path.abspath(path))


def model_file(path: str) -> str:
    """A path to read a model file from: a Hub model file's copy in this node's hub cache (downloaded there once;
    every process on the node shares it), any other path as it is."""
    return hub.local_file(path) if hub.is_model(path) else str(path)


def read_bytes(path: str) -> bytes:
    path = model_file(path)  # a model's files are read whole, and by every actor: from the node's cache
    fs, p = filesystem(path)
    if fs.isdir(p):
        raise IsADirectoryError(path)
    with fs.open(p, "rb") as f:
        return f.read()


def read_ranges(path: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes [start, end) of `path` for each range, and only those (one ranged GET each on S3, concurrent;
    no read-ahead block around them)."""
    if not ranges:
        return []
    fs, p = filesystem(model_file(path))  # a Hub model's file from the node's cache, like read_bytes
    return fs.cat_ranges([p] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges])


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.isdir(p)


def size(path: str) -> int:
    fs, p = filesystem(path)
    return int(fs.size(p))


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write `data` so that no reader ever sees a partial file under `path`.

    Locally: write a hidden temporary sibling, fsync, rename (atomic on POSIX). On object stores a PUT is
    already atomic: the object appears whole or not at all, so a single put is used.
    """
    if is_remote(path) and not hub.is_hub(path):
        fs, p = filesystem(path)
        fs.pipe_file(p, data)
        return
    with open_atomic(path) as f:
        f.write(data)


@contextlib.contextmanager
def open_atomic(path: str):
    """A binary file to stream `path` into; no reader ever sees it partial, and an error leaves nothing.

    Locally: a hidden temporary sibling, fsynced and renamed over `path` when the block ends, removed when it
    raises. On object stores: the upload (multipart beyond the filesystem's block size), completed when the
    block ends, aborted when it raises."""
    if hub.is_hub(path):  # HfFileSystem would make a commit with whatever token is around
        raise PermissionError(hub.NOT_WRITTEN.format(url=path))
    fs, p = filesystem(path)
    if is_remote(path):
        f = fs.open(p, "wb")
        try:
            yield f
        except BaseException:
            getattr(f, "discard", lambda: None)()  # s3fs: aborts the multipart upload (nothing put before it)
            with contextlib.suppress(AttributeError):
                f.closed = True  # never completed, not even by the garbage collector
            raise
        f.close()
        return
    d = os.path.dirname(p)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(p)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


COPY_CHUNK = 16 << 20  # a copy's part size: what one copy holds in memory at a time (s3fs: per part in flight)


def copy_file(src: str, dst: str) -> None:
    """Copy a (local or remote) file to another, streamed (a 2.4 GB checkpoint is never whole in memory) and
    appearing whole or not at all: a local `dst` is a temporary sibling renamed into place, a remote one an
    upload that completes at the end (fsspec put / copy; a failed multipart upload is aborted)."""
    import shutil

    if hub.is_hub(dst):
        raise PermissionError(hub.NOT_WRITTEN.format(url=dst))
    src = model_file(src)  # a Hub model file: its copy in the node's hub cache
    sfs, sp = filesystem(src)
    dfs, dp = filesystem(dst)
    if is_remote(dst):
        if not is_remote(src):
            dfs.put_file(sp, dp, chunksize=COPY_CHUNK)
        elif type(sfs) is type(dfs) and sfs.storage_options == dfs.storage_options:
            dfs.copy(sp, dp)  # server-side: nothing passes through this process
        else:  # between two stores: through a local temporary file
            import tempfile

            with tempfile.TemporaryDirectory(prefix="tarflow-copy-") as tmp:
                local = os.path.join(tmp, os.path.basename(dp))
                sfs.get_file(sp, local)
                dfs.put_file(local, dp, chunksize=COPY_CHUNK)
        return
    d = os.path.dirname(dp)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(dp)}.{uuid.uuid4().hex}.tmp")
    try:
        if is_remote(src):
            sfs.get_file(sp, tmp)
        else:
            shutil.copyfile(sp, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def copy_folder(src: str, dst: str, skip=()) -> None:
    """Copy the files under folder `src` to `dst` (each local or remote), file by file as copy_file does;
    `skip`: names at the top level left out."""
    root = str(src).rstrip("/")
    for path in sorted(list_sizes(root, recursive=True)):
        rel = path[len(root) + 1:]
        if rel.split("/", 1)[0] not in skip:
            copy_file(path, join(dst, rel))


def remove(path: str) -> None:
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p)


def remove_many(paths: list[str]) -> None:
    """Remove files (missing ones are fine) with one fsspec `rm`: batched deletes on object stores (1,000 keys a
    request)."""
    if not paths:
        return
    fs, _ = filesystem(paths[0])
    try:
        fs.rm([filesystem(x)[1] for x in paths])
    except FileNotFoundError:  # one was gone already: the rest one by one
        for path in paths:
            remove(path)


def listdir(path: str) -> list[str]:
    """Full paths (with the protocol prefix) of the files directly under `path`; [] if it does not exist."""
    fs, p = filesystem(path)
    if not fs.exists(p):
        return []
    prefix = protocol_prefix(path)
    return sorted(prefix + e for e in fs.ls(p, detail=False) if not fs.isdir(e))


def list_sizes(path: str, recursive: bool = False) -> dict[str, int]:
    """{full path: size} of the files under folder/prefix `path`, from listings alone (one request per 1,000
    keys on S3, never one per file); {} when there is nothing there."""
    fs, p = filesystem(path)
    prefix = protocol_prefix(path)
    try:
        if recursive:
            found = fs.find(p, detail=True)
        else:
            found = {e["name"]: e for e in fs.ls(p, detail=True)}
    except FileNotFoundError:
        return {}
    return {prefix + k.removeprefix(prefix): int(e.get("size") or 0) for k, e in found.items()
            if e.get("type") != "directory"}


def glob_sizes(pattern: str) -> dict[str, int]:
    """{full path: size} of the files matching `pattern`, from the listings the glob makes anyway (no request
    per file)."""
    fs, p = filesystem(pattern)
    prefix = protocol_prefix(pattern)
    found = fs.glob(p, detail=True)
    return {prefix + k.removeprefix(prefix): int(e.get("size") or 0) for k, e in found.items()
            if e.get("type") != "directory"}


def iter_read_many(paths: list[str], chunk: int = 1000, max_workers: int = 64):
    """(path, bytes or None when missing) for many small files, `chunk` of them in memory at a time (read
    concurrently, as `read_many`): what a driver needs to go through 100,000 manifests in bounded memory."""
    for i in range(0, len(paths), chunk):
        yield from read_many(paths[i:i + chunk], max_workers=max_workers).items()


def read_many(paths: list[str], max_workers: int = 64) -> dict[str, bytes | None]:
    """{path: bytes, or None when missing} for many small files at once (one fsspec `cat`: concurrent requests
    on object stores, `max_workers` at a time; plain reads locally). Other errors (a folder: IsADirectoryError)
    raise."""
    if not paths:
        return {}
    fs, _ = filesystem(paths[0])
    inner = {filesystem(x)[1]: x for x in paths}
    got = fs.cat(list(inner), on_error="return", batch_size=max_workers)
    out = {}
    for k, v in got.items():
        path = inner.get(k) or inner.get(k.rstrip("/"))
        if isinstance(v, FileNotFoundError):
            out[path] = None
        elif isinstance(v, BaseException):
            raise v
        else:
            out[path] = v
    return {path: out[path] for path in paths if path in out}  # in the order asked (cat sorts)


def remove_tree(path: str) -> None:
    """Remove a folder/prefix and everything under it (nothing if absent)."""
    fs, p = filesystem(path)
    try:
        if fs.exists(p):
            fs.rm(p, recursive=True)
    except FileNotFoundError:
        pass


def file_identity(path: str) -> tuple[int, str]:
    """(size, version tag) of a file without reading it: mtime locally, the ETag on object stores."""
    fs, p = filesystem(path)
    info = fs.info(p)
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return int(info.get("size") or 0), str(tag)


def sha256(path: str, cache_dir=None) -> str:
    """Hex sha256 of a file's content, read in 8 MiB chunks (memory stays flat for multi-GB checkpoints).

    Remembered per (path, size, mtime/ETag) in `cache_dir` (default $TARFLOW_HOME/sha256), so a rerun does
    not read the file again."""
    import hashlib
    import json
    from pathlib import Path

    if cache_dir is None:
        cache_dir = tarflow_home() / "sha256"
    if hub.is_hub(path):  # the Hub keeps an LFS file's sha256; a small git file is hashed from the cache
        digest = hub.lfs_sha256(path)
        if digest:
            return digest
        path = hub.local_file(path)
    size_, tag = file_identity(path)
    key = hashlib.sha256(json.dumps([str(path), size_, tag]).encode()).hexdigest()[:32]
    entry = Path(cache_dir) / f"{key}.json"
    try:
        return json.loads(entry.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    fs, p = filesystem(path)
    with fs.open(p, "rb", block_size=8 << 20) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        write_bytes_atomic(str(entry), json.dumps({"path": str(path), "size": size_, "tag": tag,
                                                   "sha256": digest}).encode())
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return digest


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style brace ranges `{00000..00009}` (and `{a,b}` lists)."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))




def cached_folder_copy(url: str, cache_dir, keep=lambda rel: True, maxdepth: int | None = None):
    """Copy the files of the remote folder `url` for which `keep(relative path)` holds into a local folder
    under `cache_dir`; return that folder (a pathlib.Path).

    The local folder is named after the URL plus a hash of every kept file's path, size and ETag: an unchanged
    folder is reused, a changed one fetched anew. Files land in a temporary folder renamed into place once all
    sizes check out, so an interrupted or concurrent copy is never used. Raises FileNotFoundError when
    nothing is kept.
    """
    import hashlib
    import json
    import re
    import shutil
    from pathlib import Path

    if hub.is_hub(url):  # the hub's own cache: one copy per node, shared by every process there
        return hub.local_folder(url, keep, maxdepth)
    fs, root = filesystem(url)
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # s3fs keeps listings per process; a stale one would hide a changed folder
    try:
        found = fs.find(root, maxdepth=maxdepth, detail=True)
    except FileNotFoundError:
        found = {}
    listing = sorted(
        (p[len(root) + 1:], int(info.get("size") or 0), str(info.get("ETag") or info.get("etag") or ""))
        for p, info in found.items()
        if info.get("type") != "directory" and p.startswith(root + "/") and keep(p[len(root) + 1:])
    )
    if not listing:
        raise FileNotFoundError(f"{url}: no files found there; check the URL and the AWS_* credentials / "
                                "AWS_ENDPOINT_URL")
    key = hashlib.sha256(json.dumps([url.rstrip("/"), listing]).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1].strip("/"))[-80:]
    final = Path(cache_dir) / f"{name}-{key}"
    if (final / ".complete").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    try:
        rels = [rel for rel, _, _ in listing]
        for rel in rels:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get([f"{root}/{r}" for r in rels], [str(tmp / r) for r in rels])  # one call: fetched concurrently
        for rel, nbytes, _ in listing:
            got = (tmp / rel).stat().st_size
            if got != nbytes:
                raise OSError(f"copying {url}/{rel}: got {got} bytes, expected {nbytes}; try again")
        (tmp / ".complete").write_text(json.dumps(listing))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / ".complete").is_file():  # another process completed the same copy first: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
