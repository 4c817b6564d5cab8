"""Driver-side checks of code shards before a trainer starts: the files a --data names (`code_shard_files`),
every file's Parquet footer read in parallel (`read_footers`: columns, rows, tarflow metadata, nothing else),
and one TA-Tok for all of them (`check_one_tatok`)."""
from __future__ import annotations

from dataclasses import dataclass

from tarflow.data import storage


def code_shard_files(specs: list[str], problems, flag: str = "--data", parquet_files: bool = False) -> list[str]:
    """The code shard files of each spec (a tokenize output: its finished shards; a folder of code shards; shard
    files), one problem line per spec that holds none. With `parquet_files`, a Parquet file is taken as it is
    (a conversation table made elsewhere: the MLLM trainer reads those too)."""
    from tarflow.data.codeshard import resolve_code_shards

    holds, fix = (("Parquet files", "folders of code shards or Parquet files") if parquet_files else
                  ("code shards", "a folder of code shards or shard files"))
    files = []
    for spec in specs:
        if parquet_files and spec.endswith(".parquet") and storage.exists(spec):
            files.append(spec)
            continue
        try:
            files += [c.path for c in resolve_code_shards(spec)]
        except FileNotFoundError:
            problems.add(f"{flag} {spec}", f"not found, or holds no {holds}",
                         f"give the tokenize job's output folder, {fix}")
    return files


@dataclass
class Footer:
    path: str
    columns: list[str]
    num_rows: int
    meta: dict | None  # a code shard's metadata (tarflow.data.schema); None for a Parquet file without it
    error: str | None = None  # why the footer does not read, or why the code shard's metadata is wrong


def read_footers(files: list[str], check=None) -> list[Footer]:
    """Every file's Parquet footer (columns, rows, tarflow metadata), read in parallel: many shards on S3 want
    parallel reads, and nothing but the footers is read. `check(arrow_schema, path)` checks the tarflow metadata
    (default: a code shard's, schema.check_code_shard)."""
    from concurrent.futures import ThreadPoolExecutor

    def read(path: str) -> Footer:
        import pyarrow.parquet as pq

        from tarflow.data import schema

        try:
            fs, p = storage.filesystem(path)
            with fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                arrow_schema, num_rows = pf.schema_arrow, pf.metadata.num_rows
        except Exception as e:  # pyarrow and fsspec raise many kinds; all mean an unreadable file
            return Footer(path, [], 0, None, f"not a readable Parquet file ({type(e).__name__}: {e})")
        columns = list(arrow_schema.names)
        if (arrow_schema.metadata or {}).get(schema.PARQUET_META_KEY) is None:
            return Footer(path, columns, num_rows, None)
        try:
            return Footer(path, columns, num_rows, (check or schema.check_code_shard)(arrow_schema, path))
        except (schema.SchemaError, KeyError, TypeError) as e:
            return Footer(path, columns, num_rows, None, str(e).removeprefix(f"{path}: "))

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(read, files))


def check_one_tatok(footers: list[Footer], problems, expected: tuple[str, str] | None = None) -> str | None:
    """Every code shard must come from one TA-Tok (by sha256): codes of two tokenizers mean different things.
    `expected`: (sha256, the flag and path naming it) when a TA-Tok is given, else the most common one is taken
    as the data's. Offenders are listed on one line. Returns the data's TA-Tok sha256 (None without shards)."""
    shas = [f.meta["model"]["sha256"] for f in footers if f.meta]
    if not shas:
        return None
    ref = expected[0] if expected else max(sorted(set(shas)), key=shas.count)
    odd = [f for f in footers if f.meta and f.meta["model"]["sha256"] != ref]
    if odd:
        named = ", ".join(f"{f.path} ({f.meta['model']['sha256'][:12]})" for f in odd[:5])
        more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
        against = f"{expected[1]} (sha256 {ref[:12]})" if expected else \
            f"the other {len(shas) - len(odd)} shards' TA-Tok (sha256 {ref[:12]})"
        problems.add("--data", f"{len(odd)} of {len(shas)} code shards were tokenized by another TA-Tok than "
                               f"{against}: {named}{more}",
                     "train on shards of one TA-Tok: leave these out or tokenize them again with it"
                     + (" (or pass the TA-Tok that made them)" if expected else ""))
    return ref
