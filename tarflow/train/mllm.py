"""Training the Tar MLLM on code shards with Ray Train: codes in, never a JPEG or SigLIP again.

    code shards / conversation Parquet --Ray Data: SampleBuilder (CPU: pick task and scale, build ids + labels)
        --> Ray Train workers (get_dataset_shard): pack samples into rows of max_length (positions restart per
            sample, attention block-diagonal), AdamW + cosine, DDP, checkpoints in Hugging Face format

Tasks, as the reference builds them from a row:
    I2T   user: image tokens + "\\n" + question        assistant: caption
    T2I   user: caption                                 assistant: <im_start><S{s-1}> image tokens <im_end>
    text  any `conversations` row without <image>
Labels: system and user turns are masked except "\\n", <|im_start|> and <|im_end|>; assistant turns are
learned. With packing, the first token of each sample is masked too (it would be predicted from the previous
sample).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from tarflow.data import schema, storage
from tarflow.train.common import OptimConfig

log = logging.getLogger("tarflow.train.mllm")

IGNORE = -100
TASK_IDS = {"i2t": 0, "t2i": 1, "text": 2}
DEFAULT_QUESTIONS = ("Describe the image shortly.", "What is in this image?", "Write a short caption for the image.")
SKIP_REASONS = ("missing_codes", "wrong_code_length", "codes_out_of_range", "empty_caption", "too_long")
SAMPLE_SCHEMA = pa.schema([pa.field("input_ids", pa.list_(pa.int32())), pa.field("labels", pa.list_(pa.int32())),
                           pa.field("task", pa.int8()), pa.field("skip", pa.string())])


@dataclass
class MLLMTrainConfig:
    data: list[str]  # code shard folders/files, or Parquet with `conversations` (+ tatok_s* columns)
    storage_path: str  # where Ray Train keeps runs and checkpoints (local or s3://)
    name: str = "tar-mllm"
    base: str | None = None  # base Qwen2 folder: Tar's vocabulary is added
    resume_from: str | None = None  # or a Tar checkpoint folder to continue from
    tatok: str | None = None  # TA-Tok checkpoint: image-token rows start from its codebook when widths match
    num_image_tokens: int = 65536  # <I{k}> tokens added to a base (Tar: 65536, TA-Tok's codebook size)
    task_mix: dict = field(default_factory=lambda: {"i2t": 2, "t2i": 4, "text": 1})
    scales: list[int] = field(default_factory=lambda: [1, 1, 2, 3])
    questions: tuple = DEFAULT_QUESTIONS
    system: str = "You are a helpful assistant."
    max_length: int = 2048
    rows_per_step: int = 1  # packed rows per micro-batch per worker
    strategy: str = "ddp"  # or "fsdp": parameters, gradients and optimiser state sharded over the workers
    optim: OptimConfig = field(default_factory=OptimConfig)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    stop_after_steps: int | None = None  # end this run (with a checkpoint) after so many steps; rerun resumes
    max_failures: int = 1
    shuffle_buffer: int = 256
    log_every: int = 10  # steps per metrics report (averaged over them)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["questions"] = list(self.questions)
        return d


# ----------------------------------------------------------------------------------------------------------
# Samples


def _key_rng(seed: int, key: str, epoch: int) -> random.Random:
    h = hashlib.sha256(f"{seed}/{epoch}/{key}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


class SampleBuilder:
    """Ray Data stage: rows -> (input_ids, labels, task) per sample, or a skip reason (never trained on)."""

    def __init__(self, tokenizer, task_mix: dict, scales: list[int], tokens_per_scale: dict,
                 questions, system: str, max_length: int, seed: int, codebook_size: int):
        from tarflow.models.mllm import TarVocab

        # a Tar tokenizer, or its folder (loading Tar's 217,206 tokens takes seconds: pass one when at hand)
        self.tokenizer = _load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self.vocab = TarVocab.from_tokenizer(self.tokenizer)
        self.task_mix, self.scales = task_mix, list(scales)
        self.tokens_per_scale = {int(k): int(v) for k, v in tokens_per_scale.items()}
        self.questions, self.system, self.max_length, self.seed = list(questions), system, max_length, seed
        self.codebook_size = min(codebook_size, self.vocab.num_image_tokens)
        t = self.tokenizer
        self.im_start, self.im_end = t.convert_tokens_to_ids("<|im_start|>"), t.convert_tokens_to_ids("<|im_end|>")
        self.newline = t("\n", add_special_tokens=False)["input_ids"]
        self.unmasked = {self.im_start, self.im_end, *self.newline}

    # -- turns ------------------------------------------------------------------------------------------
    def _text(self, s: str) -> list[int]:
        return self.tokenizer(s, add_special_tokens=False)["input_ids"]

    def _turn(self, role: str, parts: list) -> tuple[list[int], list[int]]:
        """<|im_start|>role\\n ... <|im_end|>\\n with `parts` = strings and lists of ids (image tokens)."""
        ids = [self.im_start] + self._text(f"{role}\n")
        for p in parts:
            ids += self._text(p) if isinstance(p, str) else list(p)
        ids += [self.im_end] + self.newline
        if role == "assistant":
            labels = list(ids)
        else:
            labels = [i if i in self.unmasked else IGNORE for i in ids]
        return ids, labels

    def _conversation(self, turns: list[tuple[str, list]]) -> tuple[list[int], list[int]]:
        ids, labels = self._turn("system", [self.system])
        for role, parts in turns:
            i, lab = self._turn(role, parts)
            ids += i
            labels += lab
        return ids, labels

    # -- rows -------------------------------------------------------------------------------------------
    def _codes(self, row: dict, scale: int):
        codes = row.get(schema.code_column(scale))
        if codes is None:
            return None, "missing_codes"
        codes = [int(c) for c in codes]
        if len(codes) != self.tokens_per_scale.get(scale, -1):
            return None, "wrong_code_length"
        if codes and (min(codes) < 0 or max(codes) >= self.codebook_size):
            return None, "codes_out_of_range"
        return codes, None

    def build(self, row: dict, epoch: int) -> tuple[list[int], list[int], str, str]:
        rng = _key_rng(self.seed, str(row.get("key") or row.get("id") or json.dumps(row, default=str)[:200]),
                       epoch)
        conv = row.get("conversations")
        if conv is not None:
            has_image = any("<image>" in (t.get("value") or "") for t in conv)
            task = "i2t" if has_image else "text"
            turns = []
            scale = rng.choice(self.scales)
            image = None
            if has_image:
                image, why = self._codes(row, scale)
                if image is None:
                    return [], [], task, why
            for t in conv:
                role = "user" if t.get("from") in ("human", "user") else "assistant"
                value = t.get("value") or ""
                parts = []
                for k, piece in enumerate(value.split("<image>")):
                    if k:
                        parts.append(self.vocab.codes_to_ids(image))
                    if piece:
                        parts.append(piece)
                turns.append((role, parts))
        else:
            caption = row.get("caption")
            tasks = {t: w for t, w in self.task_mix.items() if t in ("i2t", "t2i") and w > 0}
            task = rng.choices(list(tasks), weights=list(tasks.values()))[0]
            if not caption or not str(caption).strip():
                return [], [], task, "empty_caption"
            scale = rng.choice(self.scales)
            codes, why = self._codes(row, scale)
            if codes is None:
                return [], [], task, why
            image = self.vocab.codes_to_ids(codes)
            if task == "i2t":
                turns = [("user", [image, "\n" + rng.choice(self.questions)]), ("assistant", [caption])]
            else:
                answer = [self.vocab.image_start_tag_id, self.vocab.scale_token_id(scale)] + image + [
                    self.vocab.image_end_tag_id]
                turns = [("user", [caption]), ("assistant", [answer])]
        ids, labels = self._conversation(turns)
        if len(ids) > self.max_length:
            return [], [], task, "too_long"
        return ids, labels, task, ""

    def __call__(self, batch: pa.Table, epoch: int = 0) -> pa.Table:
        out = {"input_ids": [], "labels": [], "task": [], "skip": []}
        for row in batch.to_pylist():
            ids, labels, task, skip = self.build(row, epoch)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["task"].append(TASK_IDS[task])
            out["skip"].append(skip)
        return pa.Table.from_pydict(out, schema=SAMPLE_SCHEMA)


def _load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    from tarflow.models.mllm import fetch_model_folder, tokenizer_kwargs

    local = fetch_model_folder(folder) if storage.is_remote(folder) else folder
    return AutoTokenizer.from_pretrained(local, local_files_only=True, **tokenizer_kwargs())


# ----------------------------------------------------------------------------------------------------------
# Packing


def pack(samples: list[tuple[list[int], list[int], int]], max_length: int, pad_id: int, rows=None) -> dict:
    """Pack (ids, labels, task) samples into rows of at most `max_length` (greedy first fit, or the given
    `rows`).

    Returns input_ids, labels, task (per token, -1 on padding), position_ids (restart per sample), segment
    ids (-1 on padding) and the padding fraction.
    """
    if rows is None:
        rows = []
        for s in samples:
            for r in rows:
                if sum(len(x[0]) for x in r) + len(s[0]) <= max_length:
                    r.append(s)
                    break
            else:
                rows.append([s])
    L = max(sum(len(x[0]) for x in r) for r in rows)
    B = len(rows)
    ids = np.full((B, L), pad_id, np.int64)
    labels = np.full((B, L), IGNORE, np.int64)
    tasks = np.full((B, L), -1, np.int64)
    pos = np.zeros((B, L), np.int64)
    seg = np.full((B, L), -1, np.int64)
    for b, r in enumerate(rows):
        o = 0
        for k, (i, lab, t, *_) in enumerate(r):
            n = len(i)
            ids[b, o:o + n], labels[b, o:o + n], tasks[b, o:o + n] = i, lab, t
            labels[b, o] = IGNORE  # never predicted across samples
            pos[b, o:o + n] = np.arange(n)
            seg[b, o:o + n] = k
            o += n
    pad = float((seg < 0).mean())
    return {"input_ids": ids, "labels": labels, "tasks": tasks, "position_ids": pos, "segments": seg,
            "padding": pad}


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) segment ids -> (B, 1, L, L) additive mask: causal within a sample, nothing across samples.
    Padding attends to itself only (a row with no allowed key would give NaN)."""
    B, L = segments.shape
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=segments.device))
    allow = (same & causal) | torch.eye(L, dtype=torch.bool, device=segments.device)
    return torch.zeros(B, 1, L, L, dtype=dtype, device=segments.device).masked_fill(
        ~allow[:, None], torch.finfo(dtype).min)


