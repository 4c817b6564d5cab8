"""Every on-disk format tarflow writes, in one place, versioned.

A tokenize output folder holds, per input shard `{shard}` (the input file's name without extension):

    codes/{shard}.parquet      CODE_SHARD rows, in the input's order; one row per sample that tokenized
    errors/{shard}.parquet     ERROR rows: one per sample that did not (key, shard, stage, reason)
    _manifest/{shard}.json     MANIFEST, written last: its presence means the shard is finished

For conversation tables (LLaVA style) `codes/{shard}.parquet` is a CONVERSATION_SHARD instead (one row per
conversation row, every input column kept, codes per image); the rest of the layout is the same.

The rows between a sharded job's stages (and in its `_parts/`) are defined here too, at the end: ROW_FIELDS,
common to every job, then each stage's own columns.

Readers call `check_*` and fail with a message that names the file and the fix when the format or its
version is not what they understand. Bump a version whenever a field changes meaning or type.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import pyarrow as pa

CODE_SHARD_FORMAT = "tarflow.code_shard"
CODE_SHARD_VERSION = 1
ERRORS_FORMAT = "tarflow.errors"
ERRORS_VERSION = 1
MANIFEST_FORMAT = "tarflow.tokenize_manifest"
MANIFEST_VERSION = 2  # 2: facts compare models by content hash; model paths under `sources`

PARQUET_META_KEY = b"tarflow"  # Parquet key-value metadata entry holding a JSON object

CODES_DIR, ERRORS_DIR, MANIFEST_DIR = "codes", "errors", "_manifest"


class SchemaError(ValueError):
    pass


def code_column(scale: int) -> str:
    """Column holding TA-Tok codes at pool scale `scale` (1 -> 729 tokens for the released TA-Tok)."""
    return f"tatok_s{int(scale)}"


def code_value_type(codebook_size: int) -> pa.DataType:
    """Narrowest unsigned type that holds every code: uint16 for K <= 65536 (the released TA-Tok)."""
    if codebook_size <= 1 << 16:
        return pa.uint16()
    if codebook_size <= 1 << 32:
        return pa.uint32()
    raise SchemaError(f"codebook size {codebook_size} is too large")


def vq_column(resolution: int, downsample: int = 16) -> str:
    """Column holding pixel-VQ codes of the image resized to resolution x resolution (`vq16_256`)."""
    return f"vq{int(downsample)}_{int(resolution)}"


LATENTS_VERSION = 1  # the latents column's own format (facts["latents"]["version"]); bump when it changes


def latents_column(resolution: int) -> str:
    """Column holding the VAE latents of the image resized to resolution x resolution (`latents_512`)."""
    return f"latents_{int(resolution)}"


def latents_type(shape: Sequence[int]) -> pa.DataType:
    """One image's latents (C, h, w), row-major, as a fixed-size list of float16: exact for the DC-AE's raw
    latents (|x| << 65504) to 11 significant bits, half of float32's bytes, and plain Parquet (no extension
    type), so any Parquet reader gets them as numbers."""
    c, h, w = (int(v) for v in shape)
    return pa.list_(pa.float16(), c * h * w)


def code_shard_schema(scales: Sequence[int], codebook_size: int, vq: Mapping[str, Any] | None = None,
                      latents: Mapping[str, Any] | None = None) -> pa.Schema:
    """Columns of a code shard.

    key       img2dataset key of the sample (tar member stem), unique within the shard
    caption   the sample's .txt (UTF-8), null when the sample has none
    url       the `url` field of the sample's .json metadata, null when absent
    sha256    hex sha256 of the image member's bytes as stored in the input
    width, height   size of the decoded image (before resizing to TA-Tok's input size)
    meta      the sample's img2dataset .json, passed through verbatim as a string (null when absent)
    tatok_s{s}  list of TA-Tok codes at pool scale s, row-major over the (g/s) x (g/s) grid
    vq{d}_{r}   optional (tokenize --vq): pixel-VQ codes of the image resized to r x r, row-major over the
                (r/d) x (r/d) grid; `vq` is the shard's `vq` facts (column, codebook_size), None without it.
    latents_{r} optional (tokenize --latents): the VAE latents (C, r/f, r/f) of the image resized to r x r,
                unscaled (the encoder's output; multiply by the VAE's scaling_factor for the diffusion model's
                space), row-major in a fixed-size list of float16 (`latents_type`); `latents` is the shard's
                `latents` facts (column, shape, VAE sha256, scaling_factor, version = LATENTS_VERSION).
                Optional columns leave the version at 1: a shard without one reads as before; the latents
                column carries its own version in its facts.
    """
    vt = code_value_type(codebook_size)
    extra = [pa.field(vq["column"], pa.list_(code_value_type(vq["codebook_size"])), nullable=False)] if vq else []
    if latents:
        extra.append(pa.field(latents["column"], latents_type(latents["shape"]), nullable=False))
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("caption", pa.string()),
            pa.field("url", pa.string()),
            pa.field("sha256", pa.string(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("meta", pa.string()),
        ]
        + [pa.field(code_column(s), pa.list_(vt), nullable=False) for s in scales]
        + extra
    )


# ----------------------------------------------------------------------------------------------------------
# Conversation code shards: the tokenize job's output for LLaVA-style conversation tables (Tar's own corpora:
# rows with `conversations` and zero, one or several images). Same layout as code shards (codes/{shard}.parquet,
# errors/, _manifest/), same footer facts (model, scales, options); another format name, so that a reader of one
# never takes the other for it.

CONVERSATION_SHARD_FORMAT = "tarflow.conversation_code_shard"
CONVERSATION_SHARD_VERSION = 1
CONVERSATION_IMAGE_COLUMNS = ("image", "images")  # the input column holding a row's image(s); dropped on output


def conversation_shard_schema(scales: Sequence[int], codebook_size: int, passthrough: pa.Schema) -> pa.Schema:
    """Columns of a conversation code shard, in this order:

    key            the row's position in its input file, 9 digits ("000000042"): unique within the shard,
                   stable across reruns (the input's own `id`, if any, passes through unchanged)
    <passthrough>  every input column but the image column, with its input type (`conversations` among them:
                   list<struct<from: string, value: string>> as published, or a JSON string as read from JSON)
    num_images     how many images the row has (0 for text-only rows); equals the number of `<image>` marks
                   in its conversations (rows where they differ are errors, never written here)
    image_sha256   one hex sha256 per image, of its bytes as stored in the input, in the row's image order
    image_path     one per image: the input's path for it (HF Image struct `path`, JSON path), null when none
    image_width, image_height   one per image: the decoded size (before resizing to TA-Tok's input)
    tatok_s{s}     one list of TA-Tok codes per image, in the row's image order (the k-th list belongs to the
                   k-th `<image>` of the conversation, counting every turn); an empty outer list for text rows
    """
    vt = code_value_type(codebook_size)
    own = {"key", "num_images", "image_sha256", "image_path", "image_width", "image_height",
           *(code_column(s) for s in scales)}
    clash = [n for n in passthrough.names if n in own]
    if clash:
        raise SchemaError(f"input columns {clash} clash with the conversation code shard's own columns; rename them")
    return pa.schema(
        [pa.field("key", pa.string(), nullable=False)]
        + [f.remove_metadata() for f in passthrough if f.name not in CONVERSATION_IMAGE_COLUMNS]
        + [
            pa.field("num_images", pa.int32(), nullable=False),
            pa.field("image_sha256", pa.list_(pa.string()), nullable=False),
            pa.field("image_path", pa.list_(pa.string()), nullable=False),
            pa.field("image_width", pa.list_(pa.int32()), nullable=False),
            pa.field("image_height", pa.list_(pa.int32()), nullable=False),
        ]
        + [pa.field(code_column(s), pa.list_(pa.list_(vt)), nullable=False) for s in scales]
    )


def is_conversation_shard(meta: Mapping[str, Any]) -> bool:
    return meta.get("format") == CONVERSATION_SHARD_FORMAT


def check_conversation_shard(schema: pa.Schema, path: str) -> dict:
    """Check a conversation code shard's footer and its own columns; return its metadata."""
    meta = read_metadata(schema, path)
    if meta.get("format") != CONVERSATION_SHARD_FORMAT:
        raise SchemaError(f"{path}: format {meta.get('format')!r} is not a conversation code shard "
                          f"({CONVERSATION_SHARD_FORMAT})")
    if meta.get("version") != CONVERSATION_SHARD_VERSION:
        raise SchemaError(
            f"{path}: conversation code shard version {meta.get('version')} is not supported (this tarflow reads "
            f"version {CONVERSATION_SHARD_VERSION}); re-run the tokenize job with this tarflow, or use the tarflow "
            "that wrote it")
    own = [n for n in schema.names if n == "key" or n == "num_images" or n.startswith(("image_", "tatok_s"))]
    passthrough = pa.schema([schema.field(n) for n in schema.names if n not in own])
    expected = conversation_shard_schema(meta["scales"], meta["model"]["codebook_size"], passthrough)
    _check_columns(schema, expected, path)
    return meta


def _check_columns(schema: pa.Schema, expected: pa.Schema, path: str) -> None:
    for f in expected:
        if f.name not in schema.names:
            raise SchemaError(f"{path}: column {f.name!r} is missing")
        if not schema.field(f.name).type.equals(f.type):
            raise SchemaError(f"{path}: column {f.name!r} is {schema.field(f.name).type}, expected {f.type}")


def check_any_code_shard(schema: pa.Schema, path: str) -> dict:
    """A code shard of either kind (image-text pairs or conversations): its metadata, checked."""
    meta = read_metadata(schema, path)
    if is_conversation_shard(meta):
        return check_conversation_shard(schema, path)
    return check_code_shard(schema, path)


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # read | decode | encode
        pa.field("reason", pa.string(), nullable=False),  # short tag, e.g. corrupt_image, no_image
        pa.field("detail", pa.string()),  # the underlying message, for humans
    ]
)


