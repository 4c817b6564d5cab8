"""Conversation code shards written directly (tarflow.data.schema's CONVERSATION_SHARD format), as the tokenize
job writes them for LLaVA-style tables: tests of the trainer make their corpora with this, no images encoded."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from tarflow.data import schema, storage
from tarflow.data.codeshard import TokenizeFacts


def tatok_facts(tatok_path: str, scales=(1, 2, 3), codebook_size: int = 512, tokens: int = 81,
                input_size: int = 126) -> TokenizeFacts:
    """The footer facts a code shard of `tatok_path` has (defaults: the reference fixture's tiny TA-Tok: 9 x 9
    codes at scale 1, 512 codes, 126 px)."""
    return TokenizeFacts(checkpoint=str(tatok_path), checkpoint_sha256=storage.sha256(str(tatok_path)),
                         model_args={"bottleneck_token_num": tokens, "codebook_size": codebook_size},
                         codebook_size=codebook_size, input_size=input_size, scales=list(scales),
                         options={"exif_transpose": False, "max_pixels": 89478485})


def write_conversation_shard(path, rows: list[dict], facts: TokenizeFacts, conversations_as_json: bool = False):
    """`rows`: {"conversations": [{from, value}, ...], "images": [{scale: codes}, ...] (in <image> order), any
    other column}. Returns the path."""
    scales = list(facts.scales)
    conv_type = pa.string() if conversations_as_json else pa.list_(
        pa.struct([pa.field("from", pa.string()), pa.field("value", pa.string())]))
    extra = sorted({k for r in rows for k in r} - {"conversations", "images"})
    passthrough = pa.schema([pa.field(k, pa.string()) for k in extra] + [pa.field("conversations", conv_type)])
    table_schema = schema.with_metadata(
        schema.conversation_shard_schema(scales, facts.codebook_size, passthrough),
        schema.CONVERSATION_SHARD_FORMAT, schema.CONVERSATION_SHARD_VERSION, facts.as_dict())
    out = []
    for k, r in enumerate(rows):
        images = r.get("images", [])
        conv = r["conversations"]
        out.append({"key": f"{k:09d}", **{c: r.get(c) for c in extra},
                    "conversations": json.dumps(conv) if conversations_as_json else conv,
                    "num_images": len(images), "image_sha256": [f"{k}-{i}" for i in range(len(images))],
                    "image_path": [None] * len(images), "image_width": [9] * len(images),
                    "image_height": [9] * len(images),
                    **{schema.code_column(s): [list(im[s]) for im in images] for s in scales}})
    table = pa.Table.from_pylist(out, schema=table_schema)
    schema.check_conversation_shard(table.schema, str(path))
    pq.write_table(table, path)
    return str(path)


def write_caption_shard(path, rows: list[dict], facts: TokenizeFacts):
    """An image-text code shard (the img2dataset path's): `rows` {"key", "caption", "image": {scale: codes}}."""
    scales = list(facts.scales)
    table_schema = schema.with_metadata(schema.code_shard_schema(scales, facts.codebook_size),
                                        schema.CODE_SHARD_FORMAT, schema.CODE_SHARD_VERSION, facts.as_dict())
    out = [{"key": r["key"], "caption": r["caption"], "url": None, "sha256": r["key"], "width": 9, "height": 9,
            "meta": None, **{schema.code_column(s): list(r["image"][s]) for s in scales}} for r in rows]
    pq.write_table(pa.Table.from_pylist(out, schema=table_schema), path)
    return str(path)


def write_keyed_conversation_shard(path, rows: list[dict], tatok: str, scales=(3,), codebook_size: int = 512,
                             input_size: int = 64, passthrough: pa.Schema | None = None) -> str:
    """The generate/caption tests' form: facts from `tatok` itself, keys given. `rows`: dicts with `key`, the passthrough columns (default: `conversations` as list<struct<from, value>>
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