def packed_loss(model, batch: dict, device) -> tuple[torch.Tensor, dict]:
    """Mean next-token loss over learned labels, plus (sum, count) per task for the metrics.

    Vocabulary-wide logits are computed only at positions whose next token is learned (Tar's vocabulary has
    217,206 rows: the logits of a whole packed row would dominate time and memory).
    """
    ids = torch.as_tensor(batch["input_ids"], device=device)
    labels = torch.as_tensor(batch["labels"], device=device)
    tasks = torch.as_tensor(batch["tasks"], device=device)
    seg = torch.as_tensor(batch["segments"], device=device)
    pos = torch.as_tensor(batch["position_ids"], device=device)
    mask = block_causal_mask(seg, torch.float32 if device.type == "cpu" else torch.bfloat16)
    target, task = labels[:, 1:], tasks[:, 1:]
    keep = torch.nonzero((target != IGNORE).any(0)).flatten()  # positions t whose token t+1 is learned
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
    target, task = target[:, keep], task[:, keep]
    tok_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                               ignore_index=IGNORE, reduction="none").view_as(target)
    valid = target != IGNORE
    loss = tok_loss[valid].sum() / valid.sum().clamp(min=1)
    with torch.no_grad():
        per_task = {name: (float(tok_loss[valid & (task == tid)].sum()), int((valid & (task == tid)).sum()))
                    for name, tid in TASK_IDS.items()}
    return loss, per_task