def with_metadata(schema: pa.Schema, fmt: str, version: int, facts: Mapping[str, Any]) -> pa.Schema:
    meta = {"format": fmt, "version": version, **facts}
    return schema.with_metadata({PARQUET_META_KEY: json.dumps(meta, sort_keys=True).encode()})


def read_metadata(schema: pa.Schema, path: str) -> dict:
    raw = (schema.metadata or {}).get(PARQUET_META_KEY)
    if raw is None:
        raise SchemaError(f"{path}: no tarflow metadata in the Parquet footer; is this a tarflow output file?")
    return json.loads(raw)


def check_code_shard(schema: pa.Schema, path: str) -> dict:
    """Check a code shard's footer and columns; return its metadata (model and schema facts)."""
    meta = read_metadata(schema, path)
    if meta.get("format") != CODE_SHARD_FORMAT:
        raise SchemaError(f"{path}: format {meta.get('format')!r} is not a code shard ({CODE_SHARD_FORMAT})")
    if meta.get("version") != CODE_SHARD_VERSION:
        raise SchemaError(
            f"{path}: code shard version {meta.get('version')} is not supported (this tarflow reads version "
            f"{CODE_SHARD_VERSION}); re-run the tokenize job with this tarflow, or use the tarflow that wrote it"
        )
    lat = meta.get("latents")
    if lat and lat.get("version") != LATENTS_VERSION:
        raise SchemaError(
            f"{path}: latents column version {lat.get('version')} is not supported (this tarflow reads version "
            f"{LATENTS_VERSION}); re-run the tokenize job with --latents and --overwrite, or use the tarflow that "
            "wrote it")
    expected = code_shard_schema(meta["scales"], meta["model"]["codebook_size"], meta.get("vq"), lat)
    _check_columns(schema, expected, path)
    return meta


