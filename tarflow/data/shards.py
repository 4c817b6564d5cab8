"""A sharded job's output on storage: what each shard's files are called, its manifest (written last), the facts a
rerun compares, the identities of the models named in them, and the tail every job's writer shares (ShardFiles:
good rows and errors/ rows split, each output written atomically and recorded, errors/ last, the counts every
manifest carries). Formats and storage only: the Ray side is the package tarflow.pipelines.sharded."""
from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tarflow.data import schema, storage

log = logging.getLogger("tarflow")

PARTS_DIR = "_parts"


@dataclass(frozen=True)
class ShardLayout:
    """Where a job writes: per shard the files named by `files` ({name: pattern with {shard}}), and
    `_manifest/{shard}.json` last. Manifests of every job share `format`, `version`, `shard`, `input`,
    `complete`, `counts` {samples_in, ok, failed, failed_by_reason}, `totals`, `outputs`, the job's facts at
    the top level, and `sources` (where the models were read from: informative, never compared)."""

    output: str
    files: tuple[tuple[str, str], ...]
    manifest_format: str
    manifest_version: int

    def paths(self, shard: str) -> dict[str, str]:
        out = {name: storage.join(self.output, *pattern.format(shard=shard).split("/"))
               for name, pattern in self.files}
        out["manifest"] = self.manifest_path(shard)
        return out

    def manifest_path(self, shard: str) -> str:
        return storage.join(self.output, schema.MANIFEST_DIR, f"{shard}.json")

    @property
    def parts_root(self) -> str:
        return storage.join(self.output, PARTS_DIR)

    def parse_manifest(self, data: bytes, path: str) -> dict | None:
        """A manifest's content, or None when it is unreadable (it is then redone; an atomic write never
        leaves one half-written, so this is damage from outside, logged)."""
        try:
            manifest = json.loads(data)
        except ValueError as e:
            log.warning("%s: manifest is not valid JSON (%s); the shard will be redone", path, e)
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != self.manifest_format:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise schema.SchemaError(f"{path}: format {found!r} is not {self.manifest_format}; is this output "
                                     "folder another job's? Use another --output")
        return manifest

    def read_manifest(self, shard: str) -> dict | None:
        path = self.manifest_path(shard)
        try:
            return self.parse_manifest(storage.read_bytes(path), path)
        except FileNotFoundError:
            return None


def facts_mismatch(facts: Mapping[str, Any], manifest: Mapping[str, Any], version: int) -> list[str]:
    """What differs between a job's facts and a finished shard's manifest ([] if nothing)."""
    if manifest.get("version") != version:
        return [f"manifest version {manifest.get('version')} (made by another tarflow) != {version}"]
    diffs = []
    for k, v in facts.items():
        diffs += _leaf_diffs(k, _jsonable(manifest.get(k)), _jsonable(v))
    return diffs[:6]


def _leaf_diffs(path: str, old, new) -> list[str]:
    """The dotted paths where two JSON values differ, with both values (shortened)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _leaf_diffs(f"{path}.{k}", old.get(k), new.get(k))
        return out
    return [] if old == new else [f"{path} {_short(old, 40)} != {_short(new, 40)}"]


def _jsonable(v):
    return json.loads(json.dumps(v, sort_keys=True, default=str))


def _short(v, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def file_identity(path: str) -> dict:
    """A model file's identity for facts: its content hash (memory-flat, cached per path/size/mtime)."""
    return {"sha256": storage.sha256(path)}


def folder_identity(path: str) -> dict:
    """A model folder's identity: one hash over its files' relative paths and content hashes, so the same
    model copied elsewhere is the same model and a model replaced at the same path is another one."""
    import hashlib

    root = path.rstrip("/")
    files = storage.list_sizes(root, recursive=True)
    if not files:
        raise FileNotFoundError(f"{path}: no files found there; check the path (s3:// needs AWS credentials)")
    entries = sorted((p[len(root) + 1:], storage.sha256(p)) for p in files
                     if not os.path.basename(p).startswith("."))
    return {"sha256": hashlib.sha256(json.dumps(entries).encode()).hexdigest()}



@dataclass
class ShardWritten:
    """What a job's writer reports for one shard; the sharded-job core adds it to the manifest."""

    outputs: dict  # name -> {path, rows?, bytes}
    counts: dict  # samples_in, ok, failed, failed_by_reason
    totals: dict = field(default_factory=dict)


def errors_schema() -> pa.Schema:
    import tarflow

    return schema.with_metadata(schema.ERRORS_SCHEMA, schema.ERRORS_FORMAT, schema.ERRORS_VERSION,
                                {"tarflow_version": tarflow.__version__})


def split_failed(rows: pa.Table, shard: str) -> tuple[pa.Table, pa.Table, dict]:
    """A shard's rows -> (the ok rows, the errors/ table of the failed ones, failed count by reason).

    Every job's rows carry `ok`, `key`, `error_stage`, `error_reason`, `error_detail`; all jobs write the same
    errors format."""
    ok_mask = rows.column("ok")
    failed = rows.filter(pc.invert(ok_mask))
    errors = pa.table({
        "key": failed.column("key"),
        "shard": pa.array([shard] * len(failed), pa.string()),
        "stage": failed.column("error_stage"),
        "reason": failed.column("error_reason"),
        "detail": failed.column("error_detail"),
    }).cast(errors_schema())
    return rows.filter(ok_mask), errors, dict(Counter(failed.column("error_reason").to_pylist()))


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class ShardFiles:
    """One shard's outputs, as a job's writer makes them:

        files = ShardFiles(shard, paths)
        ok = files.add(rows)                  # the good rows; the failed ones kept for errors/ (call once per
                                              # part to stream a shard: only the failed rows' errors are kept)
        files.write_parquet("codes", table)   # paths["codes"], atomically; recorded with its rows and bytes
        files.wrote("tar", nbytes)            # an output the writer wrote itself
        return files.done(totals)             # errors/ written last; the ShardWritten

    `paths` are the layout's (ShardLayout.paths): one per output name, `errors` among them."""

    def __init__(self, shard: str, paths: Mapping[str, str]):
        self.shard, self.paths = shard, paths
        self.samples_in = self.ok = 0
        self.reasons: Counter = Counter()
        self.outputs: dict = {}
        self._errors: list[pa.Table] = []

    def add(self, rows: pa.Table) -> pa.Table:
        ok, errors, reasons = split_failed(rows, self.shard)
        self.samples_in += len(rows)
        self.ok += len(ok)
        self.reasons.update(reasons)
        if len(errors):
            self._errors.append(errors)
        return ok

    def write_parquet(self, name: str, table: pa.Table, rows: bool = True) -> int:
        data = parquet_bytes(table)
        storage.write_bytes_atomic(self.paths[name], data)
        self.wrote(name, len(data), len(table) if rows else None)
        return len(data)

    def wrote(self, name: str, nbytes: int, rows: int | None = None) -> None:
        self.outputs[name] = {"path": self.paths[name], **({"rows": rows} if rows is not None else {}),
                              "bytes": int(nbytes)}

    def done(self, totals: Mapping | None = None) -> ShardWritten:
        errors = pa.concat_tables(self._errors) if self._errors else errors_schema().empty_table()
        self.write_parquet("errors", errors)
        return ShardWritten(outputs=self.outputs, totals=dict(totals or {}),
                            counts={"samples_in": self.samples_in, "ok": self.ok, "failed": len(errors),
                                    "failed_by_reason": dict(self.reasons)})