# ----------------------------------------------------------------------------------------------------------
# The Ray Train loop


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from tarflow.models.mllm import load_tar
    from tarflow.train.common import ModelParallel, OptimConfig, TrainState, autocast, gather_ints
    from tarflow.train.common import load_trainer_state, make_optimizer, report, unwrap

    cfg = config["cfg"]
    optim = OptimConfig(**cfg["optim"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg["seed"] + rank)
    device = ray.train.torch.get_device()
    parallel = ModelParallel(cfg["strategy"])
    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt is not None else contextlib.nullcontext(config["init_model"]) as d:
        # every worker loads the whole model; FSDP then keeps only its shard
        model, tokenizer, vocab = load_tar(d, device=str(device))
        model.train()
        model = parallel.wrap(model, layers=model.model.layers)
        opt, sched = make_optimizer(model, optim)
        state = load_trainer_state(d, opt, sched, rank, parallel) if ckpt is not None else TrainState()

    def save_model(folder, state_dict=None):
        m = unwrap(model)
        if state_dict is not None and m.config.tie_word_embeddings:
            # gathered shards are separate copies; a tied head is the embedding, saved once as DDP saves it
            state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
        m.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    builder = SampleBuilder(tokenizer, cfg["task_mix"], cfg["scales"], config["tokens_per_scale"],
                            cfg["questions"], cfg["system"], cfg["max_length"], cfg["seed"], config["codebook_size"])
    shard = ray.train.get_dataset_shard("train")
    skipped: Counter = Counter()

    def micro_batches():
        """Packed micro-batches, epoch after epoch; `state` records the data position for checkpoints."""
        while True:
            to_skip, pending = state.samples_seen, []
            pos = state.samples_seen  # rows of this epoch read so far
            for rb in shard.iter_batches(batch_size=64, batch_format="pyarrow",
                                         local_shuffle_buffer_size=cfg["shuffle_buffer"] or None,
                                         local_shuffle_seed=cfg["seed"] + state.epoch):
                if to_skip >= len(rb):  # resuming: these rows were consumed before the checkpoint
                    to_skip -= len(rb)
                    continue
                rb, to_skip = rb.slice(to_skip), 0
                built = builder(rb, epoch=state.epoch)
                for ids, labels, task, skip in zip(*(built.column(c).to_pylist()
                                                     for c in ("input_ids", "labels", "task", "skip"))):
                    pos += 1
                    if skip:
                        skipped[skip] += 1
                        continue
                    pending.append((ids, labels, task, pos - 1))
                    if _rows_closed(pending, cfg["rows_per_step"], cfg["max_length"]):
                        batch, pending = _take_rows(pending, cfg["rows_per_step"], cfg["max_length"], vocab.pad_id)
                        # a checkpoint after this batch resumes at the first sample not trained on yet
                        state.samples_seen = pending[0][3] if pending else pos
                        yield batch
            while pending:  # the epoch's last, partly filled rows
                batch, pending = _take_rows(pending, cfg["rows_per_step"], cfg["max_length"], vocab.pad_id)
                state.samples_seen = pending[0][3] if pending else pos
                yield batch
            yield None  # this worker's epoch is over; the next one starts when every worker got here
            state.epoch += 1
            state.samples_seen = 0

    batches = LockstepBatches(micro_batches(), device)
    first_step = state.step
    task_sum, task_n = Counter(), Counter()
    t_last, tok_count, pad_acc, pad_n = time.time(), 0, 0.0, 0
    while state.step < optim.total_steps:
        opt.zero_grad(set_to_none=True)
        step_sum, step_n, t_step = 0.0, 0, time.time()
        for micro in range(optim.grad_accum):
            batch = batches.next()
            with parallel.micro_batch(sync=micro == optim.grad_accum - 1):
                with autocast(device, optim.bf16):
                    if batch is None:  # out of data while others are not: a no-op step keeps DDP in lockstep
                        loss, per_task = zero_loss(model, device), {}
                    else:
                        loss, per_task = packed_loss(model, batch, device)
                (loss / optim.grad_accum).backward()
            if batch is None:
                continue
            for k, (s_, n_) in per_task.items():
                task_sum[k] += s_
                task_n[k] += n_
                step_sum, step_n = step_sum + s_, step_n + n_
            tok_count += int((batch["segments"] >= 0).sum())
            pad_acc += batch["padding"]
            pad_n += 1
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        opt.step()
        sched.step()
        state.step += 1
        last = state.step >= optim.total_steps or (cfg["stop_after_steps"] is not None
                                                   and state.step - first_step >= cfg["stop_after_steps"])
        save = last or state.step % cfg["checkpoint_every"] == 0
        if rank == 0:  # every step in the job's log (this worker's share of the batch)
            sys.stdout.write(f"step {state.step}/{optim.total_steps} loss {step_sum / max(step_n, 1):.4f} "
                             f"lr {sched.get_last_lr()[0]:.3g} {time.time() - t_step:.2f}s\n")
            sys.stdout.flush()
        # Ray Train takes one report per worker per poll of its controller (every 2 s by default) and blocks the
        # next until then: reporting every step would cap training at a step per poll. So metrics are averaged
        # over the steps since the last report, made every log_every steps and at checkpoints.
        if not (save or state.step % max(1, cfg["log_every"]) == 0):
            continue
        n_learned = sum(task_n.values())
        metrics = {"step": state.step, "loss": sum(task_sum.values()) / n_learned if n_learned else float("nan"),
                   "lr": sched.get_last_lr()[0], "epoch": state.epoch,
                   **{f"loss_{k}": task_sum[k] / task_n[k] for k in task_n if task_n[k]},
                   "tokens_per_s": tok_count / max(time.time() - t_last, 1e-9),
                   "padding_fraction": pad_acc / max(pad_n, 1)}
        for reason in SKIP_REASONS:  # every worker's count (a collective: all workers report at the same steps)
            total = sum(gather_ints(skipped[reason]))
            if total:
                metrics[f"skipped_{reason}"] = total
        task_sum.clear()
        task_n.clear()
        t_last, tok_count, pad_acc, pad_n = time.time(), 0, 0.0, 0
        report(metrics, save_model, opt, sched, state, checkpoint=save, parallel=parallel)
        if last:
            return


class LockstepBatches:
    """Micro-batches that keep DDP workers in step across epochs.

    Packing makes the number of micro-batches per epoch differ between workers, and Ray Data starts a new
    epoch of a split dataset only when every worker asks for it; a worker that runs out first would wait
    there while the others wait for it in the gradient all-reduce. So each micro-batch, the workers agree
    whether any of them still has data: if none has, all start the next epoch together; if some have, those
    without train a no-op batch (None) until all are done. The next batch is fetched only when it is about
    to be trained, so the recorded data position never runs ahead of training.
    """

    _UNFETCHED = object()

    def __init__(self, gen, device):
        self.gen, self.device, self.cur = gen, device, self._UNFETCHED

    def _any(self, flag: bool) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return flag
        t = torch.tensor([int(flag)], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def next(self):
        idle_epochs = 0
        while True:
            if self.cur is self._UNFETCHED:
                self.cur = next(self.gen)
            if self._any(self.cur is not None):
                break
            idle_epochs += 1  # every worker is at its epoch's end: all begin the next epoch
            if idle_epochs > 2:
                raise RuntimeError("no trainable sample in the data: every row was skipped (see skipped_* metrics)")
            self.cur = self._UNFETCHED
        batch = self.cur
        if batch is not None:
            self.cur = self._UNFETCHED
        return batch


def zero_loss(model, device) -> torch.Tensor:
    """A loss of exactly zero that still touches every parameter (DDP expects gradients from all)."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    return model(input_ids=ids, logits_to_keep=1).logits.sum() * 0.0


def _fill(pending, n_rows, max_length) -> list[list]:
    """The leading pending samples that fill `n_rows` rows in order (a sample that does not fit the current row
    opens the next one; the first that fits no row ends the fill)."""
    rows, used = [[]], 0
    for s in pending:
        if used + len(s[0]) > max_length:
            if len(rows) == n_rows:
                break
            rows.append([])
            used = 0
        rows[-1].append(s)
        used += len(s[0])
    return rows


def _take_rows(pending, n_rows, max_length, pad_id):
    """Pack the leading samples that fill `n_rows` rows; the rest stays pending. Taking a prefix, decided by the
    sequence alone, keeps the resume position exact."""
    rows = _fill(pending, n_rows, max_length)
    k = sum(len(r) for r in rows)
    return pack(pending[:k], max_length, pad_id, rows=rows), pending[k:]


def _rows_closed(pending, n_rows, max_length) -> bool:
    """True once a pending sample no longer fits: the rows are as full as this sequence can make them."""
    return sum(len(r) for r in _fill(pending, n_rows, max_length)) < len(pending)


# ----------------------------------------------------------------------------------------------------------
# Driver


def code_inputs(data: list[str]) -> list[str]:
    """Parquet files of code shards (a tokenize output folder: finished shards only) or conversation tables."""
    from tarflow.pipelines.caption import resolve_code_shards

    files = []
    for d in data:
        if d.endswith(".parquet") and storage.exists(d):
            files.append(d)
        else:
            files += [c.path for c in resolve_code_shards(d)]
    if not files:
        raise FileNotFoundError(f"no training data found in {data}")
    return files


TAR_TATOK_FACTS = ({1: 729, 2: 169, 3: 81}, 65536)  # Tar's TA-Tok: 27 x 27 codes at scale 1, 65,536 codes


def data_facts(files: list[str]) -> tuple[dict, int]:
    """Tokens per pool scale and the TA-Tok codebook size, from the first file with a code shard's metadata;
    Parquet without it (conversation tables made elsewhere) is taken to hold Tar's TA-Tok codes (rows whose
    codes do not fit are skipped and counted, never trained on)."""
    import pyarrow.parquet as pq

    for path in files:
        fs, p = storage.filesystem(path)
        with fs.open(p, "rb") as f:
            arrow_schema = pq.ParquetFile(f).schema_arrow
        if (arrow_schema.metadata or {}).get(schema.PARQUET_META_KEY) is None:
            continue
        meta = schema.read_metadata(arrow_schema, path)
        n1 = int(meta["model"]["args"]["bottleneck_token_num"])
        g = math.isqrt(n1)
        return {s: (g // s) ** 2 for s in (1, 2, 3)}, int(meta["model"]["codebook_size"])
    log.info("no file in the data has a code shard's metadata: image codes are taken as Tar's TA-Tok's "
             "(%s tokens per pool scale, %d codes)", TAR_TATOK_FACTS[0], TAR_TATOK_FACTS[1])
    return TAR_TATOK_FACTS


def prepare_initial_model(cfg: MLLMTrainConfig, folder: str) -> str:
    """A Tar model folder to start from: `resume_from` as is, or `base` + Tar's vocabulary (image rows from
    the TA-Tok codebook when widths match, else the mean embedding)."""
    if cfg.resume_from:
        return cfg.resume_from
    if not cfg.base:
        raise ValueError("give --base (a Qwen2 folder) or --resume-from (a Tar checkpoint)")
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from tarflow.models.mllm import add_tar_tokens, new_tar_model, tokenizer_kwargs

    tok = AutoTokenizer.from_pretrained(cfg.base, local_files_only=True, **tokenizer_kwargs())
    add_tar_tokens(tok, num_image_tokens=cfg.num_image_tokens)
    model = Qwen2ForCausalLM.from_pretrained(cfg.base, local_files_only=True)
    codebook = None
    if cfg.tatok:
        from tarflow.models.tatok import TATok

        codebook = TATok.from_checkpoint(cfg.tatok).bottleneck.regularizer.codebook().detach()
        n_image, hidden = len(tok) - tok.convert_tokens_to_ids("<I0>"), model.get_input_embeddings().weight.shape[1]
        if tuple(codebook.shape) != (n_image, hidden):
            log.info("TA-Tok codebook %s does not match (%d image tokens, hidden %d): image rows start from the "
                     "mean embedding", tuple(codebook.shape), n_image, hidden)
            codebook = None
    new_tar_model(model, tok, codebook)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def run_train_mllm(cfg: MLLMTrainConfig, train_loop=None, loop_extra: dict | None = None):
    """Train with Ray Train; returns the ray.train.Result (its checkpoint is a Hugging Face Tar folder).
    `train_loop` replaces the per-worker loop (e.g. one wrapping `train_loop_per_worker`), with `loop_extra`
    added to its config."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from tarflow.train.common import ModelParallel

    ModelParallel(cfg.strategy)  # an unknown strategy fails here, not in every worker
    files = code_inputs(cfg.data)
    tokens_per_scale, codebook_size = data_facts(files)
    if not cfg.resume_from and codebook_size > cfg.num_image_tokens:
        raise ValueError(f"the code shards' TA-Tok has {codebook_size} codes but only {cfg.num_image_tokens} image "
                         f"tokens would be added to the base; set num_image_tokens (--num-image-tokens) to at least "
                         f"{codebook_size}")
    init_dir = storage.join(cfg.storage_path, cfg.name, "init_model")
    if not cfg.resume_from and not storage.exists(storage.join(init_dir, "config.json")):
        local = init_dir if not storage.is_remote(init_dir) else os.path.join(
            os.environ.get("TMPDIR", "/tmp"), f"tarflow-init-{cfg.name}")
        prepare_initial_model(cfg, local)
        if storage.is_remote(init_dir):
            fs, p = storage.filesystem(init_dir)
            fs.put(local + "/", p + "/", recursive=True)
    init_model = prepare_initial_model(cfg, init_dir) if cfg.resume_from else init_dir
    ds = ray.data.read_parquet(files, shuffle=None)
    trainer = TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config={"cfg": cfg.as_dict(), "init_model": init_model, "tokens_per_scale": tokens_per_scale,
                           "codebook_size": codebook_size, **(loop_extra or {})},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=cfg.name, storage_path=cfg.storage_path,
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
        datasets={"train": ds},
        # a deterministic order (and split across workers) is what makes resuming exact
        dataset_config=ray.train.DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )
    return trainer.fit()
