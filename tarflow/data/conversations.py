"""Conversation tables (LLaVA style: Tar's own training corpora) as input: their rows as raw bytes.

A row has `conversations` (a list of {from, value} turns as published, or its JSON text; `<image>` marks each
image in order, over all turns) and an image column, `image` or `images`: a Hugging Face Image struct
{bytes, path}, raw bytes, a path string, a list of any of these, or null / absent (a text-only row). Every other
column is carried through unchanged (`passthrough`). Paths are read under `image_root` when relative.

Files, one shard each (named after the file):
- Parquet (a downloaded Hugging Face dataset's `data/train-00000-of-00010.parquet`, ...): read in batches of a row
  group at most (`iter_batches` on a buffered stream), so a reader holds at most one row group as written.
  Passthrough columns keep their Arrow types; each row's travel as one serialized record batch.
- JSON Lines: streamed line by line; a line that does not parse is one failed row (`invalid_json`).
- A JSON array of row objects (LLaVA's `llava_v1_5_mix665k.json`, 1 GB): streamed element by element with the
  standard library's `raw_decode` on a moving window, so the reader holds one element and one read block, never
  the file; a malformed element cannot be skipped reliably, so it fails the shard (`corrupt_json`). JSON values
  have no column types: every passthrough key becomes a string column (strings as they are, any other value as
  its JSON text: `conversations` is then the JSON text of the turns).

`iter_conversation_rows` yields one `ConversationRow` per input row in file order, then a `ShardEnd` whose
`extra` holds the passthrough schema (`PASSTHROUGH_SCHEMA_KEY`, base64 of the serialized Arrow schema) and the
passthrough encoding (`PASSTHROUGH_ENCODING_KEY`: "arrow" or "json"), which the shard's writer needs.

Per-row problems are the row's error, (stage "read", reason): `bad_conversations` (missing, not a list of
{from, value} turns with string values), `image_count_mismatch` (`<image>` marks != images), `missing_image`
(a path that is not there, a relative path without --image-root, an image entry with neither bytes nor path),
`unreadable_image`, `member_too_large` (an image above `max_member_bytes`), `invalid_json`, `row_too_large`.
Decoding the images is the next stage's work.
"""
from __future__ import annotations

import base64
import codecs
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from tarflow.data import schema, storage
from tarflow.data.img2dataset import InputError, ShardInput
from tarflow.data.retrying_file import DEFAULT_READ_RETRY, ReadRetry, RetryingFile, ShardReadError
from tarflow.data.tar_reader import DEFAULT_MAX_MEMBER_BYTES, ShardEnd

CONVERSATIONS_COLUMN = "conversations"
IMAGE_MARK = "<image>"
JSON_SUFFIXES = (".json", ".jsonl")
PASSTHROUGH_SCHEMA_KEY = "passthrough_schema"
PASSTHROUGH_ENCODING_KEY = "passthrough_encoding"
MAX_ROW_BYTES = 64 << 20  # a JSON row (text only: images are paths) above this fails, bounding a reader's memory
PATH_CHUNK = 64  # rows whose image paths are read together (concurrent requests on object stores)
PARQUET_BATCH_ROWS = 64
JSON_BLOCK = 1 << 20  # bytes read at a time from a JSON array
PARQUET_BUFFER_BYTES = 8 << 20  # Parquet column data is read through buffers of this size (not whole chunks)


@dataclass
class ConversationRow:
    idx: int  # position in the input file (0-based): the output's key and row order
    images: list[bytes] | None = None  # each image's bytes as stored, in the row's order (None if the row failed)
    image_paths: list[str | None] | None = None  # each image's path in the input (HF struct path, JSON path)
    passthrough: bytes | None = None  # the row's other columns (see the module doc); None if the row failed
    error: tuple[str, str, str] | None = None  # (stage, reason, detail)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.images or ()) + len(self.passthrough or b"")


class RowError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------------------
# What a row holds