def check_manifest(manifest: Mapping[str, Any], path: str, fmt: str = MANIFEST_FORMAT,
                   version: int = MANIFEST_VERSION) -> Mapping[str, Any]:
    if manifest.get("format") != fmt:
        raise SchemaError(f"{path}: format {manifest.get('format')!r} is not {fmt}; is this output folder "
                          "another job's?")
    if manifest.get("version") != version:
        raise SchemaError(
            f"{path}: manifest version {manifest.get('version')} is not supported (expected {version}); "
            "re-run with --overwrite to redo this output with this tarflow"
        )
    return manifest


# ----------------------------------------------------------------------------------------------------------
# Caption job: an output folder holds captions/{shard}.parquet, errors/{shard}.parquet, _manifest/{shard}.json
# (one per input code shard, named like it).

CAPTIONS_FORMAT = "tarflow.captions"
CAPTIONS_VERSION = 2  # 2: every input column follows the answer's (captions_schema); conversations answered
CAPTION_MANIFEST_FORMAT = "tarflow.caption_manifest"
CAPTION_MANIFEST_VERSION = 2  # 2: facts compare models by content hash; model paths under `sources`
CAPTIONS_DIR = "captions"

CAPTIONS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # the code shard's key (img2dataset key)
        pa.field("prompt", pa.string(), nullable=False),  # the question asked about the image
        pa.field("caption", pa.string(), nullable=False),  # the generated answer, special tokens removed
        pa.field("model", pa.string(), nullable=False),  # the Tar checkpoint it came from
        pa.field("sampling", pa.string(), nullable=False),  # JSON: greedy/temperature/top_k/top_p/seed
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("caption_tokens", pa.int32(), nullable=False),
        pa.field("finished", pa.bool_(), nullable=False),  # ended on <|im_end|> (else cut at max_new_tokens)
    ]
)


