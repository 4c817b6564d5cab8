"""Models and datasets on the Hugging Face Hub as paths, through huggingface_hub (never a downloader of our own).

    hf://OWNER/REPO[@REVISION]/PATH                    a file or folder of a model repo (csuhan/TA-Tok/ta_tok.pth)
    hf://datasets/OWNER/NAME[@REVISION]/PATH_OR_GLOB   dataset files (lmms-lab/LLaVA-ReCap-558K/...)

huggingface_hub follows HF_TOKEN, HF_ENDPOINT, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE (the last ones read when
it is imported). Model files and folders are downloaded into the hub's cache, once per node: every process on a
node shares that cache and its file locks, so concurrent actors wait for one download instead of making their own.
Dataset files are read by byte ranges through HfFileSystem (fsspec), as S3 inputs are.

A job pins every hf:// argument to the commit its revision resolves to, once, on the driver (`pin`), so every
worker reads the same commit and the outputs' facts record it; a file's identity is its sha256, which the Hub
gives for LFS files (no hashing of GBs). With HF_HUB_OFFLINE=1 the cache alone serves: revisions resolve from its
refs and paths read from its snapshots (`filesystem`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote, unquote

PREFIX = "hf://"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_GLOB_CHARS = "*?[{"


class HubError(FileNotFoundError):
    """An hf:// path that cannot be used: the message is one line naming the path, the problem and the fix."""

    def __init__(self, url: str, problem: str, fix: str = ""):
        self.url, self.problem, self.fix = url, problem, fix
        super().__init__(f"{url}: {problem}" + (f"; {fix}" if fix else ""))

    def __reduce__(self):  # rebuilt from its parts when Ray brings it back from a worker
        return type(self), (self.url, self.problem, self.fix)


@dataclass(frozen=True)
class HubPath:
    repo_type: str  # "model" or "dataset"
    repo_id: str  # OWNER/NAME
    revision: str | None  # None: the default branch
    path: str  # inside the repo; "" for its root

    def url(self) -> str:
        kind = "datasets/" if self.repo_type == "dataset" else ""
        rev = f"@{quote(self.revision, safe='')}" if self.revision else ""
        return f"{PREFIX}{kind}{self.repo_id}{rev}" + (f"/{self.path}" if self.path else "")

    @property
    def is_pinned(self) -> bool:
        return bool(self.revision and _COMMIT.match(self.revision))


def is_hub(path) -> bool:
    return str(path).startswith(PREFIX)


def is_model(path) -> bool:
    return is_hub(path) and parse(path).repo_type == "model"


def parse(url: str) -> HubPath:
    """hf://[datasets/]OWNER/NAME[@REVISION][/PATH] -> HubPath. A revision with a slash is written %2F-quoted
    (hf://o/r@refs%2Fpr%2F1/x), as HfFileSystem takes it."""
    url = str(url)
    rest = url[len(PREFIX):]
    repo_type = "model"
    if rest.startswith("datasets/"):
        repo_type, rest = "dataset", rest[len("datasets/"):]
    parts = rest.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1] or parts[0].startswith("@"):
        raise HubError(url, "is not a Hub path", "write hf://OWNER/REPO[@REVISION]/PATH for a model file or folder, "
                       "hf://datasets/OWNER/NAME[@REVISION]/PATH for dataset files")
    name, _, revision = parts[1].partition("@")
    path = parts[2].strip("/") if len(parts) > 2 else ""
    return HubPath(repo_type, f"{parts[0]}/{name}", unquote(revision) or None, path)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _api():
    from huggingface_hub import HfApi

    return HfApi()


def _fixes(hp: HubPath) -> dict[str, str]:
    from huggingface_hub import constants

    page = f"{constants.ENDPOINT}/{'datasets/' if hp.repo_type == 'dataset' else ''}{hp.repo_id}"
    return {
        "repo": f"check the name on {page}; a private repo needs HF_TOKEN (or `hf auth login`) with read access",
        "gated": f"accept its conditions on {page} with your account and set HF_TOKEN (or `hf auth login`) to a token "
                 "of that account",
        "revision": f"give a branch, tag or commit of {hp.repo_id} after @, or leave @REVISION out for its default "
                    "branch",
        "offline": "run once with network access to fill the cache (or copy a filled HF_HUB_CACHE here), or unset "
                   "HF_HUB_OFFLINE",
    }