def count_image_marks(conversations: Any) -> int:
    """The number of `<image>` marks over all turns; RowError("bad_conversations") when the value is not a
    non-empty list of turns {from|role: str, value|content: str} (or the JSON text of one)."""
    conv = conversations
    if isinstance(conv, (bytes, str)):
        try:
            conv = json.loads(conv)
        except ValueError as e:
            raise RowError("bad_conversations", f"conversations is text but not JSON: {e}") from None
    if conv is None:
        raise RowError("bad_conversations", "no conversations")
    if not isinstance(conv, (list, tuple)) or not conv:
        raise RowError("bad_conversations", f"conversations is {type(conv).__name__}"
                       + (" (empty)" if isinstance(conv, (list, tuple)) else "") + ", expected a list of turns")
    marks = 0
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RowError("bad_conversations", f"turn {i} is {type(turn).__name__}, expected {{from, value}}")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or not role:
            raise RowError("bad_conversations", f"turn {i} has no `from` (human/gpt)")
        if not isinstance(value, str):
            raise RowError("bad_conversations", f"turn {i} ({role}) has a {type(value).__name__} value, expected text")
        marks += value.count(IMAGE_MARK)
    return marks


def image_refs(value: Any) -> list[tuple[bytes | None, str | None]]:
    """A row's image column value -> [(bytes, path)] per image, in order; [] for a text-only row."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        out = []
        for i, v in enumerate(value):
            if isinstance(v, (list, tuple)):
                raise RowError("missing_image", f"image {i} is a nested list")
            out += image_refs(v) if v is not None else [(None, None)]
        return out
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [(bytes(value), None)]
    if isinstance(value, str):
        return [(None, value)]
    if isinstance(value, dict):  # a Hugging Face Image struct
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, str):  # JSON cannot hold bytes; a text `bytes` is not an image
            raise RowError("missing_image", "an image struct's `bytes` is text, not bytes")
        return [(bytes(data) if data is not None else None, path if isinstance(path, str) else None)]
    raise RowError("missing_image", f"image value of type {type(value).__name__}")


def resolve_image_path(path: str, image_root: str | None) -> str:
    if storage.is_remote(path) or path.startswith("file://") or os.path.isabs(path):
        return path
    if not image_root:
        raise RowError("missing_image", f"{path} is a relative path and no --image-root was given")
    return storage.join(image_root, *path.split("/"))


def image_column(names: list[str], where: str) -> str | None:
    found = [c for c in schema.CONVERSATION_IMAGE_COLUMNS if c in names]
    if len(found) > 1:
        raise InputError(f"{where}: both {' and '.join(found)} columns; keep the one that holds the images")
    return found[0] if found else None


def _is_bytes_or_path(t: pa.DataType) -> bool:
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t) or pa.types.is_null(t)
            or (pa.types.is_struct(t) and any(t.field(i).name in ("bytes", "path") for i in range(t.num_fields))))


def check_table_schema(file_schema: pa.Schema, path: str) -> str | None:
    """A conversation table's columns: `conversations`, at most one image column of a type that holds images,
    no column named like the output's own. Returns the image column (None: text only). Raises InputError."""
    names = file_schema.names
    if CONVERSATIONS_COLUMN not in names:
        raise InputError(f"{path}: no `conversations` column in {names[:12]}; a conversation table has LLaVA-style "
                         "`conversations` (and `image`)")
    col = image_column(names, path)
    if col is not None:
        t = file_schema.field(col).type
        inner = t.value_type if (pa.types.is_list(t) or pa.types.is_large_list(t)) else t
        if not _is_bytes_or_path(inner):
            raise InputError(f"{path}: column {col!r} is {t}; expected image bytes, a path, an Image struct "
                             "{bytes, path} or a list of these")
    try:
        schema.conversation_shard_schema([1], 2, pa.schema([f for f in file_schema if f.name != col]))
    except schema.SchemaError as e:
        raise InputError(f"{path}: {e}") from None
    return col


