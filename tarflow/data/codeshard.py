"""Writing and reading the tokenize job's outputs (formats in tarflow.data.schema).

`CodeShardWriter` turns all the rows of one input shard into `codes/{shard}.parquet` and
`errors/{shard}.parquet` (`ConversationShardWriter` the same for a conversation table's rows); the sharded-job
core then writes `_manifest/{shard}.json` last. Each file appears atomically under its final name.
`resolve_code_shards` finds the finished code shards of a tokenize output: what caption, generate and the
trainers read.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import tarflow
from tarflow.data import schema, storage
from tarflow.data.shards import ShardFiles, ShardLayout

log = logging.getLogger("tarflow.codeshard")


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
    # tokenize --latents: {checkpoint, sha256, class, latent_channels, downsample, resolution, shape, dtype,
    # scaling_factor, column, version, preprocess}; None without it (absent from footers, None in facts)
    latents: dict | None = None
    # conversation tables as input: CONVERSATION_FACTS (the output format); None for img2dataset input. Compared
    # like vq: a conversation run and an img2dataset run into one output folder conflict.
    conversations: dict | None = None
    image_root: str | None = None  # where relative image paths were read from: a source, never compared

    def as_dict(self) -> dict:
        return {
            "model": {"checkpoint": self.checkpoint, "sha256": self.checkpoint_sha256, "args": self.model_args,
                      "codebook_size": self.codebook_size, "input_size": self.input_size},
            "scales": list(self.scales),
            "options": dict(self.options),
            **({"vq": dict(self.vq)} if self.vq else {}),
            **({"latents": dict(self.latents)} if self.latents else {}),
            **({"conversations": dict(self.conversations)} if self.conversations else {}),
        }

    def facts(self) -> dict:
        """What outputs are compared by: models by content hash and args, never by path (a moved checkpoint is
        the same model; one replaced at the same path is another)."""
        d = self.as_dict()
        d["model"].pop("checkpoint")
        d["vq"] = {k: v for k, v in self.vq.items() if k != "checkpoint"} if self.vq else None  # None: compared too
        d["latents"] = {k: v for k, v in self.latents.items() if k != "checkpoint"} if self.latents else None
        d["conversations"] = dict(self.conversations) if self.conversations else None
        return d

    def sources(self) -> dict:
        return {"tatok": self.checkpoint, **({"vq": self.vq["checkpoint"]} if self.vq else {}),
                **({"latents": self.latents["checkpoint"]} if self.latents else {}),
                **({"image_root": self.image_root} if self.image_root else {})}


def code_shard_layout(output: str):
    return ShardLayout(output, ((schema.CODES_DIR, f"{schema.CODES_DIR}/{{shard}}.parquet"),
                                (schema.ERRORS_DIR, f"{schema.ERRORS_DIR}/{{shard}}.parquet")),
                       schema.MANIFEST_FORMAT, schema.MANIFEST_VERSION)


class CodeShardWriter:
    """The tokenize job's writer (runs in a finalize task): codes/ and errors/ of one shard."""

    def __init__(self, facts: TokenizeFacts):
        meta = {**facts.as_dict(), "tarflow_version": tarflow.__version__}
        columns = schema.code_shard_schema(facts.scales, facts.codebook_size, facts.vq, facts.latents)
        self.codes_schema = schema.with_metadata(columns, schema.CODE_SHARD_FORMAT, schema.CODE_SHARD_VERSION, meta)

    def __call__(self, shard: str, rows: pa.Table, end: Mapping[str, Any], paths: Mapping[str, str]):
        """`rows`: all the shard's rows in input order, good and failed, with the columns of a code shard plus
        `ok`, `error_stage`, `error_reason`, `error_detail`."""
        files = ShardFiles(shard, paths)
        ok = files.add(rows)
        files.write_parquet("codes", ok.select(self.codes_schema.names).cast(self.codes_schema))
        return files.done()


CONVERSATION_FACTS = {"format": schema.CONVERSATION_SHARD_FORMAT, "version": schema.CONVERSATION_SHARD_VERSION}


