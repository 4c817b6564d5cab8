"""A local stand-in for the Hugging Face Hub's HTTP API: the endpoints huggingface_hub calls to resolve, list and
download, enough for HfFileSystem, hf_hub_download and snapshot_download. Point HF_ENDPOINT at `endpoint`.

    GET  /api/{models|datasets}/OWNER/NAME[/revision/REV]          repo info: {"id", "sha", "siblings", "gated"}
    GET  /api/{models|datasets}/OWNER/NAME/tree/REV[/PATH]          listing (?recursive=), one page
    POST /api/{models|datasets}/OWNER/NAME/paths-info/REV           {paths[]} -> entries of the ones that exist
    HEAD|GET /[datasets/]OWNER/NAME/resolve/REV/PATH                a file: X-Repo-Commit, ETag (X-Linked-* for LFS),
                                                                    Content-Length; GET honours Range (206)

Errors as the Hub gives them: 404 with X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound, and 401
GatedRepo on a gated repo's files without an accepted token (its info and listings stay public, as on the Hub).
Files in LFS (weights, shards) carry their sha256 in listings, as on the Hub. Every request is recorded; `downloads`
counts whole-file GETs per (repo, path) and `range_reads` the GETs with a Range header.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".tar", ".parquet", ".gz")


def is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or len(data) > 100_000


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    gated: bool = False

    def commit(self, rev: str) -> str | None:
        return rev if rev in self.commits else self.refs.get(rev)


class HubStandIn:
    def __init__(self, tokens: tuple[str, ...] = ("hf_test_token",)):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens = set(tokens)  # tokens that were granted access to gated repos
        self.requests: list[tuple[str, str]] = []
        self.downloads: Counter = Counter()  # (repo_type, repo_id, path) -> whole-file GETs
        self.range_reads: Counter = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- content
    def add_commit(self, repo_id: str, files: dict[str, bytes | str | Path], repo_type: str = "model",
                   branch: str = "main", gated: bool = False, keep: bool = True) -> str:
        """A new commit on `branch`: the previous commit's files (when `keep`) updated with `files` (bytes, or a
        local file to read). Returns its sha."""
        repo = self.repos.setdefault((repo_type, repo_id), Repo())
        repo.gated = repo.gated or gated
        previous = repo.commits.get(repo.refs.get(branch, ""), {}) if keep else {}
        content = dict(previous)
        for path, data in files.items():
            content[path.strip("/")] = Path(data).read_bytes() if isinstance(data, (str, Path)) else data
        digest = hashlib.sha1(json.dumps([repo.refs.get(branch), sorted(
            (p, hashlib.sha256(d).hexdigest()) for p, d in content.items())]).encode()).hexdigest()
        repo.commits[digest] = content
        repo.refs[branch] = digest
        return digest

    def add_folder(self, repo_id: str, folder: Path, prefix: str = "", **kw) -> str:
        folder = Path(folder)
        files = {(f"{prefix}/" if prefix else "") + str(p.relative_to(folder)): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add_commit(repo_id, files, **kw)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.downloads.clear()
            self.range_reads.clear()

    # -- server
    def start(self) -> str:
        standin = self

        class Handler(_Handler):
            hub = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True, name="hub-standin").start()
        return self.endpoint

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _entry(path: str, data: bytes | None) -> dict:
    if data is None:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
    e = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
    if is_lfs(path, data):
        e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return e


def _listing(files: dict[str, bytes], path: str, recursive: bool) -> list[dict] | None:
    """Entries under folder `path` ("" = root), or None when there is no such folder."""
    prefix = f"{path}/" if path else ""
    under = {p: d for p, d in files.items() if p.startswith(prefix)}
    if path and not under:
        return None
    entries, dirs = [], set()
    for p, d in sorted(under.items()):
        rel = p[len(prefix):].split("/")
        for i in range(1, len(rel)):
            if recursive or i == 1:
                dirs.add(prefix + "/".join(rel[:i]))
        if recursive or len(rel) == 1:
            entries.append(_entry(p, d))
    return [_entry(d, None) for d in sorted(dirs)] + entries


_API = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubStandIn

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, error_code: str | None = None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if error_code:
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", error_code)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200):
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _repo(self, repo_type: str, repo_id: str, rev: str | None):
        """(repo, commit sha) or None after sending the Hub's 404."""
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            self._send(404, b'{"error": "Repository not found"}', {"Content-Type": "application/json"},
                       error_code="RepoNotFound")
            return None
        sha = repo.commit(unquote(rev or "main"))
        if sha is None:
            self._send(404, b'{"error": "Invalid rev id"}', {"Content-Type": "application/json"},
                       error_code="RevisionNotFound")
            return None
        return repo, sha

    def _record(self):
        with self.hub._lock:
            self.hub.requests.append((self.command, self.path))

    def do_GET(self):  # noqa: N802
        self._record()
        url = urlsplit(self.path)
        if m := _API.match(url.path):
            return self._api(m, parse_qs(url.query))
        if m := _RESOLVE.match(url.path):
            return self._resolve(m)
        self._send(404, b"not found")

    do_HEAD = do_GET

    def do_POST(self):  # noqa: N802
        self._record()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        m = _API.match(urlsplit(self.path).path)
        if not m or m.group(3) != "paths-info":
            return self._send(404, b"not found")
        got = self._repo(m.group(1)[:-1], m.group(2), m.group(4))
        if got is None:
            return
        repo, sha = got
        files = repo.commits[sha]
        form = json.loads(body) if body.startswith("{") else parse_qs(body)
        paths = form.get("paths", [])
        out = []
        for p in ([paths] if isinstance(paths, str) else paths):
            p = p.strip("/")
            if p in files:
                out.append(_entry(p, files[p]))
            elif _listing(files, p, False) is not None:
                out.append(_entry(p, None))
        self._json(out)

    def _api(self, m, query):
        repo_type, repo_id, kind, rev, path = m.group(1)[:-1], m.group(2), m.group(3), m.group(4), m.group(5) or ""
        got = self._repo(repo_type, repo_id, rev)
        if got is None:
            return
        repo, sha = got
        files = repo.commits[sha]
        if kind in (None, "revision"):
            return self._json({"id": repo_id, "sha": sha, "private": False, "gated": "manual" if repo.gated else False,
                               "disabled": False, "siblings": [{"rfilename": p} for p in sorted(files)],
                               "tags": [], "downloads": 0, "likes": 0})
        if kind == "tree":
            recursive = query.get("recursive", ["False"])[0].lower() in ("true", "1")
            entries = _listing(files, unquote(path).strip("/"), recursive)
            if entries is None:
                return self._send(404, b'{"error": "not found"}', {"Content-Type": "application/json"},
                                  error_code="EntryNotFound")
            return self._json(entries)
        self._send(404, b"not found")

    def _resolve(self, m):
        repo_type = "dataset" if m.group(1) else "model"
        repo_id, rev, path = m.group(2), m.group(3), unquote(m.group(4))
        got = self._repo(repo_type, repo_id, rev)
        if got is None:
            return
        repo, sha = got
        if repo.gated and self.headers.get("Authorization", "").removeprefix("Bearer ") not in self.hub.tokens:
            return self._send(401, b'{"error": "Access to this repo is restricted"}',
                              {"Content-Type": "application/json"}, error_code="GatedRepo")
        data = repo.commits[sha].get(path)
        if data is None:
            return self._send(404, b'{"error": "Entry not found"}', {"Content-Type": "application/json"},
                              error_code="EntryNotFound")
        etag = hashlib.sha256(data).hexdigest() if is_lfs(path, data) else git_blob_id(data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if is_lfs(path, data):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": len(data)})
        rng = self.headers.get("Range")
        if self.command == "GET":
            with self.hub._lock:
                (self.hub.range_reads if rng else self.hub.downloads)[(repo_type, repo_id, path)] += 1
        if rng and (r := re.match(r"bytes=(\d+)-(\d*)$", rng)):
            start = int(r.group(1))
            end = min(int(r.group(2)) if r.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            body = data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, body, headers)
        self._send(200, data, headers)
