"""The generate job: a prompt table -> synthetic images as img2dataset-style WebDataset shards, on Ray Data.

    prompt table --an index task (validates it, counts the requests per row group; the driver cuts those
                   counts into output shards, never holding a row)
      --PromptShardReader (tasks: one output shard's row groups, n samples per row expanded, its end row)
      --InputImageLoader (CPU tasks: a request's input images, as stored codes or decoded pixels)
      --T2IGenerator (GPU actor pool: T2I prompts -> codes with the Tar MLLM -> pixels with a de-tokenizer)
      --ImageEncoder (CPU tasks: PNG / JPEG)
      --PartWriter --> finalize tasks: GeneratedShardWriter ({shard}.tar streamed a part at a time, .parquet,
                       _stats.json, errors/), then _manifest/

Requests stream shard by shard (each shard's end row right after its requests), so a shard is written as
soon as its images are done: the first manifests appear long before the last request is processed.

Each sample's seed drives both the MLLM's sampling and the de-tokenizer's, per row, so an image depends only on
its prompt, scale and seed: reruns, retries and other batch sizes give the same pixels.

Self-reflection (`reflect`, see the section below and tarflow/models/reflect.py): per request the generator
samples N candidate code sequences, the same MLLM scores each from its codes (one batched forward), and only
the best K are de-tokenized; a request then fills K consecutive rows (indices and keys reserved by the driver).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tarflow.data import schema, storage
from tarflow.data.codeshard import resolve_code_shards
from tarflow.data.schema import (GENERATE_ENCODED_ROWS, GENERATE_LOADED_ROWS, GENERATE_REQUEST_ROWS,
                                 GENERATED_ROWS, REFLECT_CANDIDATE)
from tarflow.data.shards import ShardFiles, ShardLayout, ShardWritten, file_identity, folder_identity, parquet_bytes
from tarflow.pipelines.sharded import (DEFAULT_STALL_TIMEOUT_S, JobSummary, PartWriter, ShardJob,
                                       ShardParts, end_row, check_pool_leaves_cpus,
                                       guarded, plan_pool, plan_shards, rows_table, run_sharded)

log = logging.getLogger("tarflow.generate")

# ----------------------------------------------------------------------------------------------------------
# The prompt table: read by tasks, in row groups; the driver holds one (rows, requests) pair per row group
#
#   index task: CSV / JSONL (and Parquet with oversized row groups) rewritten once, streaming, into a Parquet of
#               row groups of STAGED_GROUP_ROWS under {output}/_prompts/ (named by the table's sha256, so reruns
#               reuse it); then the requests of each row group counted
#   driver:     cuts the requests into output shards from those counts alone
#   shard task: reads the row groups of one output shard, expands its requests, emits them in blocks


class PromptTableError(ValueError):
    pass


PROMPTS_DIR = "_prompts"  # {output}/_prompts/{sha256[:16]}.parquet: a CSV / JSONL table rewritten in row groups


PROMPT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json", ".ndjson": "json"}
IMAGE_COLUMNS = ("images", "image")  # a row's input images: one value or a list (paths, URLs, bytes, keys)
STAGED_GROUP_ROWS = 1024
MAX_GROUP_ROWS = 65536  # a Parquet table's row groups are read as they are up to this size...
MAX_GROUP_BYTES = 256 << 20  # ...and these bytes; beyond, the table is rewritten in row groups like CSV input
_READ_BLOCK = 16 << 20  # CSV / JSONL: types are inferred from the first block of this many bytes


def prompt_table_format(path: str) -> str:
    ext = "." + path.lower().rsplit(".", 1)[-1] if "." in path.rsplit("/", 1)[-1] else ""
    if ext not in PROMPT_FORMATS:
        raise PromptTableError(f"prompt table {path}: use .parquet, .csv or .jsonl")
    return PROMPT_FORMATS[ext]


def _open_batches(path: str, fmt: str, stack):
    """A streaming reader over the table: (schema, iterator of record batches), its file held open by `stack`
    (a contextlib.ExitStack); CSV cells read as strings (a number column with one bad cell fails that row, not
    the table)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, p = storage.filesystem(path)
    f = stack.enter_context(fs.open(p, "rb"))
    if fmt == "parquet":
        pf = pq.ParquetFile(f)
        return pf.schema_arrow, pf.iter_batches(batch_size=STAGED_GROUP_ROWS)
    if fmt == "csv":
        with fs.open(p, "rb") as head:  # its own handle: a reader reads ahead in the background
            names = pacsv.open_csv(head, read_options=pacsv.ReadOptions(block_size=1 << 16)).schema.names
        reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=_READ_BLOCK),
                                convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                                     strings_can_be_null=True))
    else:
        reader = pajson.open_json(f, read_options=pajson.ReadOptions(block_size=_READ_BLOCK))
    return reader.schema, iter(reader)


def _parse_error(path: str, e: Exception) -> PromptTableError:
    return PromptTableError(f"prompt table {path} does not parse ({type(e).__name__}: {str(e).splitlines()[0]})")