def captions_schema(code_shard: pa.Schema) -> pa.Schema:
    """Columns of a captions file (version 2): CAPTIONS_SCHEMA's, then every column of the input code shard (of
    either kind) but `key`, with its type, so that the output is the corpus with its answers. An input column
    whose name is one of the answer's is kept as `input_{name}` (an image-text shard's alt text `caption` is
    `input_caption`). A conversation shard's `conversations` holds the answer appended as a gpt turn
    ({"from": "gpt", "value": caption}, other struct fields null)."""
    fields = list(CAPTIONS_SCHEMA)
    for f in code_shard:
        if f.name != "key":
            fields.append(f.with_name(f"input_{f.name}" if f.name in CAPTIONS_SCHEMA.names else f.name)
                          .remove_metadata())
    return pa.schema(fields)


# ----------------------------------------------------------------------------------------------------------
# Generate job: img2dataset's WebDataset layout ({shard}.tar + {shard}.parquet + {shard}_stats.json) so the
# output feeds straight back into tarflow, plus errors/{shard}.parquet and _manifest/{shard}.json (last).
# Tar members per sample: {key}.png|jpg, {key}.txt (the prompt), {key}.json (GENERATED_SAMPLE_META fields).

GENERATE_MANIFEST_FORMAT = "tarflow.generate_manifest"
GENERATE_MANIFEST_VERSION = 2  # 2: facts compare models by content hash; model paths under `sources`
GENERATED_SAMPLE_META = ("key", "id", "index", "prompt", "seed", "scale", "width", "height", "status",
                         "mllm", "detokenizer", "sampling", "detok_sampling", "codes", "codes_fix")
# rows with input images (edits, variations) add: instruction (the prompt), input_images [{key, path, sha256}]
GENERATED_INPUT_META = ("instruction", "input_images")

PROMPT_TABLE_COLUMNS = {"id": "required", "prompt": "required unless the table has images",
                        "scale": "optional (default --scale)", "seed": "optional (default --seed + row number)",
                        "n": "optional (default --n)",
                        "image / images": "optional input images: paths, s3:// URLs, bytes or --codes keys"}