def parquet_is_conversation_table(path: str) -> bool:
    """Whether a Parquet file has a `conversations` column (read from its footer only)."""
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(path)
    with fs.open(inner, "rb") as f:
        return CONVERSATIONS_COLUMN in pq.read_schema(f).names


def file_kind(path: str) -> str:
    return "json" if path.lower().endswith(JSON_SUFFIXES) else "parquet"


# ----------------------------------------------------------------------------------------------------------
# Reading


def iter_conversation_rows(shard: ShardInput, image_root: str | None = None,
                           max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                           retry: ReadRetry = DEFAULT_READ_RETRY) -> Iterator[ConversationRow | ShardEnd]:
    """One ConversationRow per input row, in file order, then the ShardEnd (see the module doc). Raises
    ShardReadError / InputError when the file cannot be read as a conversation table (the shard fails)."""
    found: dict = {}  # what the record reader learns: the passthrough schema
    with RetryingFile(shard.path, retry) as f:
        json_input = file_kind(shard.path) == "json"
        records = _json_records(f, shard.path, found) if json_input else _parquet_records(f, shard.path, found)
        n = 0
        pending: list = []
        to_read = False
        for idx, record, passthrough, image_value in records:
            n = idx + 1
            refs: list = []
            if not isinstance(record, RowError):
                try:
                    marks = count_image_marks(record)
                    refs = image_refs(image_value)
                    if marks != len(refs):
                        raise RowError("image_count_mismatch", f"{marks} {IMAGE_MARK} marks in the conversations "
                                       f"but {len(refs)} image(s)")
                except RowError as e:
                    record = e
            pending.append((idx, record, passthrough, refs))
            # rows wait only while they have image paths to read, to read up to PATH_CHUNK rows' at once
            to_read = to_read or any(data is None for data, _ in refs)
            if not to_read or len(pending) >= PATH_CHUNK:
                yield from _resolve(pending, image_root, max_member_bytes)
                pending, to_read = [], False
        yield from _resolve(pending, image_root, max_member_bytes)
    pt_schema = pa.schema([pa.field(k, pa.string()) for k in found["keys"]]) if json_input else found["schema"]
    yield ShardEnd(n_samples=n, extra={PASSTHROUGH_SCHEMA_KEY: encode_schema(pt_schema),
                                       PASSTHROUGH_ENCODING_KEY: "json" if json_input else "arrow"})


def _resolve(pending, image_root, limit) -> Iterator[ConversationRow]:
    """Rows -> ConversationRows, the images given as paths read (concurrently on object stores)."""
    wanted = {}
    for _, record, _, refs in pending:
        if isinstance(record, RowError):
            continue
        for data, path in refs:
            if data is None and path:
                try:
                    wanted[path] = resolve_image_path(path, image_root)
                except RowError:
                    pass  # reported per row below
    got = _read_images(sorted(set(wanted.values())))
    for idx, record, passthrough, refs in pending:
        row = ConversationRow(idx=idx)
        try:
            if isinstance(record, RowError):
                raise record
            images, paths = [], []
            for k, (data, path) in enumerate(refs):
                where = f"image {k + 1} of {len(refs)}" + (f" ({path})" if path else "")
                if data is None:
                    if not path:
                        raise RowError("missing_image", f"{where} has neither bytes nor a path")
                    full = resolve_image_path(path, image_root)
                    data = got.get(full)
                    if isinstance(data, RowError):
                        raise RowError(data.reason, f"{where}: {data.detail}")
                    if data is None:
                        raise RowError("missing_image", f"{where}: {full} does not exist")
                if len(data) > limit:
                    raise RowError("member_too_large", f"{where} holds {len(data)} bytes, above the limit of {limit} "
                                                       "bytes (--max-member-bytes)")
                images.append(data)
                paths.append(path)
            row.images, row.image_paths, row.passthrough = images, paths, passthrough
        except RowError as e:
            row.error = ("read", e.reason, e.detail[:500])
        yield row


