"""Conversation code shards written directly with pyarrow (the tokenize job that writes them is another issue's):
the schema module's columns and a code shard's footer facts, so that every reader checks them as real ones."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from tarflow.data import schema, storage
from tarflow.data.codeshard import TokenizeFacts


def write_conversation_shard(path, rows: list[dict], tatok: str, scales=(3,), codebook_size: int = 512,
                             input_size: int = 64, passthrough: pa.Schema | None = None) -> str:
    """`rows`: dicts with `key`, the passthrough columns (default: `conversations` as list<struct<from, value>>
    and `source` as a string), `images`: a list of {scale: codes} per image, and optional `sha256` / `path`
    lists. Returns the path."""
    passthrough = passthrough or pa.schema([
        pa.field("conversations", pa.list_(pa.struct([pa.field("from", pa.string()), pa.field("value", pa.string())]))),
        pa.field("source", pa.string())])
    facts = TokenizeFacts(checkpoint=tatok, checkpoint_sha256=storage.sha256(tatok), model_args={},
                          codebook_size=codebook_size, input_size=input_size, scales=list(scales),
                          options={"exif_transpose": False})
    columns = schema.conversation_shard_schema(scales, codebook_size, passthrough)
    out = []
    for r in rows:
        images = r.get("images", [])
        row = {"key": r["key"], **{n: r.get(n) for n in passthrough.names}, "num_images": len(images),
               "image_sha256": r.get("sha256") or [f"{k:064x}" for k in range(len(images))],
               "image_path": r.get("path") or [None] * len(images),
               "image_width": [input_size] * len(images), "image_height": [input_size] * len(images)}
        for s in scales:
            row[schema.code_column(s)] = [im[s] for im in images]
        out.append(row)
    table = pa.Table.from_pylist(out, schema=schema.with_metadata(
        columns, schema.CONVERSATION_SHARD_FORMAT, schema.CONVERSATION_SHARD_VERSION, facts.as_dict()))
    pq.write_table(table, str(path))
    return str(path)