def prompt_table_schema(path: str) -> pa.Schema:
    """The table's columns, read from its footer (Parquet) or first block (CSV, JSONL), checked: `id`, and
    `prompt` unless the table has input images (variations need no instruction)."""
    fmt = prompt_table_format(path)
    try:
        with contextlib.ExitStack() as stack:
            table_schema, _ = _open_batches(path, fmt, stack)
    except FileNotFoundError:
        raise PromptTableError(f"prompt table {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - whatever the parser raises, said in one line
        raise _parse_error(path, e) from None
    names = table_schema.names
    need = ["id"] + ([] if any(c in names for c in IMAGE_COLUMNS) else ["prompt"])
    missing = [c for c in need if c not in names]
    if missing:
        raise PromptTableError(f"prompt table {path} lacks columns {missing} (has {names}); columns: "
                               + ", ".join(f"{c} ({w})" for c, w in schema.PROMPT_TABLE_COLUMNS.items()))
    return table_schema


def iter_prompt_rows(path: str):
    """Every row of a prompt table as a dict, streaming (for small tables and tools; the job reads row groups)."""
    prompt_table_schema(path)
    fmt = prompt_table_format(path)
    with contextlib.ExitStack() as stack:
        _, batches = _open_batches(path, fmt, stack)
        try:
            for rb in batches:
                for row in rb.to_pylist():
                    if fmt == "csv":  # CSV cells are text: integers as integers, as the job reads them
                        row.update({c: _as_int(row[c]) for c in ("scale", "seed", "n")
                                    if isinstance(row.get(c), str) and _as_int(row[c]) is not None})
                    yield row
        except Exception as e:  # noqa: BLE001
            raise _parse_error(path, e) from None


def read_prompt_table(path: str) -> list[dict]:
    """Rows of a Parquet / CSV / JSONL prompt table (local or s3://) as dicts; see schema.PROMPT_TABLE_COLUMNS."""
    return list(iter_prompt_rows(path))


@dataclass(frozen=True)
class RequestDefaults:
    scale: int
    seed: int
    n: int
    valid_scales: frozenset


def _as_int(v):
    """An integer cell: ints, integral floats (JSON) and integer strings (CSV); None when it is not one."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v.strip())
    return None


def row_image_refs(row: dict) -> list[dict] | None:
    """A row's input images as [{ref, data}]: `images` or `image`, one value or a list of paths / URLs / keys
    (strings), bytes, or Hugging Face Image structs {bytes, path}; a CSV cell holds one path or a JSON list.
    None when the row has none. ValueError for a value of another kind."""
    value = next((row[c] for c in IMAGE_COLUMNS if row.get(c) is not None), None)
    if value is None:
        return None
    if isinstance(value, str) and value.lstrip().startswith("["):
        value = json.loads(value)
    refs = []
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, dict) and (item.get("bytes") is not None or item.get("path") is not None):
            refs.append({"ref": item.get("path"), "data": item.get("bytes")})
        elif isinstance(item, (bytes, bytearray)):
            refs.append({"ref": None, "data": bytes(item)})
        elif isinstance(item, str) and item.strip():
            refs.append({"ref": item.strip(), "data": None})
        else:
            raise ValueError(f"an input image is {type(item).__name__} {str(item)[:60]!r}: give a path, an s3:// "
                             "URL, bytes, a {bytes, path} struct, or a --codes key")
    return refs or None


def row_requests(row: dict, r: int, d: RequestDefaults) -> list[dict]:
    """The requests of prompt table row `r`: one per image to make (id, index k, seed + k). A bad row gives one
    failed request with a reason (recorded in errors/, never silently dropped)."""
    rid = str(row.get("id")) if row.get("id") is not None else f"row{r}"
    prompt = row.get("prompt")
    base = {"id": rid, "index": 0, "prompt": prompt if isinstance(prompt, str) else None, "scale": None,
            "seed": None}
    scale = d.scale if row.get("scale") is None else _as_int(row["scale"])
    seed = d.seed + r if row.get("seed") is None else _as_int(row["seed"])
    n = d.n if row.get("n") is None else _as_int(row["n"])
    reason, refs = None, None
    try:
        refs = row_image_refs(row)
    except ValueError as e:
        reason = ("bad_image_ref", str(e))
    if reason:
        pass  # the image column's value is unusable whatever the rest says
    elif prompt is not None and not isinstance(prompt, str):
        reason = ("empty_prompt", f"the prompt is {type(prompt).__name__}, not text")
    elif not refs and (not isinstance(prompt, str) or not prompt.strip()):
        reason = ("empty_prompt", "the prompt is empty or missing")
    elif scale is None or scale not in d.valid_scales:
        reason = ("bad_scale", f"scale {row.get('scale')!r} is not one of {sorted(d.valid_scales)}")
    elif seed is None:
        reason = ("bad_seed", f"seed {row.get('seed')!r} is not an integer")
    elif n is None or n < 1:
        reason = ("bad_n", f"n {row.get('n')!r} is not a positive integer")
    if reason:
        return [{**base, "error_stage": "request", "error_reason": reason[0], "error_detail": reason[1]}]
    return [{**base, "index": k, "scale": scale, "seed": seed + k, "image_refs": refs} for k in range(n)]


def expand_requests(rows: list[dict], default_scale: int, default_seed: int, default_n: int,
                    valid_scales: set[int]) -> list[dict]:
    """Every request of `rows` (a whole small table), in order."""
    d = RequestDefaults(default_scale, default_seed, default_n, frozenset(valid_scales))
    return [q for r, row in enumerate(rows) for q in row_requests(row, r, d)]


def key_digits(per_shard: int, keep: int = 1) -> int:
    most = max(per_shard, keep)  # rows a shard can hold
    return math.ceil(math.log10(most)) if most > 1 else 0


def place_requests(requests: list[dict], shard: int, digits: int, keep: int = 1) -> list[dict]:
    """A shard's requests with their rows, keyed the img2dataset way (shard * 10^d + row). A request makes `keep`
    images (best-of-N keeps K; a failed request makes one error row): it reserves that many consecutive rows,
    `idx` and `key` being its first one's, `slots` their count."""
    name, rows, i = f"{shard:05d}", [], 0
    for r in requests:
        slots = keep if r.get("error_reason") is None else 1
        rows.append({**r, "shard": name, "idx": i, "kind": "sample", "slots": slots,
                     "key": f"{shard * 10 ** digits + i:0{digits + 5}d}"})
        i += slots
    return rows


def shard_requests(requests: list[dict], per_shard: int, keep: int = 1) -> dict[str, list[dict]]:
    """Cut requests into output shards of `per_shard` images (a request's images stay in one shard)."""
    per_request = max(1, per_shard // keep)
    digits = key_digits(per_shard, keep)
    return {f"{s:05d}": place_requests(requests[s * per_request:(s + 1) * per_request], s, digits, keep)
            for s in range(math.ceil(len(requests) / per_request))}


def _request_columns(names) -> list[str]:
    return [c for c in ("id", "prompt", "scale", "seed", "n", *IMAGE_COLUMNS) if c in names]


def index_prompt_table(path: str, staged: str, d: RequestDefaults) -> dict:
    """(A Ray task.) The table to read in row groups, and per row group its rows and requests:
    {"path", "groups": [[rows, requests], ...]}. Streaming: memory is one row group, whatever the table."""
    import pyarrow.parquet as pq

    fmt = prompt_table_format(path)
    fs, p = storage.filesystem(path)
    if fmt == "parquet":
        with fs.open(p, "rb") as f:
            md = pq.ParquetFile(f).metadata
            small = all(md.row_group(g).num_rows <= MAX_GROUP_ROWS and md.row_group(g).total_byte_size
                        <= MAX_GROUP_BYTES for g in range(md.num_row_groups))
        if small:
            staged = path
    if staged != path and not storage.exists(staged):
        buf = io.BytesIO()
        with contextlib.ExitStack() as stack:
            table_schema, batches = _open_batches(path, fmt, stack)
            writer = None
            try:
                for rb in batches:
                    if writer is None:
                        writer = pq.ParquetWriter(buf, rb.schema, compression="zstd")
                    writer.write_table(pa.Table.from_batches([rb]), row_group_size=STAGED_GROUP_ROWS)
            except Exception as e:  # noqa: BLE001
                raise _parse_error(path, e) from None
            if writer is None:
                writer = pq.ParquetWriter(buf, table_schema, compression="zstd")
            writer.close()
        storage.write_bytes_atomic(staged, buf.getvalue())
        del buf
    groups, r = [], 0
    sfs, sp = storage.filesystem(staged)
    with sfs.open(sp, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = _request_columns(pf.schema_arrow.names)
        for g in range(pf.metadata.num_row_groups):
            rows = pf.read_row_group(g, columns=columns).to_pylist()
            groups.append([len(rows), sum(len(row_requests(row, r + i, d)) for i, row in enumerate(rows))])
            r += len(rows)
    return {"path": staged, "groups": groups}


def plan_output_shards(groups: list, per_shard: int, keep: int) -> list[dict]:
    """Output shards from per-row-group (rows, requests) counts alone: shard s holds requests
    [s * P, (s + 1) * P) (P = per_shard // keep) of the table, in order; each descriptor names the row groups
    that hold them, the first one's row and request offsets, and the requests to take."""
    per_request = max(1, per_shard // keep)
    total = sum(q for _, q in groups)
    row0, q0 = [0], [0]
    for rows, q in groups:
        row0.append(row0[-1] + rows)
        q0.append(q0[-1] + q)
    out, g = [], 0
    for s in range(math.ceil(total / per_request)):
        start, stop = s * per_request, min(total, (s + 1) * per_request)
        while q0[g + 1] <= start:
            g += 1
        last = g
        while q0[last + 1] < stop:
            last += 1
        out.append({"shard": s, "name": f"{s:05d}", "first_group": g, "last_group": last, "row0": row0[g],
                    "skip": start - q0[g], "take": stop - start})
    return out


class PromptShardReader:
    """Output shard descriptors -> that shard's request rows in blocks of `block`, then its end row. Reads only
    the row groups holding the shard's requests."""

    def __init__(self, table: str, defaults: RequestDefaults, digits: int, keep: int, block: int):
        self.table, self.defaults, self.digits, self.keep, self.block = table, defaults, digits, keep, block

    def __call__(self, batch: pa.Table):
        import pyarrow.parquet as pq

        for d in batch.to_pylist():
            fs, p = storage.filesystem(self.table)
            requests, r = [], d["row0"]
            with fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                columns = _request_columns(pf.schema_arrow.names)
                for g in range(d["first_group"], d["last_group"] + 1):
                    for row in pf.read_row_group(g, columns=columns).to_pylist():
                        requests += row_requests(row, r, self.defaults)
                        r += 1
            rows = place_requests(requests[d["skip"]:d["skip"] + d["take"]], d["shard"], self.digits, self.keep)
            del requests
            rows.append(end_row(d["name"], sum(q["slots"] for q in rows)))
            for i in range(0, len(rows), self.block):
                yield rows_table(rows[i:i + self.block], GENERATE_REQUEST_ROWS)


def request_blocks(shards: dict[str, list[dict]], names: list[str], block: int) -> list[pa.Table]:
    """The requests of `names`, shard after shard, each shard's end row right after its last request, cut
    into blocks of `block` rows (for stage tests that build requests in memory)."""
    out = []
    for n in names:
        table = rows_table(shards[n] + [end_row(n, sum(r.get("slots", 1) for r in shards[n]))],
                           GENERATE_REQUEST_ROWS)
        out += [table.slice(i, block) for i in range(0, len(table), block)]
    return out


# ----------------------------------------------------------------------------------------------------------
# Input images: paths, URLs, bytes, or rows of the --codes code shards


def parse_code_ref(ref: str) -> tuple[str | None, str, int | None]:
    """`KEY`, `SHARD/KEY`, either with `#k` (the k-th image of a conversation row, from 0) ->
    (shard or None, key, k or None)."""
    k = None
    if "#" in ref:
        ref, _, j = ref.rpartition("#")
        k = int(j) if j.isdigit() else -1
    shard, _, key = ref.rpartition("/")
    return shard or None, key, k


def is_path_ref(ref: str) -> bool:
    """With --codes, a reference is a path only when it says so: a URL (s3://, file://) or an absolute path;
    anything else is a key of the code shards."""
    return "://" in ref or ref.startswith("/")


class RowFailure(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


class CodeIndex:
    """Finds the rows of `--codes` code shards (either kind) by key, per worker process: each shard's key column
    is read once (kept for the `cache` most recent shards), codes only for the rows asked."""

    _keys: dict = {}  # path -> {key: row}, shared by the tasks a worker process runs

    def __init__(self, shards: list[tuple[str, str]], cache: int = 64):
        self.shards, self.by_name, self.cache = shards, dict(shards), cache

    def _key_rows(self, path: str) -> dict:
        import pyarrow.parquet as pq

        if path not in self._keys:
            fs, p = storage.filesystem(path)
            with fs.open(p, "rb") as f:
                keys = pq.read_table(f, columns=["key"]).column("key").to_pylist()
            while len(self._keys) >= self.cache:
                self._keys.pop(next(iter(self._keys)))
            self._keys[path] = {k: i for i, k in enumerate(keys)}
        return self._keys[path]

    def find(self, ref: str) -> tuple[str, int, int | None]:
        """(path, row, k) of a key reference, or RowFailure."""
        shard, key, k = parse_code_ref(ref)
        if k == -1:
            raise RowFailure("bad_image_ref", f"{ref!r}: after '#' give the image's index in its row (0, 1, ...)")
        if shard is not None:
            if shard not in self.by_name:
                raise RowFailure("image_key_not_found", f"{ref!r}: no code shard named {shard!r} in --codes")
            paths = [self.by_name[shard]]
        else:
            paths = [p for _, p in self.shards]
        hits = [(p, self._key_rows(p)[key]) for p in paths if key in self._key_rows(p)]
        if not hits:
            raise RowFailure("image_key_not_found", f"{ref!r}: no row with key {key!r} in the --codes shards")
        if len(hits) > 1:
            names = [n for n, p in self.shards if p in {h[0] for h in hits}]
            raise RowFailure("ambiguous_image_key", f"{ref!r} is a key in {len(hits)} code shards ({names[:3]}); "
                             f"name the shard: SHARD/KEY")
        return hits[0][0], hits[0][1], k

    def images(self, refs: list[str], scale: int) -> dict[str, list[tuple[list[int], dict]]]:
        """For each key reference its images: [(codes at `scale`, {key, path, sha256})]; a reference that fails
        maps to its RowFailure."""
        import pyarrow.parquet as pq

        out, wanted = {}, {}
        for ref in refs:
            try:
                wanted.setdefault(ref, self.find(ref))
            except RowFailure as e:
                out[ref] = e
        by_path: dict = {}
        for ref, (path, row, k) in wanted.items():
            by_path.setdefault(path, []).append((ref, row, k))
        column = schema.code_column(scale)
        for path, asks in by_path.items():
            fs, p = storage.filesystem(path)
            with fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                meta = schema.check_any_code_shard(pf.schema_arrow, path)
                if column not in pf.schema_arrow.names:
                    for ref, _, _ in asks:
                        out[ref] = RowFailure("scale_not_in_codes", f"{ref!r}: {path} holds scales "
                                              f"{meta.get('scales')}, not {scale}")
                    continue
                conv = schema.is_conversation_shard(meta)
                cols = [column] + (["image_sha256", "image_path"] if conv else ["sha256"])
                starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
                groups = sorted({int(np.searchsorted(starts, row, side="right")) - 1 for _, row, _ in asks})
                table = pf.read_row_groups(groups, columns=cols)
                offset = {g: int(sum(pf.metadata.row_group(x).num_rows for x in groups[:i]))
                          for i, g in enumerate(groups)}
                for ref, row, k in asks:
                    g = int(np.searchsorted(starts, row, side="right")) - 1
                    rec = table.slice(offset[g] + row - int(starts[g]), 1).to_pylist()[0]
                    _, key, _ = parse_code_ref(ref)
                    if conv:
                        images = [(codes, {"key": ref if k is None else ref.rpartition("#")[0] + f"#{j}",
                                           "path": ip, "sha256": sha})
                                  for j, (codes, sha, ip) in enumerate(zip(rec[column], rec["image_sha256"],
                                                                           rec["image_path"]))]
                    else:
                        images = [(rec[column], {"key": ref, "path": None, "sha256": rec["sha256"]})]
                    if k is not None:
                        if not 0 <= k < len(images):
                            out[ref] = RowFailure("image_key_not_found", f"{ref!r}: the row has {len(images)} "
                                                  "images")
                            continue
                        images = [images[k]]
                        images[0][1]["key"] = ref
                    out[ref] = images
        return out


class InputImageLoader:
    """CPU tasks: request rows with input images -> per image its codes (a --codes key: never decoded again) or
    its pixels at TA-Tok's input size (read and decoded here; the generator encodes them), and its record
    (key or path, sha256). A row whose image cannot be had, or whose `<image>` marks do not match its images,
    fails alone: its `keep` rows are recorded failed with the reason."""

    def __init__(self, input_size: int, table_dir: str, codes: list[tuple[str, str]] | None = None,
                 keep: int = 1, max_pixels: int | None = None):
        from tarflow.data.images import DEFAULT_MAX_PIXELS

        self.input_size, self.table_dir, self.keep = input_size, table_dir, keep
        self.codes = CodeIndex(codes) if codes else None
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS

    @guarded("load_images", GENERATE_LOADED_ROWS)
    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if r["kind"] == "sample" and r["error_reason"] is None and r["image_refs"]]
        keyed = {}
        if self.codes:
            for scale in {r["scale"] for r in todo}:
                refs = sorted({i["ref"] for r in todo if r["scale"] == scale for i in r["image_refs"]
                               if i["data"] is None and not is_path_ref(i["ref"])})
                keyed[scale] = self.codes.images(refs, scale) if refs else {}
        pixels_cache: dict = {}
        out, todo_ids = [], {id(r) for r in todo}
        for r in rows:
            refs = r.pop("image_refs", None)
            r.update(input_codes=None, input_pixels=None)
            if id(r) not in todo_ids:
                out.append(r)
                continue
            try:
                self._load(r, refs, keyed.get(r["scale"], {}), pixels_cache)
                out.append(r)
            except RowFailure as e:
                out += failed_slots(r, "input_image", e.reason, e.detail, self.keep)
        return rows_table(out, GENERATE_LOADED_ROWS)

    def _load(self, r: dict, refs: list[dict], keyed: dict, cache: dict) -> None:
        from tarflow.models.mllm import IMAGE_MARK

        codes, pixels, records = [], [], []
        for ref in refs:
            if ref["data"] is None and self.codes and not is_path_ref(ref["ref"]):
                found = keyed[ref["ref"]]
                if isinstance(found, RowFailure):
                    raise found
                for c, rec in found:
                    codes.append(c)
                    pixels.append(None)
                    records.append(rec)
                continue
            if ref["data"] is not None:
                px, rec = self._pixels(ref)
            else:  # a path: read and decoded once per block, however many requests name it
                if ref["ref"] not in cache:
                    try:
                        cache[ref["ref"]] = self._pixels(ref)
                    except RowFailure as e:
                        cache[ref["ref"]] = e
                if isinstance(cache[ref["ref"]], RowFailure):
                    raise cache[ref["ref"]]
                px, rec = cache[ref["ref"]]
            codes.append(None)
            pixels.append(px)
            records.append(rec)
        marks = (r["prompt"] or "").count(IMAGE_MARK)
        if marks and marks != len(records):
            raise RowFailure("image_count_mismatch", f"the prompt has {marks} {IMAGE_MARK} marks for "
                             f"{len(records)} input images")
        r.update(input_codes=codes, input_pixels=pixels, input_images=records)

    def _pixels(self, ref: dict) -> tuple[bytes, dict]:
        import hashlib

        from tarflow.data.images import SampleError, decode_rgb
        from tarflow.models.tatok import resize_uint8

        path = None
        data = ref["data"]
        if data is None:
            path = ref["ref"]
            if not is_path_ref(path) and not path.startswith("/"):
                path = storage.join(self.table_dir, path)
            try:
                data = storage.read_bytes(path)
            except FileNotFoundError:
                raise RowFailure("image_not_found", f"{path}: no such file") from None
            except (OSError, ValueError) as e:
                raise RowFailure("image_unreadable", f"{path}: {type(e).__name__}: {e}"[:300]) from None
        try:
            im = decode_rgb(data, max_pixels=self.max_pixels)
        except SampleError as e:
            raise RowFailure(e.reason, f"{path or 'image bytes'}: {e.detail}"[:300]) from None
        record = {"key": None, "path": ref["ref"], "sha256": hashlib.sha256(data).hexdigest()}
        return resize_uint8(im, self.input_size).tobytes(), record


def failed_slots(r: dict, stage: str, reason: str, detail: str, keep: int) -> list[dict]:
    """A request that failed after its rows were reserved: each of its `keep` rows is recorded failed."""
    key = r["key"]
    return [{**r, "idx": r["idx"] + k, "key": f"{int(key) + k:0{len(key)}d}", "error_stage": stage,
             "error_reason": reason, "error_detail": detail} for k in range(keep)]

# ----------------------------------------------------------------------------------------------------------
# Self-reflection settings (best-of-N)


@dataclass(frozen=True)
class ReflectSettings:
    """Best-of-N by self-reflection: N candidates per request, the K best kept (see tarflow/models/reflect.py)."""

    candidates: int = 1
    keep: int = 1
    question: str | None = None  # None: reflect.DEFAULT_QUESTION
    keep_all_scores: bool = False

    def __post_init__(self):
        from tarflow.models.reflect import DEFAULT_QUESTION

        if self.question is None:
            object.__setattr__(self, "question", DEFAULT_QUESTION)

    def problems(self, problems) -> None:
        from tarflow.models.reflect import PROMPT_FIELD

        problems.check(self.candidates >= 1, "--candidates", f"{self.candidates} is not a positive count",
                       "give N >= 1")
        problems.check(1 <= self.keep <= self.candidates, "--keep", f"{self.keep} is not in 1..--candidates "
                       f"({self.candidates})", "keep at most as many images as candidates are sampled")
        problems.check(PROMPT_FIELD in self.question, "--reflect-question", f"{self.question!r} has no "
                       f"{PROMPT_FIELD} field", "put {prompt} where the generation prompt goes")

    def facts(self) -> dict:
        from tarflow.models.mllm import DEFAULT_SYSTEM
        from tarflow.models.reflect import AFFIRMATIVE_WORDS, NEGATIVE_WORDS

        return {"candidates": self.candidates, "keep": self.keep, "question": self.question,
                "system": DEFAULT_SYSTEM, "answers": {"yes": list(AFFIRMATIVE_WORDS), "no": list(NEGATIVE_WORDS)},
                "candidate_seeds": "splitmix64(seed, c); c=0: seed", "keep_all_scores": self.keep_all_scores}


def reflect_table(rows: list[dict]) -> pa.Table:
    """Every candidate of every request of a shard (reflect/{shard}.parquet), to re-select without regenerating."""
    out = []
    for r in rows:
        for c in r.get("reflect_all") or []:
            out.append({"key": r["key"], "id": r["id"], "index": r["index"], "prompt": r["prompt"],
                        "scale": r["scale"], **c})
    fields = [pa.field("key", pa.string()), pa.field("id", pa.string()), pa.field("index", pa.int32()),
              pa.field("prompt", pa.string()), pa.field("scale", pa.int32())] + list(REFLECT_CANDIDATE)
    return pa.Table.from_pylist(out, schema=pa.schema(fields))


# ----------------------------------------------------------------------------------------------------------
# Stages


class T2IGenerator:
    """Actor: requests -> generated images. Holds the Tar MLLM, TA-Tok (its encoder tokenizes input images
    given as pixels, its decoder gives the de-tokenizer's condition) and the de-tokenizer: AR (+ pixel VQ) by
    default, or diffusion (SANA). A request with input images is an edit / variation: its prompt is the
    conversation Tar is trained on (models.mllm.edit_prompt_ids), the rest is T2I's."""

    def __init__(self, mllm: str, tatok: str, detok: str = "ar", ar: str | None = None, vq: str | None = None,
                 diffusion: str | None = None, sampling: dict | None = None, detok_sampling: dict | None = None,
                 dtype: str = "auto", device: str = "auto", compile: bool = False, reflect: dict | None = None):
        import torch

        from tarflow.models.device import resolve_device_dtype
        from tarflow.models.generation import BatchedDecoder, Sampling
        from tarflow.models.mllm import load_tar
        from tarflow.models.tatok import TATok

        self.torch = torch
        self.device, dt = resolve_device_dtype(device, dtype)
        device = self.device
        self.model, self.tokenizer, self.vocab = load_tar(mllm, dtype=dt, device=device)
        self.decoder = BatchedDecoder(self.model, self.vocab.pad_id, compile=compile)
        self.sampling = Sampling(**(sampling or {}))
        self.detok_sampling = {"cfg_scale": 4.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "guidance_scale": 4.0,
                               "num_inference_steps": 20, **(detok_sampling or {})}
        self.reflect = ReflectSettings(**reflect) if reflect else None
        if self.reflect:
            from tarflow.models.reflect import ReflectScorer

            self.scorer = ReflectScorer(self.model, self.tokenizer, self.vocab, self.reflect.question)
        self.tatok = TATok.from_checkpoint(tatok).to(device, dt)
        if self.tatok.codebook_size > self.vocab.num_image_tokens:
            raise ValueError(f"TA-Tok has {self.tatok.codebook_size} codes but the MLLM only "
                             f"{self.vocab.num_image_tokens} image tokens")
        self.detok = detok
        if detok == "ar":
            from tarflow.models.detokenize import ARImageDecoder
            from tarflow.models.ar_detok import ARDetokenizer
            from tarflow.models.vqvae import VQVAE

            if not ar or not vq:
                raise ValueError("the AR de-tokenizer needs --ar-detok and --vq checkpoints")
            self.images = ARImageDecoder(self.tatok, ARDetokenizer.from_checkpoint(ar).to(device, dt),
                                         VQVAE.from_checkpoint(vq).to(device))
        elif detok == "diffusion":
            from tarflow.models.diffusion_detok import DiffusionDetokenizer

            if not diffusion:
                raise ValueError("the diffusion de-tokenizer needs --diffusion-detok (a diffusers folder)")
            self.images = DiffusionDetokenizer.from_pretrained(diffusion, device=device)
        else:
            raise ValueError(f"de-tokenizer {detok!r}: choose ar or diffusion")

    def _codes(self, rows: list[dict], scale: int) -> tuple[list[list[int]], list[str]]:
        """Codes for rows with `prompt`, `seed` and `inputs` (input images' codes, None for T2I): requests, or a
        request's candidates, in one decoder batch."""
        from tarflow.models.mllm import edit_prompt_ids, parse_image_codes, t2i_prompt_ids

        n = self.tatok.num_tokens(scale)
        prompts = [edit_prompt_ids(self.tokenizer, self.vocab, r["prompt"], r["inputs"], scale) if r.get("inputs")
                   else t2i_prompt_ids(self.tokenizer, self.vocab, r["prompt"], scale) for r in rows]
        start = self.vocab.image_base_id  # only codes this TA-Tok can decode may be sampled
        out = self.decoder.generate(prompts, n, self.sampling, seeds=[r["seed"] for r in rows],
                                    allowed_range=(start, start + self.tatok.codebook_size))
        parsed = [parse_image_codes(t, self.vocab, n) for t in out.tokens]
        return [c for c, _ in parsed], [f for _, f in parsed]

    def _pixels(self, codes: list[list[int]], seeds: list[int]) -> np.ndarray:  # -> (B, H, W, 3) uint8
        torch, s = self.torch, self.detok_sampling
        c = torch.tensor(codes, dtype=torch.long, device=self.device)
        # a different stream than the MLLM's for the same seed: the two samplers must not share noise
        detok_seeds = [(x * 0x9E3779B1 + 1) % (1 << 62) for x in seeds]
        if self.detok == "ar":
            from tarflow.models.detokenize import ARSampling

            sampling = ARSampling(s["cfg_scale"], s["temperature"], s["top_k"], s["top_p"])
            tokens = self.images.vq_tokens(c, sampling, seeds=torch.tensor(detok_seeds, device=self.device))
            return self.images.vq.to_uint8(self.images.vq.decode_code(tokens)).cpu().numpy()
        rec = self.tatok.decode(c)
        return self.images.generate(rec, guidance_scale=s["guidance_scale"],
                                    num_inference_steps=s["num_inference_steps"], seed=detok_seeds)

    def _input_codes(self, rows: list[dict]) -> None:
        """`inputs` of each row: its input images' codes at its scale, from --codes or encoded here. Each image
        is encoded alone (once per block and scale), so its codes do not depend on how requests are batched."""
        torch = self.torch
        from tarflow.models.tatok import pixels_from_uint8

        S, cache = self.tatok.input_size, {}
        for r in rows:
            if not r.get("input_codes"):
                r["inputs"] = None
                continue
            r["inputs"] = []
            for codes, px, rec in zip(r["input_codes"], r["input_pixels"], r["input_images"]):
                if codes is None:
                    k = (rec["sha256"], r["scale"])
                    if k not in cache:
                        x = torch.frombuffer(bytearray(px), dtype=torch.uint8).view(1, S, S, 3).to(self.device)
                        cache[k] = self.tatok.encode(pixels_from_uint8(x), r["scale"])[0].tolist()
                    codes = cache[k]
                r["inputs"].append(codes)

    @guarded("generate", GENERATED_ROWS)
    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for r in rows:
            r.update(ok=False, codes=None, codes_fix=None, width=None, height=None, pixels=None)
        todo = [r for r in rows if r["kind"] == "sample" and r["error_reason"] is None]
        self._input_codes(todo)
        if self.reflect:
            todo_ids = {id(r) for r in todo}
            rows = [r for r in rows if id(r) not in todo_ids]
            for scale in sorted({r["scale"] for r in todo}):
                rows += self._best_of_n([r for r in todo if r["scale"] == scale], scale)
            return pa.Table.from_pylist(rows, schema=GENERATED_ROWS)
        for scale in sorted({r["scale"] for r in todo}):
            group = [r for r in todo if r["scale"] == scale]
            codes, fixes = self._codes(group, scale)
            pixels = self._pixels(codes, [r["seed"] for r in group])
            for r, c, f, px in zip(group, codes, fixes, pixels):
                r.update(ok=True, codes=c, codes_fix=f, height=px.shape[0], width=px.shape[1],
                         pixels=np.ascontiguousarray(px, dtype=np.uint8).tobytes())
        return pa.Table.from_pylist(rows, schema=GENERATED_ROWS)

    def _best_of_n(self, group: list[dict], scale: int) -> list[dict]:
        """Requests at one scale -> their K best of N candidates each, as K rows per request (idx, idx + 1, ...).

        All candidates of the group are sampled in one decoder batch and scored in batched forwards; only the
        kept ones are de-tokenized."""
        from tarflow.models.reflect import candidate_seed, rank_candidates

        N, K = self.reflect.candidates, self.reflect.keep
        cands = [{"prompt": r["prompt"], "inputs": r.get("inputs"), "seed": candidate_seed(r["seed"], c)}
                 for r in group for c in range(N)]
        codes, fixes = self._codes(cands, scale)
        # the judge reads the image made and the question, which names the prompt (for an edit: the instruction)
        scored = self.scorer.score([c["prompt"] or "" for c in cands], codes)
        out, kept = [], []  # kept[i]: the index into cands of out[i]
        for q, r in enumerate(group):
            scores = scored.scores[q * N:(q + 1) * N]
            order = rank_candidates(scores)
            tokens = sum(scored.lengths[q * N:(q + 1) * N])
            rank_of = {c: k for k, c in enumerate(order)}
            every = [{"candidate": c, "seed": cands[q * N + c]["seed"], "codes": codes[q * N + c],
                      "codes_fix": fixes[q * N + c], "score": scores[c], "rank": rank_of[c], "kept": rank_of[c] < K}
                     for c in range(N)]
            for k, c in enumerate(order[:K]):
                j = q * N + c
                row = {**r, "idx": r["idx"] + k, "key": f"{int(r['key']) + k:0{len(r['key'])}d}",
                       "seed": cands[j]["seed"], "codes": codes[j], "codes_fix": fixes[j], "reflect_score": scores[c],
                       "reflect_rank": k, "reflect_candidate": c, "candidates": N}
                if k == 0:  # the request's share of the scoring cost, and every candidate, once
                    row.update(reflect_tokens=tokens, reflect_all=every,
                               reflect_seconds=scored.seconds * tokens / max(scored.tokens, 1))
                out.append(row)
                kept.append(j)
        pixels = self._pixels([codes[j] for j in kept], [cands[j]["seed"] for j in kept])
        for row, px in zip(out, pixels):
            row.update(ok=True, height=px.shape[0], width=px.shape[1],
                       pixels=np.ascontiguousarray(px, dtype=np.uint8).tobytes())
        return out


class ImageEncoder:
    """CPU stage: raw uint8 pixels -> PNG or JPEG bytes."""

    def __init__(self, image_format: str = "png", quality: int = 95):
        self.image_format, self.quality = image_format, quality

    @guarded("encode_image", GENERATE_ENCODED_ROWS)
    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        rows = batch.to_pylist()
        for r in rows:
            px = r.pop("pixels")
            r["image"] = None
            if r["ok"]:
                im = Image.fromarray(np.frombuffer(px, np.uint8).reshape(r["height"], r["width"], 3))
                buf = io.BytesIO()
                if self.image_format == "png":
                    im.save(buf, format="PNG")
                else:
                    im.save(buf, format="JPEG", quality=self.quality)
                r["image"] = buf.getvalue()
        return pa.Table.from_pylist(rows, schema=GENERATE_ENCODED_ROWS)


# ----------------------------------------------------------------------------------------------------------
# Config, writer, job


@dataclass
class GenerateConfig:
    prompts: str
    output: str
    mllm: str
    tatok: str
    detok: str = "ar"
    ar_detok: str | None = None
    vq: str | None = None
    diffusion_detok: str | None = None
    scale: int = 1
    seed: int = 0
    n: int = 1
    samples_per_shard: int = 1000
    image_format: str = "png"
    temperature: float = 1.0  # the reference's T2I sampling
    top_k: int = 1200
    top_p: float = 0.95
    cfg_scale: float = 4.0  # AR de-tokenizer CFG
    detok_temperature: float = 1.0
    detok_top_k: int = 0
    detok_top_p: float = 1.0
    guidance_scale: float = 4.0  # diffusion de-tokenizer
    num_inference_steps: int = 20
    overwrite: bool = False
    batch_size: int | None = None  # default: 32 on GPU, 4 on CPU
    num_workers: int | None = None  # most generator actors; default: every GPU the cluster has or can add
    min_workers: int = 1
    max_writers: int = 8
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    progress_every_s: float = 10.0
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S  # no rows for this long, the cluster not growing: stop
    codes: list[str] | None = None  # code shards (either kind) whose rows input images may name by key
    # self-reflection (best-of-N): off unless reflect
    reflect: bool = False
    candidates: int = 1
    keep: int = 1
    reflect_question: str | None = None  # None: tarflow.models.reflect.DEFAULT_QUESTION
    keep_all_scores: bool = False

    @property
    def reflect_settings(self) -> ReflectSettings | None:
        return (ReflectSettings(self.candidates, self.keep, self.reflect_question, self.keep_all_scores)
                if self.reflect else None)

    def reflect_problems(self, problems) -> None:
        """Adds what is wrong with the reflect settings to `problems` (tarflow.preflight.Problems)."""
        problems.check(self.reflect or (self.candidates == 1 and self.keep == 1 and not self.keep_all_scores),
                       "--candidates/--keep/--keep-all-scores", "best-of-N needs the scores",
                       "add --reflect (or drop these flags)")
        if self.reflect:
            self.reflect_settings.problems(problems)

    def input_problems(self, problems) -> None:
        """Adds what is wrong with the prompt table's columns and the --codes shards to `problems`: read from
        footers and first blocks only."""
        try:
            prompt_table_schema(self.prompts)
        except PromptTableError as e:
            problems.add(f"--prompts {self.prompts}", str(e).removeprefix(f"prompt table {self.prompts} "),
                         "columns: " + ", ".join(schema.PROMPT_TABLE_COLUMNS))
        if not self.codes:
            return
        try:
            first = resolve_code_shards(self.codes)[0].path
            fs, p = storage.filesystem(first)
            with fs.open(p, "rb") as f:
                import pyarrow.parquet as pq

                meta = schema.check_any_code_shard(pq.read_schema(f), first)
        except (FileNotFoundError, ValueError, OSError) as e:
            problems.add(f"--codes {' '.join(self.codes)}", str(e), "give the tokenize job's output or code shards")
            return
        if self.tatok and storage.exists(self.tatok):
            problems.check(meta["model"]["sha256"] == storage.sha256(self.tatok), f"--codes {first}",
                           "was tokenized by another TA-Tok than --tatok (their codes are other images)",
                           "give the --tatok the code shards were made with, or tokenize the images again")

    def check(self) -> None:
        """The settings checks run_generate makes itself (UsageError: one line per problem); jobs/generate.py
        adds reflect_problems to its checks before Ray starts."""
        from tarflow.preflight import Problems

        problems = Problems()
        self.reflect_problems(problems)
        problems.raise_if_any()

    @property
    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "greedy": False}

    @property
    def detok_sampling(self) -> dict:
        if self.detok == "ar":
            return {"cfg_scale": self.cfg_scale, "temperature": self.detok_temperature, "top_k": self.detok_top_k,
                    "top_p": self.detok_top_p}
        return {"guidance_scale": self.guidance_scale, "num_inference_steps": self.num_inference_steps}

    def detokenizer_id(self) -> dict:
        """Where the models were read from (manifest `sources`, the .json of each image)."""
        return ({"kind": "ar", "tatok": self.tatok, "ar": self.ar_detok, "vq": self.vq} if self.detok == "ar"
                else {"kind": "diffusion", "tatok": self.tatok, "folder": self.diffusion_detok})

    def model_identities(self) -> dict:
        """The models by content: a moved model is the same one, one replaced at the same path another."""
        detok = ({"kind": "ar", "tatok": file_identity(self.tatok), "ar": file_identity(self.ar_detok),
                  "vq": file_identity(self.vq)} if self.detok == "ar" else
                 {"kind": "diffusion", "tatok": file_identity(self.tatok),
                  "folder": folder_identity(self.diffusion_detok)})
        return {"mllm": folder_identity(self.mllm), "detokenizer": detok}

    def facts(self, identities: dict) -> dict:
        return {**identities, "sampling": self.sampling, "detok_sampling": self.detok_sampling,
                "image_format": self.image_format, "defaults": {"scale": self.scale, "seed": self.seed, "n": self.n},
                "samples_per_shard": self.samples_per_shard,
                # None when off: outputs made before self-reflection existed have no such key, and match
                "reflect": self.reflect_settings.facts() if self.reflect else None}


def generate_layout(output: str, keep_all_scores: bool = False) -> ShardLayout:
    files = (("tar", "{shard}.tar"), ("parquet", "{shard}.parquet"), ("stats", "{shard}_stats.json"),
             ("errors", f"{schema.ERRORS_DIR}/{{shard}}.parquet"))
    if keep_all_scores:
        files += (("reflect", "reflect/{shard}.parquet"),)
    return ShardLayout(output, files, schema.GENERATE_MANIFEST_FORMAT, schema.GENERATE_MANIFEST_VERSION)


class GeneratedShardWriter:
    """Writes a shard in img2dataset's layout (runs in a finalize task); `_stats.json` after the tar and
    parquet (img2dataset's own completion marker), then errors/; the core writes the manifest last."""

    streams_parts = True  # its finalize task hands it the rows a part at a time (sharded.ShardParts)

    def __init__(self, cfg: GenerateConfig):
        import tarflow

        self.cfg, self.version = cfg, tarflow.__version__

    def _meta(self, r: dict) -> dict:
        # rows with input images also say what they were made from; T2I rows are as they always were
        inputs = {"instruction": r["prompt"], "input_images": r["input_images"]} if r.get("input_images") else {}
        return {"key": r["key"], "id": r["id"], "index": r["index"], "prompt": r["prompt"], "seed": r["seed"],
                "scale": r["scale"], "width": r["width"], "height": r["height"],
                "status": "success" if r["ok"] else "failed_to_generate", "mllm": self.cfg.mllm,
                "detokenizer": self.cfg.detokenizer_id(), "sampling": self.cfg.sampling,
                "detok_sampling": self.cfg.detok_sampling, "codes": r["codes"], "codes_fix": r["codes_fix"],
                "error_message": r["error_detail"]} | inputs | (self._reflect_meta(r) if self.cfg.reflect else {})

    @staticmethod
    def _reflect_meta(r: dict) -> dict:
        return {"reflect_score": r["reflect_score"], "reflect_rank": r["reflect_rank"],
                "reflect_candidate": r["reflect_candidate"], "candidates": r["candidates"]}

    def __call__(self, name: str, rows: ShardParts | pa.Table, end: dict, paths: dict) -> ShardWritten:
        """`rows`: the shard's rows in index order, one part at a time (or one table). Each part's images go
        straight into the tar file (webdataset's TarWriter, streaming to storage.open_atomic), so that one part's
        images are all this task holds; what is kept for {shard}.parquet and the totals has no pixels."""
        from webdataset.writer import TarWriter

        ext = "png" if self.cfg.image_format == "png" else "jpg"
        files = ShardFiles(name, paths)
        meta_rows, fixes, reflected = [], Counter(), []
        with storage.open_atomic(paths["tar"]) as f:
            # member headers as tarfile's defaults (no user or group names), mtime 0: reruns give the same bytes
            with TarWriter(f, user="", group="", mode=0o444, mtime=0, encoder=False) as tar:
                for part in [rows] if isinstance(rows, pa.Table) else rows:
                    for r in part.to_pylist():
                        meta = self._meta(r)
                        meta_rows.append({k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
                                          for k, v in meta.items()})
                        if r["ok"]:  # TarWriter writes a sample's members sorted by extension, as img2dataset does
                            tar.write({"__key__": r["key"], ext: r["image"], "txt": (r["prompt"] or "").encode(),
                                       "json": json.dumps(meta, indent=4).encode()})
                    ok = files.add(part.drop_columns(["image"]))
                    fixes.update(ok.column("codes_fix").to_pylist())
                    if self.cfg.reflect:
                        reflected.append(ok.select(self._reflect_columns()))
            tar_bytes = f.tell()
        files.wrote("tar", tar_bytes)
        meta_bytes = 0
        if meta_rows:
            meta_bytes = len(data := parquet_bytes(pa.Table.from_pylist(meta_rows)))
            storage.write_bytes_atomic(paths["parquet"], data)
        files.wrote("parquet", meta_bytes)
        failed = files.samples_in - files.ok
        stats = {"count": files.samples_in, "successes": files.ok, "failed_to_generate": failed,
                 "status_dict": {"success": files.ok, **files.reasons}, "tarflow_version": self.version}
        storage.write_bytes_atomic(paths["stats"], json.dumps(stats, indent=4).encode())
        totals = {f"codes_{k}": v for k, v in fixes.items() if k != "ok"}
        if self.cfg.reflect:
            ok = pa.concat_tables(reflected) if reflected else GENERATE_ENCODED_ROWS.empty_table().select(
                self._reflect_columns())
            totals = self._write_reflect(files, ok, totals)
        return files.done(totals)

    def _reflect_columns(self) -> list[str]:
        """What _write_reflect reads of the good rows (every candidate's codes only for reflect/{shard}.parquet)."""
        return (["reflect_tokens", "reflect_seconds", "reflect_rank"]
                + (["key", "id", "index", "prompt", "scale", "reflect_all"] if self.cfg.keep_all_scores else []))

    def _write_reflect(self, files: ShardFiles, ok: pa.Table, totals: dict) -> dict:
        """The scoring cost as totals (the summary sums them), and reflect/{shard}.parquet if asked for."""
        cols = ok.select(["reflect_tokens", "reflect_seconds", "reflect_rank"]).to_pydict()
        firsts = [i for i, k in enumerate(cols["reflect_rank"]) if k == 0]
        totals = {**totals, "reflect_requests": len(firsts),
                  "reflect_candidates_scored": len(firsts) * self.cfg.candidates,
                  "reflect_tokens_scored": sum(cols["reflect_tokens"][i] or 0 for i in firsts),
                  "reflect_seconds": round(sum(cols["reflect_seconds"][i] or 0.0 for i in firsts), 6)}
        if self.cfg.keep_all_scores:
            firsts_table = reflect_table(ok.filter(pc.equal(ok.column("reflect_rank"), 0)).to_pylist())
            files.write_parquet("reflect", firsts_table, rows=False)
        return totals


def _for_workers(path: str) -> str:
    """A path as tasks on any worker read it: local paths absolute (a worker's working directory is not the
    driver's)."""
    import os

    return path if storage.is_remote(path) else os.path.abspath(path)


def run_generate(cfg: GenerateConfig, generator_cls=T2IGenerator) -> JobSummary:
    """The driver holds the prompt table's row-group counts and one descriptor per output shard, never its rows:
    a task indexes the table, tasks read each shard's row groups."""
    import ray
    import ray.data

    from tarflow.models.tatok import resolve_teacher, tatok_header

    t0 = time.time()
    cfg.check()
    table_sha = storage.sha256(cfg.prompts)
    prompt_table_schema(cfg.prompts)
    prompts = _for_workers(cfg.prompts)
    tatok_args, grid = tatok_header(cfg.tatok)
    input_size = resolve_teacher(tatok_args.teacher, cfg.tatok).image_size
    keep = cfg.keep if cfg.reflect else 1
    defaults = RequestDefaults(cfg.scale, cfg.seed, cfg.n, frozenset({1, 2, 3} & set(range(1, grid + 1))))
    staged = storage.join(cfg.output, PROMPTS_DIR, f"{table_sha[:16]}.parquet")
    indexer = ray.remote(num_cpus=0.25, max_retries=2, retry_exceptions=[OSError])(index_prompt_table)
    try:
        index = ray.get(indexer.remote(prompts, staged, defaults))
    except ray.exceptions.RayTaskError as e:
        if isinstance(getattr(e, "cause", None), PromptTableError):
            raise e.cause from None
        raise
    shards = {d["name"]: d for d in plan_output_shards(index["groups"], cfg.samples_per_shard, keep)}
    codes = [(c.name, _for_workers(c.path)) for c in resolve_code_shards(cfg.codes)] if cfg.codes else None
    facts = cfg.facts(cfg.model_identities())
    layout = generate_layout(cfg.output, cfg.reflect and cfg.keep_all_scores)
    plan = plan_shards(layout, shards, facts, lambda n, m: m.get("input", {}).get("sha256") == table_sha,
                       cfg.overwrite)
    summary = JobSummary(job="generate", unit="images", shards_total=len(shards), shards_skipped=len(plan.done),
                         output=cfg.output, plan_seconds=plan.seconds)
    log.info("%d requests (%d prompt table rows) in %d shards: %d to do, %d already done",
             sum(d["take"] for d in shards.values()), sum(r for r, _ in index["groups"]), len(shards),
             len(plan.todo), len(plan.done))
    if plan.todo:
        pool = plan_pool(cfg.device, cfg.gpus_per_worker, cfg.min_workers, cfg.num_workers)
        check_pool_leaves_cpus(pool, cfg.cpus_per_worker, 0.5, "--min-workers", "--cpus-per-worker")
        block = cfg.batch_size or (32 if pool.gpus_per_worker else 4)  # blocks of one batch spread over the pool

        def stages(names: list[str], parts_dir: str):
            ds = ray.data.from_items([shards[n] for n in names], override_num_blocks=len(names))
            ds = ds.map_batches(PromptShardReader(index["path"], defaults, key_digits(cfg.samples_per_shard, keep),
                                                  keep, block), batch_size=1, batch_format="pyarrow", num_cpus=0.25)
            ds = ds.map_batches(InputImageLoader(input_size, storage.dirname(prompts), codes, keep),
                                batch_size=None, batch_format="pyarrow", num_cpus=0.5)
            ds = ds.map_batches(generator_cls, fn_constructor_kwargs=dict(
                mllm=cfg.mllm, tatok=cfg.tatok, detok=cfg.detok, ar=cfg.ar_detok, vq=cfg.vq,
                diffusion=cfg.diffusion_detok, sampling=cfg.sampling, detok_sampling=cfg.detok_sampling,
                dtype=cfg.dtype, device=cfg.device, compile=cfg.compile,
                reflect=vars(cfg.reflect_settings) if cfg.reflect else None), batch_size=block, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(min_size=pool.min_workers, max_size=pool.max_workers),
                num_gpus=pool.gpus_per_worker, num_cpus=cfg.cpus_per_worker)
            ds = ds.map_batches(ImageEncoder(cfg.image_format), batch_size=None, batch_format="pyarrow", num_cpus=0.5)
            return ds.map_batches(PartWriter(parts_dir), batch_size=None, batch_format="pyarrow", num_cpus=0.25)

        spec = ShardJob(job="generate", layout=layout, facts=facts, sources=cfg.detokenizer_id() | {"mllm": cfg.mllm},
                        writer=GeneratedShardWriter(cfg), schema_versions={"errors": schema.ERRORS_VERSION})
        inputs = {n: {"prompts": cfg.prompts, "sha256": table_sha} for n in plan.todo}
        run_sharded(spec, inputs, stages, summary, t0, cfg.max_writers, cfg.progress_every_s,
                    stall_timeout_s=cfg.stall_timeout_s)
    if summary.extra.get("reflect_seconds"):  # per generator actor: the shards' scoring times add up
        summary.extra["reflect_tokens_scored_per_s"] = round(
            summary.extra["reflect_tokens_scored"] / summary.extra["reflect_seconds"], 1)
        summary.extra["reflect_candidates_scored_per_s"] = round(
            summary.extra["reflect_candidates_scored"] / summary.extra["reflect_seconds"], 2)
    summary.seconds = time.time() - t0
    return summary