# ----------------------------------------------------------------------------------------------------------
# Rows between a sharded job's stages (tarflow.pipelines.sharded), and in its `_parts/{run}/` (Arrow IPC streams,
# read back by the finalize tasks of the run that wrote them and removed with it). Every job's rows start with
# ROW_FIELDS; each stage's schema adds its own columns. A stage's output schema is the next one's input, so a
# field changed here changes every job at once: bump ROWS_VERSION with it.

ROWS_VERSION = 1
ROW_FIELDS = (
    pa.field("shard", pa.string()),  # the input (or output) shard the row belongs to
    pa.field("idx", pa.int64()),  # its position in the shard; -1 on control rows
    pa.field("key", pa.string()),
    pa.field("kind", pa.string()),  # "sample" | "end" (closes the shard) | "failed" (fails the whole shard)
    pa.field("end_info", pa.string()),  # JSON: the reader's findings on "end" rows, the reason on "failed" rows
    # a sample that failed alone: the stage, a short reason tag and the message (its errors/ row)
    pa.field("error_stage", pa.string()), pa.field("error_reason", pa.string()), pa.field("error_detail", pa.string()),
)
ROW_FIELD_NAMES = tuple(f.name for f in ROW_FIELDS)


def row_schema(*fields: pa.Field) -> pa.Schema:
    """A stage's rows: ROW_FIELDS, then the stage's own `fields`."""
    return pa.schema(list(ROW_FIELDS) + list(fields))


# tokenize (img2dataset input): raw member bytes -> decoded pixels -> codes (the code shard's columns plus `ok`)
_DECODED_SAMPLE = (pa.field("ok", pa.bool_()), pa.field("caption", pa.string()), pa.field("url", pa.string()),
                   pa.field("meta", pa.string()), pa.field("sha256", pa.string()),
                   pa.field("width", pa.int32()), pa.field("height", pa.int32()))
TOKENIZE_RAW_ROWS = row_schema(pa.field("image", pa.binary()), pa.field("image_suffix", pa.string()),
                               pa.field("txt", pa.binary()), pa.field("json", pa.binary()))
# vq_pixels / latent_pixels: null unless the job stores VQ codes / latents
TOKENIZE_DECODED_ROWS = row_schema(*_DECODED_SAMPLE, pa.field("pixels", pa.binary()),
                                   pa.field("vq_pixels", pa.binary()), pa.field("latent_pixels", pa.binary()))


def tokenize_encoded_rows(scales: Sequence[int], codebook_size: int, vq: Mapping[str, Any] | None = None,
                          latents: Mapping[str, Any] | None = None) -> pa.Schema:
    """The encoder's rows: a code shard's columns (code_shard_schema), nullable, for good and failed rows."""
    vt = code_value_type(codebook_size)
    extra = [pa.field(vq["column"], pa.list_(code_value_type(vq["codebook_size"])))] if vq else []
    if latents:
        extra.append(pa.field(latents["column"], latents_type(latents["shape"])))
    return row_schema(*_DECODED_SAMPLE, *(pa.field(code_column(s), pa.list_(vt)) for s in scales), *extra)


# tokenize (conversation tables, tarflow.data.conversations): one row per conversation row, its images as lists in
# order; `passthrough` carries the row's other columns to the writer untouched
_CONVERSATION_IMAGES = (
    pa.field("num_images", pa.int32()), pa.field("image_sha256", pa.list_(pa.string())),
    pa.field("image_path", pa.list_(pa.string())), pa.field("image_width", pa.list_(pa.int32())),
    pa.field("image_height", pa.list_(pa.int32())), pa.field("passthrough", pa.binary()),
)
CONVERSATION_RAW_ROWS = row_schema(pa.field("images", pa.list_(pa.binary())),
                                   pa.field("image_path", pa.list_(pa.string())), pa.field("passthrough", pa.binary()))
