"""The caption job: TA-Tok code shards -> captions (answers) from the Tar MLLM, on Ray Data.

    code shards --CodeShardReader (tasks: one scale column, plus a conversation shard's question/turns)
                --Captioner (GPU actor pool: prompts, batched decoding, one static KV cache per batch)
                --PartWriter --> finalize tasks: CaptionShardWriter (captions/: the answers joined to every
                  input column of the code shard, errors/), then _manifest/

Code shards of either kind: image-text pairs (one image, the run's --question, the reference's I2T prompt) or
conversation code shards (any number of images per row; the row's own `question`, else its `conversations`
whose last turn is the human's, answered as the gpt turn appended; models.mllm.conversation_prompt_ids).
Images are never decoded again: the codes stored by the tokenize job are the image. Resumable like the
tokenize job: finished shards (manifest present, same settings) are skipped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from tarflow.data import schema, storage
from tarflow.data.codeshard import CodeShard, resolve_code_shards
from tarflow.data.schema import CAPTION_CODES_ROWS, CAPTIONED_ROWS
from tarflow.data.shards import ShardFiles, ShardLayout, ShardWritten, folder_identity
from tarflow.pipelines.sharded import (DEFAULT_STALL_TIMEOUT_S, JobSummary, PartWriter, ShardJob,
                                       end_row, check_pool_leaves_cpus, failed_row, guarded,
                                       plan_pool, plan_shards, read_failure_reason, rows_table, run_sharded)

log = logging.getLogger("tarflow.caption")

DEFAULT_QUESTION = "Describe the image shortly."  # the reference's I2T example



class CodeShardReader:
    """Code shard descriptions -> one row per sample with the chosen scale's codes, then an end row."""

    def __init__(self, column: str, chunk_size: int = 256):
        self.column, self.chunk_size = column, chunk_size

    def __call__(self, batch: pa.Table):
        for d in batch.to_pylist():
            try:
                yield from self._read(d)
            except Exception as e:  # noqa: BLE001 - one bad shard must not stop the others
                log.warning("code shard %s failed while reading: %s: %s", d["path"], type(e).__name__, e)
                yield rows_table([failed_row(d["name"], read_failure_reason(e),
                                             f"{d['path']}: {type(e).__name__}: {e}", e)], CAPTION_CODES_ROWS)

    def _read(self, d: dict):
        from tarflow.data.retrying_file import RetryingFile

        with RetryingFile(d["path"]) as f:  # transient read errors retried, as for img2dataset shards
            pf = pq.ParquetFile(f)
            meta = schema.check_any_code_shard(pf.schema_arrow, d["path"])
            if self.column not in pf.schema_arrow.names:
                raise ValueError(f"{d['path']}: no column {self.column!r} (has "
                                 f"{[n for n in pf.schema_arrow.names if n.startswith('tatok_s')]}); choose "
                                 "another --scale or tokenize at this scale")
            conversation = schema.is_conversation_shard(meta)
            extra = [c for c in ("conversations", "question") if conversation and c in pf.schema_arrow.names]
            n = 0
            for rb in pf.iter_batches(batch_size=self.chunk_size, columns=["key", self.column, *extra]):
                keys = rb.column(0).to_pylist()
                codes = rb.column(1)
                images = (codes.cast(pa.list_(pa.list_(pa.int32()))) if conversation else
                          pa.ListArray.from_arrays(pa.array(range(len(keys) + 1), pa.int32()),
                                                   codes.cast(pa.list_(pa.int32()))))
                cols = {"shard": [d["name"]] * len(keys), "idx": list(range(n, n + len(keys))), "key": keys,
                        "kind": ["sample"] * len(keys)}
                if "conversations" in extra:
                    cols["turns"] = [None if c is None else json.dumps(conversation_turns(c))
                                     for c in rb.column(extra.index("conversations") + 2).to_pylist()]
                if "question" in extra:
                    cols["question"] = [q if isinstance(q, str) and q.strip() else None
                                        for q in rb.column(extra.index("question") + 2).to_pylist()]
                yield _with_schema(cols, images, CAPTION_CODES_ROWS)
                n += len(keys)
        # the writer joins the answers to the input's columns: it reads the shard again, by row
        yield pa.Table.from_pylist([end_row(d["name"], n, source=d["path"])], schema=CAPTION_CODES_ROWS)