class ConversationShardWriter:
    """The tokenize job's writer for conversation tables (runs in a finalize task): codes/ (a conversation code
    shard: the rows' own columns, as read, plus their images' facts and codes) and errors/ of one shard."""

    def __init__(self, facts: TokenizeFacts):
        self.facts = facts
        self.meta = {**facts.as_dict(), "tarflow_version": tarflow.__version__}

    def __call__(self, shard: str, rows: pa.Table, end: dict, paths: Mapping[str, str]):
        """`rows`: all the shard's rows in input order, good and failed, with `key`, `passthrough`, the image
        columns and codes of a conversation shard, `ok` and the error columns. `end` carries the passthrough schema
        (taken out of it: the manifest needs only the reader's findings)."""
        from tarflow.data.conversations import (PASSTHROUGH_ENCODING_KEY, PASSTHROUGH_SCHEMA_KEY, decode_schema,
                                                passthrough_table)

        pt_schema = decode_schema(end.pop(PASSTHROUGH_SCHEMA_KEY))
        encoding = end.pop(PASSTHROUGH_ENCODING_KEY)
        columns = schema.conversation_shard_schema(self.facts.scales, self.facts.codebook_size, pt_schema)
        codes_schema = schema.with_metadata(columns, schema.CONVERSATION_SHARD_FORMAT,
                                            schema.CONVERSATION_SHARD_VERSION, self.meta)
        files = ShardFiles(shard, paths)
        ok = files.add(rows)
        passthrough = passthrough_table(ok.column("passthrough").to_pylist(), pt_schema, encoding)
        own = ok.drop_columns(["passthrough"])
        codes = pa.table({f.name: (passthrough.column(f.name) if f.name in pt_schema.names else own.column(f.name))
                          for f in columns}).cast(codes_schema)
        files.write_parquet("codes", codes)
        return files.done({"images": int(pc.sum(codes.column("num_images")).as_py() or 0)})


def read_code_shard(path: str) -> pa.Table:
    """Read a code shard, checking its format and version first."""
    return _read_checked(path, schema.check_code_shard)


def read_conversation_shard(path: str) -> pa.Table:
    """Read a conversation code shard, checking its format and version first."""
    return _read_checked(path, schema.check_conversation_shard)


def _read_checked(path: str, check) -> pa.Table:
    fs, p = storage.filesystem(path)
    with fs.open(p, "rb") as f:
        table = pq.read_table(f)
    check(table.schema, path)
    return table


@dataclass(frozen=True)
class CodeShard:
    path: str
    name: str
    size: int


def resolve_code_shards(spec: str | list[str]) -> list[CodeShard]:
    """A tokenize output folder (finished shards: those with a manifest), a folder of code shards, or files."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out = []
    for s in specs:
        # sizes from the listings (a request per 1,000 files), never a request per shard
        if storage.isdir(storage.join(s, schema.CODES_DIR)):
            manifests = {p.rsplit("/", 1)[-1][:-5] for p in storage.list_sizes(storage.join(s, schema.MANIFEST_DIR))
                         if p.endswith(".json")}
            files = {p: n for p, n in storage.list_sizes(storage.join(s, schema.CODES_DIR)).items()
                     if p.endswith(".parquet")}
            unfinished = sum(_stem(p) not in manifests for p in files)
            if unfinished:
                log.warning("%d code shards in %s have no manifest (their tokenize run did not finish); skipped",
                            unfinished, s)
            files = {p: n for p, n in files.items() if _stem(p) in manifests}
        elif storage.isdir(s):
            files = {p: n for p, n in storage.list_sizes(s).items() if p.endswith(".parquet")}
        elif storage.exists(s):
            files = {s: storage.size(s)}
        else:
            raise FileNotFoundError(f"caption input {s} does not exist (give the tokenize job's output folder, a "
                                    "folder of code shards, or code shard files)")
        out += [CodeShard(p, _stem(p), n) for p, n in files.items()]
    if not out:
        raise FileNotFoundError(f"no code shards found in {specs}")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError("two code shards share a name; outputs are named after their input shard")
    return sorted(out, key=lambda c: c.name)


def _stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