def _as_hub_error(url: str, hp: HubPath, e: Exception) -> Exception:
    """huggingface_hub's exceptions -> one HubError line naming `url` and the fix; others are returned as they are."""
    from huggingface_hub import errors

    fixes = _fixes(hp)
    if isinstance(e, HubError):
        return e
    if isinstance(e, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)):  # before EntryNotFound: one
        return HubError(url, "not in the local Hugging Face cache and the Hub cannot be asked (HF_HUB_OFFLINE=1 or "
                        "no connection)", fixes["offline"])
    if isinstance(e, errors.GatedRepoError):  # before RepositoryNotFoundError: it is one
        return HubError(url, f"{hp.repo_id} is a gated repo and this token has no access to it", fixes["gated"])
    if isinstance(e, errors.RepositoryNotFoundError):
        return HubError(url, f"repository {hp.repo_id} not found ({hp.repo_type} repo)", fixes["repo"])
    if isinstance(e, errors.RevisionNotFoundError):
        return HubError(url, f"revision {hp.revision!r} not found in {hp.repo_id}", fixes["revision"])
    if isinstance(e, errors.EntryNotFoundError):
        return HubError(url, f"no file {hp.path!r} in {hp.repo_id}" + (f" at {hp.revision}" if hp.revision else ""),
                        "check the path inside the repo (list it on the Hub's 'Files' tab)")
    if isinstance(e, errors.HfHubHTTPError):
        return HubError(url, f"the Hub answered {' '.join(str(e).split())[:160]}", "try again later")
    return e


def permanent_error(e: BaseException) -> str | None:
    """'not_found' or 'access_denied' for a Hub answer that no retry changes (they are OSErrors, which readers
    otherwise retry as transient); None for anything else (429 and 5xx are retried)."""
    try:
        from huggingface_hub import errors
    except ImportError:
        return None
    if isinstance(e, errors.GatedRepoError):
        return "access_denied"
    if isinstance(e, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError)):
        return "not_found"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.HfHubHTTPError) and status in (401, 403):
        return "access_denied"
    return None


def _cache_root(hp: HubPath) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=hp.repo_id, repo_type=hp.repo_type)


def _cached_commit(hp: HubPath) -> str | None:
    """The commit a revision stands for in the local cache (offline), or None."""
    root = _cache_root(hp)
    if hp.is_pinned:
        return hp.revision if (root / "snapshots" / hp.revision).is_dir() else None
    try:
        sha = (root / "refs" / (hp.revision or "main")).read_text().strip()
    except OSError:
        return None
    return sha if (root / "snapshots" / sha).is_dir() else None


def resolve_revision(url: str) -> str:
    """The commit sha that `url`'s revision (default: the default branch) stands for now."""
    return _resolve(url)[0]


def _resolve(url: str) -> tuple[str, bool]:
    """(commit sha, whether the repo is gated); offline from the cache's refs (never gated: its files are here)."""
    hp = parse(url)
    if offline():
        sha = _cached_commit(hp)
        if sha is None:
            raise HubError(url, f"{hp.repo_id}" + (f"@{hp.revision}" if hp.revision else "") + " is not in the local "
                           "Hugging Face cache and HF_HUB_OFFLINE=1", _fixes(hp)["offline"])
        return sha, False
    try:
        info = _api().repo_info(hp.repo_id, revision=hp.revision, repo_type=hp.repo_type)
    except Exception as e:  # noqa: BLE001 -- mapped to one line where it is the Hub's answer
        raise _as_hub_error(url, hp, e) from None
    if hp.revision != info.sha:
        _remember_ref(hp, info.sha)
    return info.sha, bool(getattr(info, "gated", False))


def _remember_ref(hp: HubPath, sha: str) -> None:
    """Write REVISION -> sha into the cache's refs/, as hf_hub_download does for a branch, so that the same
    unpinned path resolves offline (HF_HUB_OFFLINE=1) once its files are cached."""
    import uuid

    ref = _cache_root(hp) / "refs" / (hp.revision or "main")
    try:
        if ref.is_file() and ref.read_text().strip() == sha:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.parent / f".{ref.name}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(sha)
        tmp.replace(ref)
    except OSError:
        pass  # a read-only cache only loses offline resolution of this name