def conversation_turns(value) -> list[list]:
    """A `conversations` cell (list of {from, value}, or its JSON text) -> [[from, value], ...]."""
    turns = json.loads(value) if isinstance(value, str) else value
    return [[t.get("from"), t.get("value")] for t in turns]


def _with_schema(cols: dict, codes: pa.Array, row_schema: pa.Schema) -> pa.Table:
    n = len(codes)
    arrays = []
    for f in row_schema:
        if f.name == "images":
            arrays.append(codes)
        elif f.name in cols:
            arrays.append(pa.array(cols[f.name], f.type))
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=row_schema)


def row_seed(seed: int, key: str) -> int:
    """A per-sample seed from the job seed and the sample key: same caption for a key however it is batched."""
    return (seed * 1_000_003 + int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "big")) % (1 << 62)


class Captioner:
    """Actor: code rows -> caption rows. Loads the Tar MLLM once; builds I2T prompts; decodes the batch."""

    def __init__(self, model: str, question: str = DEFAULT_QUESTION, max_new_tokens: int = 256,
                 sampling: dict | None = None, seed: int = 0, dtype: str = "auto", device: str = "auto",
                 compile: bool = False, scale: int = 1):
        from tarflow.models.device import resolve_device_dtype
        from tarflow.models.generation import BatchedDecoder, Sampling
        from tarflow.models.mllm import load_tar

        device, dtype = resolve_device_dtype(device, dtype)
        self.model, self.tokenizer, self.vocab = load_tar(model, dtype=dtype, device=device)
        self.decoder = BatchedDecoder(self.model, self.vocab.pad_id, compile=compile)
        self.sampling = Sampling(**(sampling or {"greedy": True}))
        self.question, self.max_new_tokens, self.seed = question, max_new_tokens, seed
        self.scale = scale  # images the model wrote in a conversation are re-read as <im_start><S{scale-1}>...

    def _prompt(self, r: dict) -> tuple[list[int], str]:
        """(prompt ids, the question as text) of a row; ConversationError with the reason of a bad row."""
        from tarflow.models.mllm import (ConversationError, conversation_prompt_ids, i2t_prompt_ids,
                                         instruction_turn)

        images = r["images"] or []
        for k, codes in enumerate(images):
            side = int(len(codes) ** 0.5)
            if not codes or side * side != len(codes) or max(codes) >= self.vocab.num_image_tokens or min(codes) < 0:
                raise ConversationError("bad_codes", f"image {k}: {len(codes)} codes, range "
                                        f"[{min(codes, default=0)}, {max(codes, default=0)}]")
        if r["turns"] is None and r["question"] is None:  # an image-text shard: the reference's I2T prompt
            if len(images) != 1:
                raise ConversationError("bad_codes", f"{len(images)} images where one was expected")
            return i2t_prompt_ids(self.tokenizer, self.vocab, images[0], self.question), self.question
        if r["question"] is not None:
            question = r["question"]
            turns = [("human", instruction_turn(question, len(images)))]
        else:
            turns = [tuple(t) for t in json.loads(r["turns"])]
            if not turns or turns[-1][0] not in ("human", "user"):
                raise ConversationError("last_turn_not_human", f"{len(turns)} turns, the last from "
                                        f"{turns[-1][0] if turns else None!r}: there is no question to answer")
            question = turns[-1][1] or ""
        return conversation_prompt_ids(self.tokenizer, self.vocab, turns, images, self.scale), question

    @guarded("caption", CAPTIONED_ROWS)
    def __call__(self, batch: pa.Table) -> pa.Table:
        from tarflow.models.mllm import ConversationError

        rows = batch.to_pylist()
        prompts, questions, todo = [], [], []
        for i, r in enumerate(rows):
            r.update(ok=False, prompt=None, caption=None, prompt_tokens=None, caption_tokens=None, finished=None)
            if r["kind"] != "sample":
                continue
            try:
                ids, question = self._prompt(r)
            except ConversationError as e:
                r.update(error_stage="caption", error_reason=e.reason, error_detail=e.detail)
                continue
            prompts.append(ids)
            questions.append(question)
            todo.append(i)
        if todo:
            order = sorted(range(len(todo)), key=lambda j: len(prompts[j]))  # similar lengths pad less
            seeds = None if self.sampling.greedy else [row_seed(self.seed, rows[todo[j]]["key"]) for j in order]
            out = self.decoder.generate([prompts[j] for j in order], self.max_new_tokens, self.sampling,
                                        seeds=seeds, stop_ids=(self.vocab.eos_id,))
            for j, toks, stopped in zip(order, out.tokens, out.stopped):
                r = rows[todo[j]]
                r.update(ok=True, prompt=questions[j], prompt_tokens=len(prompts[j]), caption_tokens=len(toks),
                         finished=stopped,
                         caption=self.tokenizer.decode(toks, skip_special_tokens=True).strip())
        return pa.Table.from_pylist(rows, schema=CAPTIONED_ROWS)


