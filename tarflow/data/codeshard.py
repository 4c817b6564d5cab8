"""Writing and reading the tokenize job's outputs (formats in tarflow.data.schema).

`CodeShardWriter.write` turns all the rows of one input shard into `codes/{shard}.parquet`,
`errors/{shard}.parquet` and, last, `_manifest/{shard}.json`; each appears atomically under its final name.
"""
from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import tarflow
from tarflow.data import schema, storage


@dataclass
class TokenizeFacts:
    """What determines the content of a code shard; a rerun whose facts differ must not mix outputs."""

    checkpoint: str
    checkpoint_sha256: str
    model_args: dict
    codebook_size: int
    input_size: int
    scales: list[int]
    options: dict  # decoding options that change outputs (exif_transpose, max_pixels)
    # tokenize --vq: {checkpoint, sha256, codebook_size, downsample, resolution, num_tokens, column, preprocess};
    # None without it (and then absent from manifests and footers, which stay as they were)
    vq: dict | None = None

    def as_dict(self) -> dict:
        return {
            "model": {"checkpoint": self.checkpoint, "sha256": self.checkpoint_sha256, "args": self.model_args,
                      "codebook_size": self.codebook_size, "input_size": self.input_size},
            "scales": list(self.scales),
            "options": dict(self.options),
            **({"vq": dict(self.vq)} if self.vq else {}),
        }

    def mismatch(self, manifest: Mapping[str, Any]) -> list[str]:
        """What differs between these facts and a finished shard's manifest ([] if nothing)."""
        diffs = []
        m = manifest.get("model", {})
        if m.get("sha256") != self.checkpoint_sha256:
            diffs.append(f"TA-Tok checkpoint sha256 {str(m.get('sha256'))[:12]} != {self.checkpoint_sha256[:12]}")
        if list(manifest.get("scales", [])) != list(self.scales):
            diffs.append(f"scales {manifest.get('scales')} != {list(self.scales)}")
        if dict(manifest.get("options", {})) != dict(self.options):
            diffs.append(f"options {manifest.get('options')} != {self.options}")
        diffs += _vq_mismatch(manifest.get("vq"), self.vq)
        return diffs


def _vq_mismatch(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[str]:
    def show(v):
        return f"{v['column']} (VQ sha256 {str(v.get('sha256'))[:12]})" if v else "no VQ codes"

    if not old and not new:
        return []
    if not old or not new or (old.get("sha256"), old.get("resolution")) != (new["sha256"], new["resolution"]):
        return [f"VQ codes: {show(old)} != {show(new)}"]
    return []


def output_paths(output: str, shard: str) -> dict[str, str]:
    return {
        "codes": storage.join(output, schema.CODES_DIR, f"{shard}.parquet"),
        "errors": storage.join(output, schema.ERRORS_DIR, f"{shard}.parquet"),
        "manifest": storage.join(output, schema.MANIFEST_DIR, f"{shard}.json"),
    }


def read_manifest(path: str) -> dict | None:
    """The manifest at `path`, or None when the shard is not finished."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise schema.SchemaError(f"{path}: manifest is not valid JSON ({e}); delete it to redo the shard") from None
    return dict(schema.check_manifest(manifest, path))


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


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
    }).cast(schema.with_metadata(schema.ERRORS_SCHEMA, schema.ERRORS_FORMAT, schema.ERRORS_VERSION,
                                 {"tarflow_version": tarflow.__version__}))
    return rows.filter(ok_mask), errors, dict(Counter(failed.column("error_reason").to_pylist()))


class CodeShardWriter:
    def __init__(self, output: str, facts: TokenizeFacts):
        self.output, self.facts = output, facts
        meta = {**facts.as_dict(), "tarflow_version": tarflow.__version__}
        self.codes_schema = schema.with_metadata(schema.code_shard_schema(facts.scales, facts.codebook_size, facts.vq),
                                                 schema.CODE_SHARD_FORMAT, schema.CODE_SHARD_VERSION, meta)

    def write(self, shard_name: str, shard_input: Mapping[str, Any], rows: pa.Table, complete: bool = True,
              incomplete_reason: str = "", extra: Mapping[str, Any] | None = None) -> dict:
        """Write one shard's outputs from all its rows (in input order, good and failed); return the manifest.

        `rows` has the columns of a code shard plus `ok`, `error_stage`, `error_reason`, `error_detail`.
        """
        paths = output_paths(self.output, shard_name)
        ok, errors, reasons = split_failed(rows, shard_name)
        codes = ok.select(self.codes_schema.names).cast(self.codes_schema)
        codes_bytes, errors_bytes = parquet_bytes(codes), parquet_bytes(errors)
        storage.write_bytes_atomic(paths["codes"], codes_bytes)
        storage.write_bytes_atomic(paths["errors"], errors_bytes)
        manifest = {
            "format": schema.MANIFEST_FORMAT,
            "version": schema.MANIFEST_VERSION,
            "shard": shard_name,
            "input": dict(shard_input),
            "complete": bool(complete),
            "incomplete_reason": (incomplete_reason or None) if not complete else None,
            "counts": {"samples_in": len(rows), "ok": len(ok), "failed": len(errors),
                       "failed_by_reason": reasons},
            **self.facts.as_dict(),
            "schema": {"code_shard": schema.CODE_SHARD_VERSION, "errors": schema.ERRORS_VERSION},
            "tarflow_version": tarflow.__version__,
            "outputs": {
                "codes": {"path": paths["codes"], "rows": len(ok), "bytes": len(codes_bytes)},
                "errors": {"path": paths["errors"], "rows": len(errors), "bytes": len(errors_bytes)},
            },
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"extra": dict(extra)} if extra else {}),
        }
        storage.write_bytes_atomic(paths["manifest"], json.dumps(manifest, indent=2).encode())
        return manifest


def read_code_shard(path: str) -> pa.Table:
    """Read a code shard, checking its format and version first."""
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        table = pq.read_table(f)
    schema.check_code_shard(table.schema, path)
    return table