def pin(url: str) -> str:
    """`url` with its revision replaced by the commit it resolves to, after checking that its path is there and,
    in a gated repo, that this token may read it (globs and brace patterns are checked when the inputs are
    listed). Raises HubError (one line) otherwise."""
    hp = parse(url)
    sha, gated = _resolve(url)
    pinned = replace(hp, revision=sha)
    if pinned.path and not any(c in pinned.path for c in _GLOB_CHARS) and not exists(pinned.url()):
        at = f" at {hp.revision}" if hp.revision else ""
        where = "in the local cache (HF_HUB_OFFLINE=1)" if offline() else f"in {hp.repo_id}{at}"
        raise HubError(url, f"no file or folder {hp.path!r} {where}",
                       _fixes(hp)["offline"] if offline() else "check the path inside the repo (the Hub's 'Files' tab)")
    if gated:
        _check_access(url, pinned)
    return pinned.url()


def _check_access(url: str, pinned: HubPath) -> None:
    """A gated repo lists its files to anyone but serves them only to accepted tokens: ask for one file's
    metadata (a HEAD request) to learn before any work whether this token may read them."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    probe = pinned.path
    if not probe or exists_folder(pinned.url()):
        tree = _api().list_repo_tree(pinned.repo_id, pinned.path or None, recursive=True, revision=pinned.revision,
                                     repo_type=pinned.repo_type)
        probe = next((f.path for f in tree if getattr(f, "blob_id", None) is not None), None)
        if probe is None:
            return
    try:
        get_hf_file_metadata(hf_hub_url(pinned.repo_id, probe, repo_type=pinned.repo_type, revision=pinned.revision))
    except Exception as e:  # noqa: BLE001
        raise _as_hub_error(url, pinned, e) from None


def exists_folder(url: str) -> bool:
    fs, p = filesystem(url)
    return fs.isdir(p)


def exists(url: str) -> bool:
    fs, p = filesystem(url)
    return fs.exists(p)


# ----------------------------------------------------------------------------------------------------------
# Reading


def filesystem(url: str):
    """(fs, path inside it) for storage.filesystem: HfFileSystem online, the cache's snapshot offline."""
    hp = parse(url)
    if offline():
        return _CachedRepoFileSystem(hp), url[len(PREFIX):]
    from huggingface_hub import HfFileSystem

    return HfFileSystem(), url[len(PREFIX):]


def local_file(url: str) -> str:
    """The path of `url`'s file in this node's hub cache, downloaded first if it is not there (once per node: the
    cache's lock makes concurrent callers wait for one download)."""
    from huggingface_hub import hf_hub_download

    hp = parse(url)
    if not hp.path:
        raise IsADirectoryError(f"{url}: is a repo, not a file")
    try:
        return hf_hub_download(hp.repo_id, hp.path, revision=hp.revision, repo_type=hp.repo_type)
    except Exception as e:  # noqa: BLE001
        err = _as_hub_error(url, hp, e)
        if isinstance(err, HubError) and "no file" in err.problem and exists(url):
            raise IsADirectoryError(f"{url}: is a folder, not a file") from None
        raise err from None


def local_folder(url: str, keep=lambda rel: True, maxdepth: int | None = None) -> Path:
    """`url`'s folder in this node's hub cache with the files for which `keep(path relative to the folder)`
    holds (and at most `maxdepth` levels deep), downloaded first where missing; snapshot_download does it, once
    per node."""
    from huggingface_hub import snapshot_download

    hp = parse(url)
    try:
        if offline():  # what the cache holds of that commit (snapshot_download would ask for the whole repo)
            sha = _cached_commit(hp)
            root = _cache_root(hp) / "snapshots" / sha if sha else Path("/nonexistent")
        else:
            prefix = f"{hp.path}/" if hp.path else ""
            tree = _api().list_repo_tree(hp.repo_id, hp.path or None, recursive=True, revision=hp.revision,
                                         repo_type=hp.repo_type)
            files = [f.path for f in tree if getattr(f, "blob_id", None) is not None and f.path.startswith(prefix)]
            files = [f for f in files if keep(f[len(prefix):])
                     and (maxdepth is None or f[len(prefix):].count("/") < maxdepth)]
            if not files:
                raise HubError(url, "no files found there", "check the folder's path inside the repo")
            root = snapshot_download(hp.repo_id, revision=hp.revision, repo_type=hp.repo_type,
                                     allow_patterns=[_literal_pattern(f) for f in files])
    except Exception as e:  # noqa: BLE001
        raise _as_hub_error(url, hp, e) from None
    folder = Path(root) / hp.path
    if not folder.is_dir():
        raise HubError(url, "no such folder" + (" in the local cache (HF_HUB_OFFLINE=1)" if offline() else ""),
                       _fixes(hp)["offline"] if offline() else "check the folder's path inside the repo")
    return folder