@dataclass
class CaptionConfig:
    input: str | list[str]
    output: str
    model: str
    scale: int = 1
    question: str = DEFAULT_QUESTION
    max_new_tokens: int = 256
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    overwrite: bool = False
    batch_size: int | None = None  # default: 64 on GPU, 8 on CPU
    num_workers: int | None = None  # most MLLM actors; default: every GPU the cluster has or can add, 1 on CPU
    min_workers: int = 1
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    max_shards: int | None = None
    max_writers: int = 8
    progress_every_s: float = 10.0
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S  # no rows for this long, the cluster not growing: stop
    sampling: dict = field(init=False)

    def __post_init__(self):
        self.sampling = {"greedy": self.greedy, "temperature": self.temperature, "top_k": self.top_k,
                         "top_p": self.top_p}

    def facts(self, model_identity: dict) -> dict:
        """What determines the captions: a rerun with other facts must not mix outputs. The model by content
        (a moved folder is the same model, one replaced at the same path another)."""
        return {"model": model_identity, "scale": self.scale, "question": self.question,
                "max_new_tokens": self.max_new_tokens, "sampling": {**self.sampling, "seed": self.seed}}


def caption_layout(output: str) -> ShardLayout:
    return ShardLayout(output, (("captions", f"{schema.CAPTIONS_DIR}/{{shard}}.parquet"),
                                ("errors", f"{schema.ERRORS_DIR}/{{shard}}.parquet")),
                       schema.CAPTION_MANIFEST_FORMAT, schema.CAPTION_MANIFEST_VERSION)


class CaptionShardWriter:
    """The caption job's writer (runs in a finalize task): captions/ (the answers, then every column of the
    input code shard, read again here: schema.captions_schema) and errors/ of one shard."""

    def __init__(self, cfg: CaptionConfig, facts: dict):
        import tarflow

        self.model = cfg.model
        self.sampling = json.dumps(facts["sampling"], sort_keys=True)
        self.meta = {**facts, "tarflow_version": tarflow.__version__}

    def __call__(self, shard: str, rows: pa.Table, end: dict, paths: dict) -> ShardWritten:
        import pyarrow.compute as pc

        files = ShardFiles(shard, paths)
        ok = files.add(rows)
        n = len(ok)
        fs, p = storage.filesystem(end["source"])
        with fs.open(p, "rb") as f:
            source = pq.read_table(f).take(ok.column("idx"))
        if source.column("key").to_pylist() != ok.column("key").to_pylist():
            raise RuntimeError(f"{end['source']} changed while it was captioned (its keys differ); rerun")
        columns = {
            "key": ok.column("key"), "prompt": ok.column("prompt"), "caption": ok.column("caption"),
            "model": pa.array([self.model] * n, pa.string()),
            "sampling": pa.array([self.sampling] * n, pa.string()),
            "prompt_tokens": ok.column("prompt_tokens"), "caption_tokens": ok.column("caption_tokens"),
            "finished": ok.column("finished"),
        }
        out_schema = schema.captions_schema(source.schema)
        answers = ok.column("caption").to_pylist()
        for name in source.column_names:
            if name != "key":
                column = source.column(name)
                columns[out_schema.names[len(columns)]] = (with_answers(column, answers)
                                                           if name == "conversations" else column)
        captions = pa.table(columns).cast(schema.with_metadata(out_schema, schema.CAPTIONS_FORMAT,
                                                               schema.CAPTIONS_VERSION, self.meta))
        files.write_parquet("captions", captions)
        generated = int(pc.sum(ok.column("caption_tokens")).as_py() or 0)
        unfinished = int(pc.sum(pc.invert(ok.column("finished")).cast(pa.int64())).as_py() or 0)
        return files.done({"caption_tokens": generated, "cut_at_max_new_tokens": unfinished})