CONVERSATION_DECODED_ROWS = row_schema(pa.field("ok", pa.bool_()), *_CONVERSATION_IMAGES,
                                       pa.field("pixels", pa.list_(pa.binary())))


def conversation_encoded_rows(scales: Sequence[int], codebook_size: int) -> pa.Schema:
    """The encoder's rows for conversation tables: per scale one code list per image."""
    vt = code_value_type(codebook_size)
    return row_schema(pa.field("ok", pa.bool_()), *_CONVERSATION_IMAGES,
                      *(pa.field(code_column(s), pa.list_(pa.list_(vt))) for s in scales))


# caption: `images` the row's code lists at the scale (one for an image-text shard); `turns` a conversation row's
# [[from, value], ...] as JSON; `question` its own question (null: the turns, else the run's --question)
CAPTION_CODES_ROWS = row_schema(pa.field("images", pa.list_(pa.list_(pa.int32()))), pa.field("turns", pa.string()),
                                pa.field("question", pa.string()))
CAPTIONED_ROWS = row_schema(
    pa.field("ok", pa.bool_()), pa.field("prompt", pa.string()), pa.field("caption", pa.string()),
    pa.field("prompt_tokens", pa.int32()), pa.field("caption_tokens", pa.int32()), pa.field("finished", pa.bool_()))

# generate: an input image as the output records it (the key of its code shard row or its path, and its bytes'
# sha256), and as the prompt table gives it (a path, URL or --codes key `ref`, or the bytes `data`)
INPUT_IMAGE = pa.struct([pa.field("key", pa.string()), pa.field("path", pa.string()), pa.field("sha256", pa.string())])
IMAGE_REF = pa.struct([pa.field("ref", pa.string()), pa.field("data", pa.binary())])
_REQUEST = (pa.field("id", pa.string()), pa.field("index", pa.int32()), pa.field("prompt", pa.string()),
            pa.field("scale", pa.int32()), pa.field("seed", pa.int64()),
            pa.field("input_images", pa.list_(INPUT_IMAGE)))
GENERATE_REQUEST_ROWS = row_schema(*_REQUEST, pa.field("image_refs", pa.list_(IMAGE_REF)))
# after InputImageLoader: per input image its codes (from --codes) or its pixels at TA-Tok's input size (uint8)
GENERATE_LOADED_ROWS = row_schema(*_REQUEST, pa.field("input_codes", pa.list_(pa.list_(pa.int32()))),
                                  pa.field("input_pixels", pa.list_(pa.binary())))
# every candidate of a request, on its rank-0 image's row (for reflect/{shard}.parquet)
REFLECT_CANDIDATE = pa.struct([pa.field("candidate", pa.int32()), pa.field("seed", pa.int64()),
                               pa.field("codes", pa.list_(pa.int32())), pa.field("codes_fix", pa.string()),
                               pa.field("score", pa.float64()), pa.field("rank", pa.int32()),
                               pa.field("kept", pa.bool_())])
_GENERATED = (pa.field("ok", pa.bool_()), pa.field("codes", pa.list_(pa.int32())), pa.field("codes_fix", pa.string()),
              pa.field("width", pa.int32()), pa.field("height", pa.int32()),
              pa.field("reflect_score", pa.float64()), pa.field("reflect_rank", pa.int32()),
              pa.field("reflect_candidate", pa.int32()), pa.field("candidates", pa.int32()),
              pa.field("reflect_tokens", pa.int64()), pa.field("reflect_seconds", pa.float64()),
              pa.field("reflect_all", pa.list_(REFLECT_CANDIDATE)))
GENERATED_ROWS = row_schema(*_REQUEST, *_GENERATED, pa.field("pixels", pa.binary()))  # (H, W, 3) uint8
GENERATE_ENCODED_ROWS = row_schema(*_REQUEST, *_GENERATED, pa.field("image", pa.binary()))  # PNG / JPEG