def _literal_pattern(path: str) -> str:
    """An fnmatch pattern (snapshot_download's allow_patterns) that matches exactly `path`."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def lfs_sha256(url: str) -> str | None:
    """The sha256 the Hub keeps for an LFS file (exact: it is the content's hash), without reading the file; None
    for a file in plain git (small: hash it) or offline."""
    if offline():
        return None
    hp = parse(url)
    try:
        infos = _api().get_paths_info(hp.repo_id, [hp.path], revision=hp.revision, repo_type=hp.repo_type)
    except Exception as e:  # noqa: BLE001
        raise _as_hub_error(url, hp, e) from None
    lfs = getattr(infos[0], "lfs", None) if infos else None
    return lfs.sha256 if lfs else None


# ----------------------------------------------------------------------------------------------------------
# Offline: the cache's snapshot folder seen as the repo


def _cached_repo_filesystem_class():
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    class CachedRepoFileSystem(DirFileSystem):
        """A repo's snapshot in the local hub cache, read-only, under the names HfFileSystem gives
        ([datasets/]OWNER/NAME@REV/PATH), so storage's listings read the same online and offline."""

        def __init__(self, hp: HubPath, **kwargs):
            self.repo_root = replace(hp, path="").url()[len(PREFIX):]
            sha = _cached_commit(hp) or "missing"
            super().__init__(path=str(_cache_root(hp) / "snapshots" / sha), fs=LocalFileSystem(), **kwargs)

        def _inner(self, path: str) -> str:
            path = path.removeprefix(PREFIX)
            return path[len(self.repo_root):].lstrip("/") if path.startswith(self.repo_root) else path

        def _join(self, path):
            if isinstance(path, str):
                return super()._join(self._inner(path))
            return [self._join(p) for p in path]

        def _relpath(self, path):
            if isinstance(path, str):
                rel = super()._relpath(path)
                return f"{self.repo_root}/{rel}" if rel else self.repo_root
            return [self._relpath(p) for p in path]

    return CachedRepoFileSystem


def _CachedRepoFileSystem(hp: HubPath):  # noqa: N802 -- a class made on first use (fsspec imported lazily)
    global _CachedRepoFileSystemClass
    if _CachedRepoFileSystemClass is None:
        _CachedRepoFileSystemClass = _cached_repo_filesystem_class()
    return _CachedRepoFileSystemClass(hp)


_CachedRepoFileSystemClass = None


# ----------------------------------------------------------------------------------------------------------
# Pinning a job's arguments


_WRITTEN_FIELDS = {"output", "storage_path", "summary_json"}  # written to: never a Hub path
NOT_WRITTEN = ("{url}: tarflow reads from the Hugging Face Hub but does not write to it; give a local folder or an "
               "s3:// prefix (and upload the result with `hf upload`)")


def pin_fields(cfg, flag=lambda name: "--" + name.replace("_", "-")) -> list[str]:
    """Pin every hf:// string (or list item) among `cfg`'s dataclass fields in place; return one problem line
    per path that cannot be used ("FLAG URL: problem; fix"), empty when all are fine."""
    import dataclasses

    problems: list[str] = []
    if not dataclasses.is_dataclass(cfg):
        return problems
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in _WRITTEN_FIELDS:
            if isinstance(value, str) and is_hub(value):
                problems.append(f"{flag(f.name)} {NOT_WRITTEN.format(url=value)}")
            continue
        if isinstance(value, str) and is_hub(value):
            setattr(cfg, f.name, _pinned_or_problem(value, flag(f.name), problems))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, str) and is_hub(v) for v in value):
            pinned = [_pinned_or_problem(v, flag(f.name), problems) if isinstance(v, str) and is_hub(v) else v
                      for v in value]
            setattr(cfg, f.name, type(value)(pinned))
    return problems


def _pinned_or_problem(url: str, flag: str, problems: list[str]) -> str:
    try:
        return pin(url)
    except HubError as e:
        problems.append(f"{flag} {e}")
    except Exception as e:  # noqa: BLE001 -- the Hub cannot be reached at all (httpx errors are no OSError)
        from huggingface_hub import constants

        problems.append(f"{flag} {url}: cannot reach {constants.ENDPOINT} ({type(e).__name__}: {e}); check the "
                        "network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the local cache")
    return url