def with_answers(conversations: pa.ChunkedArray, answers: list[str]) -> pa.Array:
    """`conversations` (list of {from, value} structs, or their JSON text) with each row's answer appended as
    the gpt turn."""
    out = []
    for turns, answer in zip(conversations.to_pylist(), answers):
        if isinstance(turns, str):
            out.append(json.dumps(json.loads(turns) + [{"from": "gpt", "value": answer}]))
        else:
            fields = conversations.type.value_type.names
            out.append((turns or []) + [{k: {"from": "gpt", "value": answer}.get(k) for k in fields}])
    return pa.array(out, conversations.type)


def run_caption(cfg: CaptionConfig, captioner_cls=Captioner, shards: list[CodeShard] | None = None) -> JobSummary:
    """`shards`: cfg.input already resolved (by the job's check), else resolved here."""
    import ray.data

    t0 = time.time()
    shards = shards or resolve_code_shards(cfg.input)
    if cfg.max_shards:
        shards = shards[: cfg.max_shards]
    by_name = {s.name: s for s in shards}
    facts = cfg.facts(folder_identity(cfg.model))
    layout = caption_layout(cfg.output)
    plan = plan_shards(layout, by_name, facts, lambda n, m: m.get("input", {}).get("size") == by_name[n].size,
                       cfg.overwrite)
    summary = JobSummary(job="caption", unit="captions", shards_total=len(shards), shards_skipped=len(plan.done),
                         output=cfg.output, plan_seconds=plan.seconds)
    log.info("%d code shards: %d to do, %d already done (skipped)", len(shards), len(plan.todo), len(plan.done))
    if plan.todo:
        pool = plan_pool(cfg.device, cfg.gpus_per_worker, cfg.min_workers, cfg.num_workers)
        check_pool_leaves_cpus(pool, cfg.cpus_per_worker, 0.25, "--min-workers", "--cpus-per-worker")

        def stages(names: list[str], parts_dir: str):
            items = [{"path": by_name[n].path, "name": n} for n in names]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(CodeShardReader(schema.code_column(cfg.scale)), batch_size=1,
                                batch_format="pyarrow", num_cpus=0.25)
            ds = ds.map_batches(captioner_cls, fn_constructor_kwargs=dict(
                model=cfg.model, question=cfg.question, max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling,
                seed=cfg.seed, dtype=cfg.dtype, device=cfg.device, compile=cfg.compile, scale=cfg.scale),
                batch_size=cfg.batch_size or (64 if pool.gpus_per_worker else 8), batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(min_size=pool.min_workers, max_size=pool.max_workers),
                num_gpus=pool.gpus_per_worker, num_cpus=cfg.cpus_per_worker)
            return ds.map_batches(PartWriter(parts_dir), batch_size=None, batch_format="pyarrow", num_cpus=0.25)

        spec = ShardJob(job="caption", layout=layout, facts=facts, sources={"model": cfg.model},
                        writer=CaptionShardWriter(cfg, facts),
                        schema_versions={"captions": schema.CAPTIONS_VERSION, "errors": schema.ERRORS_VERSION})
        inputs = {n: {"path": by_name[n].path, "size": by_name[n].size} for n in plan.todo}
        run_sharded(spec, inputs, stages, summary, t0, cfg.max_writers, cfg.progress_every_s,
                    stall_timeout_s=cfg.stall_timeout_s)
    summary.seconds = time.time() - t0
    return summary