def _read_images(paths: list[str]) -> dict[str, bytes | RowError | None]:
    """{path: bytes, None when missing, RowError when unreadable}."""
    if not paths:
        return {}
    if storage.is_remote(paths[0]):
        return storage.read_many(paths)
    out: dict[str, bytes | RowError | None] = {}
    for p in paths:
        try:
            out[p] = storage.read_bytes(p)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            out[p] = None
        except PermissionError as e:
            out[p] = RowError("unreadable_image", f"{p} is not readable by this user ({e})")
    return out


def _parquet_records(f: RetryingFile, path: str, found: dict) -> Iterator[tuple]:
    """(idx, conversations value, passthrough record batch message, image value) per row."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)
        file_schema = pf.schema_arrow
    except pa.ArrowException as e:
        raise ShardReadError("corrupt_parquet", f"{type(e).__name__}: {e}", path) from None
    col = check_table_schema(file_schema, path)
    # dictionary columns (pandas categoricals) travel decoded: a lone record batch carries no dictionary
    pt_fields = [pa.field(fl.name, fl.type.value_type, fl.nullable) if pa.types.is_dictionary(fl.type) else fl
                 for fl in file_schema if fl.name != col]
    found["schema"] = pt_schema = pa.schema(pt_fields)
    idx = 0
    # one row group at a time (a batch across groups would read them all to fill it), in small batches within it
    batches = (b for g in range(pf.num_row_groups)
               for b in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[g], use_threads=False))
    while True:
        try:
            batch = next(batches, None)
        except pa.ArrowException as e:
            raise ShardReadError("corrupt_parquet", f"after {idx} rows: {type(e).__name__}: {e}", path) from None
        if batch is None:
            return
        conv = batch.column(CONVERSATIONS_COLUMN).to_pylist()
        images = batch.column(col).to_pylist() if col else [None] * batch.num_rows
        rest = pa.RecordBatch.from_arrays([batch.column(fl.name).cast(fl.type) for fl in pt_fields],
                                          schema=pt_schema)
        for i in range(batch.num_rows):
            yield idx, conv[i], rest.slice(i, 1).serialize().to_pybytes(), images[i]
            idx += 1


def _json_records(f: RetryingFile, path: str, found: dict) -> Iterator[tuple]:
    """(idx, conversations value or RowError, passthrough JSON, image value) per row of a JSON Lines file or a
    JSON array; `found["keys"]` the passthrough keys seen, in order of first appearance."""
    keys: dict[str, None] = {}
    found["keys"] = keys
    buf = io.BufferedReader(f, 1 << 20)
    head = buf.peek(64).lstrip(codecs.BOM_UTF8).lstrip()
    values = _json_array_values(buf, path) if head[:1] == b"[" else _json_line_values(buf)
    for idx, value in enumerate(values):
        if isinstance(value, RowError):
            yield idx, value, None, None
            continue
        if not isinstance(value, dict):
            yield idx, RowError("invalid_json", f"row is a JSON {type(value).__name__}, expected an object"), None, None
            continue
        try:
            col = image_column(list(value), f"row {idx}")
        except InputError as e:
            yield idx, RowError("missing_image", str(e)), None, None
            continue
        rest = {k: v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                for k, v in value.items() if k != col}
        keys.update(dict.fromkeys(rest))
        yield idx, value.get(CONVERSATIONS_COLUMN), json.dumps(rest, ensure_ascii=False).encode(), value.get(col)


def _json_line_values(buf: io.BufferedReader) -> Iterator[Any]:
    """One value (or RowError) per non-empty line; a line longer than MAX_ROW_BYTES is skipped unread."""
    while True:
        line = buf.readline(MAX_ROW_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_ROW_BYTES and not line.endswith(b"\n"):
            skipped = len(line)
            while (more := buf.readline(1 << 20)) and not more.endswith(b"\n"):
                skipped += len(more)
            yield RowError("row_too_large", f"a line of more than {skipped} bytes (limit {MAX_ROW_BYTES})")
            continue
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError as e:
            yield RowError("invalid_json", f"{type(e).__name__}: {e}"[:300])


def _json_array_values(buf: io.BufferedReader, path: str) -> Iterator[Any]:
    """The elements of a JSON array, parsed one at a time from a window of the text (see the module doc)."""
    block = JSON_BLOCK
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8-sig")()
    text, pos, eof, consumed = "", 0, False, 0

    def more() -> None:
        nonlocal text, pos, eof, consumed
        data = buf.read(block)
        eof = not data
        consumed += len(data)
        try:
            text = text[pos:] + utf8.decode(data, final=eof)
        except UnicodeDecodeError as e:
            raise ShardReadError("corrupt_json", f"not UTF-8 near byte {consumed}: {e}", path) from None
        pos = 0

    def skip_space() -> str:
        nonlocal pos
        while True:
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if pos < len(text) or eof:
                return text[pos] if pos < len(text) else ""
            more()

    more()
    if skip_space() != "[":
        raise ShardReadError("corrupt_json", "a .json input must be a JSON array of rows or JSON Lines", path)
    pos += 1
    first = True
    while True:
        c = skip_space()
        if c == "]":
            pos += 1
            if skip_space():
                raise ShardReadError("corrupt_json", f"data after the closing ] near byte {consumed}", path)
            return
        if not first:
            if c != ",":
                raise ShardReadError("corrupt_json", f"expected , or ] near byte {consumed}", path)
            pos += 1
            skip_space()
        first = False
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
                if end < len(text) or eof:  # a value ending at the window's edge may continue after it
                    break
            except ValueError as e:
                if eof:
                    raise ShardReadError("corrupt_json", f"{e} (after {consumed} bytes); convert the file to JSON "
                                         "Lines to have bad rows fail alone", path) from None
            if len(text) - pos > MAX_ROW_BYTES:
                raise ShardReadError("corrupt_json", f"an element of more than {MAX_ROW_BYTES} bytes, or malformed "
                                     f"JSON, near byte {consumed}", path)
            more()
        pos = end
        yield value


def peek_image_paths(path: str, rows: int = 64, retry: ReadRetry = DEFAULT_READ_RETRY) -> list[str]:
    """The image paths (of images without bytes) in the first `rows` rows of a conversation table, for the
    driver's checks; raises InputError / ShardReadError as the reader would on the whole file."""
    out: list[str] = []
    with RetryingFile(path, retry) as f:
        if file_kind(path) == "json":
            values = (v for _, _, _, v in _json_records(f, path, {}))
        else:
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(f, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)
                col = check_table_schema(pf.schema_arrow, path)
                first = next(pf.iter_batches(batch_size=min(rows, 16), columns=[col]), None) if col else None
            except pa.ArrowException as e:
                raise ShardReadError("corrupt_parquet", f"{type(e).__name__}: {e}", path) from None
            values = iter(first.column(0).to_pylist() if first is not None else [])
        for i, value in enumerate(values):
            if i >= rows:
                break
            try:
                out += [p for data, p in image_refs(value) if data is None and p]
            except RowError:
                pass  # that row fails alone when the job reads it
    return out


def encode_schema(s: pa.Schema) -> str:
    return base64.b64encode(s.serialize().to_pybytes()).decode()


def decode_schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def passthrough_table(blobs: list[bytes], pt_schema: pa.Schema, encoding: str) -> pa.Table:
    """The passthrough columns of rows, from their blobs (see the module doc), typed by `pt_schema`."""
    if encoding == "arrow":
        return pa.Table.from_batches([pa.ipc.read_record_batch(pa.py_buffer(b), pt_schema) for b in blobs],
                                     schema=pt_schema)
    rows = [json.loads(b) for b in blobs]
    return pa.Table.from_pylist([{k: r.get(k) for k in pt_schema.names} for r in rows], schema=pt_schema)
