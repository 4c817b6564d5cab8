"""Training the Tar MLLM on code shards with Ray Train: codes in, never a JPEG or SigLIP again.

    code shards / conversation Parquet --Ray Data--> Ray Train workers (get_dataset_shard; with a data mix the
    workers read their rows of each source themselves, tarflow.train.mix):
        SampleBuilder (pick task and scale, build ids + labels) --> pack samples into rows of max_length
        (positions restart per sample, attention block-diagonal) --> next-token loss on the learned labels
    The step loop, DDP / FSDP, schedule, metrics, checkpoints (Hugging Face Tar folders in the base's dtype) and
    resume are tarflow.train.core's; this module holds the model's preparation, the batches and the loss. The
    driver only reads the data's footers: the workers build the initial model.

Tasks, as the reference builds them (see SampleBuilder for the exact sequence and labels):
    i2t          user: image + "\\n" + question          assistant: caption           (a caption row, or a chat)
    t2i          user: caption                          assistant: <im_start><S{s-1}> image <im_end>
    i2i, ti2i    user: image (+ instruction)            assistant: <im_start><S{s-1}> image <im_end>
    multi_image  user: several images + question        assistant: text
    text         any conversation without <image>
Labels: system and user turns are masked except "\\n", <|im_start|> and <|im_end|>; assistant turns are
learned, written images included. With packing, the first token of each sample is masked too (it would be
predicted from the previous sample).

Data: `--data` (one source) or `--data-config mix.yaml` (several, drawn by ratio: tarflow.train.mix).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from tarflow.data import schema, storage
from tarflow.data.model_folder import check_model_folder
from tarflow.preflight import Problems
from tarflow.train.core import Task, TrainConfig, worker_loop
from tarflow.train.footers import check_one_tatok, code_shard_files, read_footers
from tarflow.train.run import TrainSummary, finish_preflight, fit

log = logging.getLogger("tarflow.train.mllm")

IGNORE = -100
TASKS = ("i2t", "t2i", "i2i", "ti2i", "multi_image", "text")
TASK_IDS = {t: k for k, t in enumerate(TASKS)}
DEFAULT_QUESTIONS = ("Describe the image shortly.", "What is in this image?", "Write a short caption for the image.")
# why a row gives no sample: bad rows, and rows the task mix or the data mix's thinning leaves out (task_mix,
# source_ratio: not bad)
SKIP_REASONS = ("missing_codes", "wrong_code_length", "codes_out_of_range", "image_count_mismatch",
                "bad_conversation", "empty_caption", "too_long", "task_mix", "source_ratio")


@dataclass(kw_only=True)
class MLLMTrainConfig(TrainConfig):
    data: list[str]  # code shard folders/files, or Parquet with `conversations` (+ tatok_s* columns)
    data_config: str | None = None  # or a mix file: sources drawn by ratio (tarflow.train.mix), `data` empty
    base: str | None = None  # base Qwen2 folder (local or s3://): Tar's vocabulary is added
    resume_from: str | None = None  # or a Tar checkpoint folder to continue from
    tatok: str | None = None  # TA-Tok checkpoint: image-token rows start from its codebook when widths match
    num_image_tokens: int = 65536  # <I{k}> tokens added to a base (Tar: 65536, TA-Tok's codebook size)
    task_mix: dict = field(default_factory=lambda: {"i2t": 2, "t2i": 4, "text": 1})
    scales: list[int] = field(default_factory=lambda: [1, 1, 2, 3])
    questions: tuple = DEFAULT_QUESTIONS
    system: str = "You are a helpful assistant."
    max_length: int = 2048
    rows_per_step: int = 1  # packed rows per micro-batch per worker
    # the core's settings, with this trainer's defaults
    name: str = "tar-mllm"

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["questions"] = list(self.questions)
        return d


# ----------------------------------------------------------------------------------------------------------
# Samples

IMAGE_MARK = "<image>"
READER_ROLES = ("user", "system")  # masked turns: an <image> there is read; in any other turn it is written
ROLE_NAMES = {"human": "user", "gpt": "assistant"}  # LLaVA's `from` -> the chat role (others pass as they are)


def _key_rng(seed: int, key: str, epoch: int) -> random.Random:
    h = hashlib.sha256(f"{seed}/{epoch}/{key}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def row_identity(row: dict) -> str:
    """What seeds a row's draws: the img2dataset key of a caption row; for a conversation row its key (a position,
    unique only within its shard), id, image hashes and text, so that rows of different shards draw apart. A
    mix copy (`_copy` > 0) draws anew."""
    if row.get("conversations") is None:
        ident = str(row.get("key") or json.dumps(row, default=str)[:200])
    else:
        conv = row.get("conversations")
        text = conv if isinstance(conv, str) else json.dumps(conv, default=str)
        ident = hashlib.sha256(json.dumps([row.get("key"), row.get("id"), row.get("image_sha256"), text],
                                          default=str).encode()).hexdigest()
    return f"{ident}/{row['_copy']}" if row.get("_copy") else ident


def conversation_task(turns: list[tuple[str, list]]) -> str:
    """The task a conversation is, from where its images are: none -> text; only read -> i2t (one image) or
    multi_image (several, a text answer); written -> t2i (nothing read), else ti2i when the reading turns have
    text besides their images (an instruction: an edit), i2i when they have none."""
    read = sum(1 for role, parts in turns if role in READER_ROLES for p in parts if not isinstance(p, str))
    written = sum(1 for role, parts in turns if role not in READER_ROLES for p in parts if not isinstance(p, str))
    if not written:
        return "text" if not read else "i2t" if read == 1 else "multi_image"
    if not read:
        return "t2i"
    asked = any(p.strip() for role, parts in turns if role == "user" for p in parts if isinstance(p, str))
    return "ti2i" if asked else "i2i"


class SampleBuilder:
    """Rows -> (input_ids, labels, task) per sample, or a skip reason (never trained on). The sequence rules are
    the reference's (`llava/data/dataset.py: preprocess_multimodal, preprocess_qwen`,
    `llava_arch.py: prepare_inputs_labels_for_multimodal`):

        <|im_start|>system\\n{system}<|im_end|>\\n  then per turn  <|im_start|>{role}\\n{content}<|im_end|>\\n
        role: human -> user, gpt -> assistant; a first turn that is not the human's is dropped
        <image> in a user turn: the image's codes in place (masked); in an assistant turn:
            <im_start> <S{s-1}> codes <im_end>, all learned (the scale token and the codes are the labels)
        labels: system and user turns masked except every "\\n" (id 198), <|im_start|> and <|im_end|>, also
            inside the user's text; assistant turns learned whole (their <|im_start|>assistant\\n too)
        `conversations_short` (when the row has one) replaces `conversations` half of the time

    Images: the k-th `<image>` of the conversation (counting every turn in order) is the k-th code list of
    `tatok_s{s}` (a conversation code shard's list<list<>>); a flat list (a caption code shard, or a plain
    conversation table with one image's codes) is one image. A caption row (no `conversations`) is the I2T
    conversation (image, "\\n", a question; the caption) or the T2I one (the caption; the image), drawn with the
    task mix's i2t : t2i weights.

    One pool scale per sample, for all its images, drawn from `scales`. The reference draws one per forward (the
    whole batch, every image in it); per sample gives the same distribution of scales per image while packed rows
    hold samples of different lengths, and keeps a sample's content independent of what it is batched with
    (so resume and any worker count build the same samples).

    Text-only rows are kept with probability `text_keep` (the driver sets it from the data's row counts so that
    text-only samples are text / (i2t + t2i + text) of all; 1 when the data has too few, and in a data mix,
    whose ratios set the shares). A conversation whose task has weight 0 in the task mix is left out. In a data
    mix, a row of source i is kept with probability `source_keep[i]` (the mix's thinning; its copies are the
    mix's repeats). Every draw is seeded by (seed, epoch, row identity): a resumed run builds the same samples."""

    def __init__(self, tokenizer, task_mix: dict, scales: list[int], tokens_per_scale: dict,
                 questions, system: str, max_length: int, seed: int, codebook_size: int, text_keep: float = 1.0,
                 source_keep: list[float] | None = None):
        from tarflow.models.mllm import TarVocab

        # a Tar tokenizer, or its folder (loading Tar's 217,206 tokens takes seconds: pass one when at hand)
        self.tokenizer = _load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self.vocab = TarVocab.from_tokenizer(self.tokenizer)
        self.task_mix, self.scales = task_mix, list(scales)
        self.tokens_per_scale = {int(k): int(v) for k, v in tokens_per_scale.items()}
        self.questions, self.system, self.max_length, self.seed = list(questions), system, max_length, seed
        self.codebook_size = min(codebook_size, self.vocab.num_image_tokens)
        self.text_keep = text_keep if task_mix.get("text", 0) > 0 else 0.0
        self.source_keep = list(source_keep or [])
        t = self.tokenizer
        self.im_start, self.im_end = t.convert_tokens_to_ids("<|im_start|>"), t.convert_tokens_to_ids("<|im_end|>")
        self.newline = t("\n", add_special_tokens=False)["input_ids"]
        self.unmasked = {self.im_start, self.im_end, *self.newline}

    # -- turns ------------------------------------------------------------------------------------------
    def _text(self, s: str) -> list[int]:
        return self.tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

    def _turn(self, role: str, parts: list, images: list[list[int]], scale: int) -> tuple[list[int], list[int]]:
        """<|im_start|>role\\n ... <|im_end|>\\n; `parts` are strings and image indices into `images`. Text is
        tokenized in the runs between images (the reference tokenizes `<image>` as an added token, which splits
        the text there), the role's "\\n" with the text that follows it."""
        writes = role not in READER_ROLES
        ids, text = [self.im_start], f"{role}\n"
        for p in parts:
            if isinstance(p, str):
                text += p
                continue
            ids += self._text(text)
            text = ""
            codes = self.vocab.codes_to_ids(images[p])
            if writes:
                codes = [self.vocab.image_start_tag_id, self.vocab.scale_token_id(scale)] + codes + [
                    self.vocab.image_end_tag_id]
            ids += codes
        ids += self._text(text) + [self.im_end] + self.newline
        labels = list(ids) if writes else [i if i in self.unmasked else IGNORE for i in ids]
        return ids, labels

    def _sequence(self, turns: list[tuple[str, list]], images, scale) -> tuple[list[int], list[int]]:
        ids, labels = self._turn("system", [self.system], images, scale)
        for role, parts in turns:
            i, lab = self._turn(role, parts, images, scale)
            ids += i
            labels += lab
        return ids, labels

    # -- rows -------------------------------------------------------------------------------------------
    def _images(self, row: dict, scale: int, count: int):
        """The row's `count` images' codes at `scale` (a list of code lists), or a skip reason."""
        codes = row.get(schema.code_column(scale))
        if codes is None:
            return (None, "missing_codes") if count else ([], None)
        codes = list(codes)
        images = [list(c) for c in codes] if codes and isinstance(codes[0], (list, tuple)) else \
            [codes] if codes else []
        if len(images) != count:
            return None, "image_count_mismatch"
        want = self.tokens_per_scale.get(scale, -1)
        for image in images:
            if len(image) != want:
                return None, "wrong_code_length"
            if image and (min(image) < 0 or max(image) >= self.codebook_size):
                return None, "codes_out_of_range"
        return [[int(c) for c in image] for image in images], None

    @staticmethod
    def _parse_turns(conv) -> list[tuple[str, list]] | None:
        """LLaVA turns ({from, value}; a list or its JSON) -> [(role, parts)], `<image>` marks numbered in order
        over every turn; None when they do not parse."""
        if isinstance(conv, (str, bytes)):
            try:
                conv = json.loads(conv)
            except ValueError:
                return None
        if not isinstance(conv, list) or not all(isinstance(t, dict) and isinstance(t.get("value", ""), str)
                                                 for t in conv):
            return None
        turns, k = [], 0
        for t in conv:
            value = (t.get("value") or "").replace("QA_GT_caption_based_noisy", "")  # the reference drops it
            parts = []
            for n, piece in enumerate(value.split(IMAGE_MARK)):
                if n:
                    parts.append(k)
                    k += 1
                if piece:
                    parts.append(piece)
            turns.append((ROLE_NAMES.get(t.get("from"), t.get("from") or t.get("role") or ""), parts))
        return turns

    def build(self, row: dict, epoch: int) -> tuple[list[int], list[int], str, str]:
        rng = _key_rng(self.seed, row_identity(row), epoch)
        source = row.get("_source")
        if source is not None and source < len(self.source_keep) and rng.random() >= self.source_keep[source]:
            return [], [], "text", "source_ratio"
        conv = row.get("conversations")
        if conv is not None:
            short = row.get("conversations_short")
            if short is not None and rng.random() < 0.5:  # the reference's random short/long prompt
                conv = short
            turns = self._parse_turns(conv)
            if turns is None:
                return [], [], "text", "bad_conversation"
            count = sum(1 for _, parts in turns for p in parts if not isinstance(p, str))
            if turns and turns[0][0] != "user":  # the reference starts at the human's turn
                turns = turns[1:]
            task = conversation_task(turns)
            if (rng.random() >= self.text_keep) if task == "text" else self.task_mix.get(task, 1) <= 0:
                return [], [], task, "task_mix"
        else:
            caption = row.get("caption")
            tasks = {t: w for t, w in self.task_mix.items() if t in ("i2t", "t2i") and w > 0}
            if not tasks:
                return [], [], "i2t", "task_mix"
            task = rng.choices(list(tasks), weights=list(tasks.values()))[0]
            if not caption or not str(caption).strip():
                return [], [], task, "empty_caption"
            count = 1
            turns = [("user", [0, "\n" + rng.choice(self.questions)]), ("assistant", [caption])] if task == "i2t" \
                else [("user", [caption]), ("assistant", [0])]
        scale = rng.choice(self.scales)
        images, why = self._images(row, scale, count)
        if images is None:
            return [], [], task, why
        ids, labels = self._sequence(turns, images, scale)
        if len(ids) > self.max_length:
            return [], [], task, "too_long"
        return ids, labels, task, ""


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
# The worker side: model, batches, loss (the loop is tarflow.train.core's)


class MLLMTask(Task):
    """Samples built from the rows (SampleBuilder), packed into `rows_per_step` rows of `max_length` per
    micro-batch; the next-token loss over the learned labels. With a data mix, the rows come from its sources,
    interleaved by ratio (tarflow.train.mix). Metrics: loss per task, samples per task and per source (in the
    report's window, and `total_*` over the run)."""

    def __init__(self, cfg, config, device):
        super().__init__(cfg, config, device)
        self.sources = [s["name"] for s in config.get("sources") or [{"name": "data"}]]
        counts = [f"samples_{t}" for t in TASKS] + [f"source_{n}" for n in self.sources]
        self.sum_keys = ("loss_sum", "loss_count", *(f"{k}_{t}" for t in TASKS for k in ("loss_sum", "loss_count")),
                         "tokens", "padding", "micro_batches", *(f"skipped_{r}" for r in SKIP_REASONS), *counts)
        self.total_keys = (*(f"skipped_{r}" for r in SKIP_REASONS), *counts)

    def load_model(self, checkpoint_dir):
        from tarflow.models.mllm import load_tar

        cfg = self.cfg
        if checkpoint_dir or cfg.resume_from:  # every worker loads the whole model; FSDP then keeps its shard
            folder = checkpoint_dir or cfg.resume_from
            model, self.tokenizer, self.vocab = load_tar(folder)  # float32 master weights
            self.save_dtype = folder_dtype(folder)
        else:
            model, self.tokenizer, self.save_dtype = initial_model(cfg)
            from tarflow.models.mllm import TarVocab

            self.vocab = TarVocab.from_tokenizer(self.tokenizer)
        c = self.config
        self.builder = SampleBuilder(self.tokenizer, cfg.task_mix, cfg.scales, c["tokens_per_scale"], cfg.questions,
                                     cfg.system, cfg.max_length, cfg.seed, c["codebook_size"], c["text_keep"],
                                     source_keep=[s["keep"] for s in c.get("sources") or []])
        return model.to(self.device)

    def fsdp_layers(self, model):
        return list(model.model.layers)

    def epoch_rows(self, shards, state):
        if not self.config.get("sources"):
            return super().epoch_rows(shards, state)
        import ray.train

        from tarflow.train.mix import MixSource, mixed_epoch_rows

        ctx = ray.train.get_context()
        return mixed_epoch_rows([MixSource(**s) for s in self.config["sources"]], self.cfg.seed, state.epoch,
                                state.samples_seen, ctx.get_world_rank(), ctx.get_world_size(), self.read_rows,
                                self.cfg.shuffle_buffer)

    def batches(self, rows, epoch):
        n_rows, max_length, pad_id = self.cfg.rows_per_step, self.cfg.max_length, self.vocab.pad_id
        pending, end = [], 0
        skipped = self.skipped = getattr(self, "skipped", {})  # counted with the next batch, even the next epoch's

        def take():
            nonlocal pending
            before = pending
            batch, pending = _take_rows(pending, n_rows, max_length, pad_id)
            counts = dict(skipped)
            skipped.clear()
            for _, _, task, _, source in before[:len(before) - len(pending)]:
                for key in (f"samples_{TASKS[task]}", f"source_{self.sources[source]}"):
                    counts[key] = counts.get(key, 0) + 1
            batch["counts"] = counts
            return batch

        for pos, table in rows:
            table = table.to_pylist() if isinstance(table, pa.Table) else table
            for k, row in enumerate(table):
                ids, labels, task, skip = self.builder.build(row, epoch)
                if skip:
                    skipped[f"skipped_{skip}"] = skipped.get(f"skipped_{skip}", 0) + 1
                    continue
                pending.append((ids, labels, TASK_IDS[task], pos + k, row.get("_source", 0)))
                if _rows_closed(pending, n_rows, max_length):
                    batch = take()
                    # a checkpoint after this batch resumes at the first sample not trained on yet
                    yield batch, pending[0][3] if pending else pos + k + 1
            end = pos + len(table)
        while pending:  # the epoch's last, partly filled rows
            batch = take()
            yield batch, pending[0][3] if pending else end

    def loss(self, model, batch):
        loss, per_task = packed_loss(model, batch, self.device)
        sums = {"tokens": int((batch["segments"] >= 0).sum()), "padding": batch["padding"], "micro_batches": 1,
                **batch["counts"]}
        for t, (total, n) in per_task.items():
            sums[f"loss_sum_{t}"], sums[f"loss_count_{t}"] = total, n
        sums["loss_sum"], sums["loss_count"] = sum(v[0] for v in per_task.values()), sum(v[1] for v in per_task.values())
        return loss, sums

    def zero_loss(self, model):
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        return model(input_ids=ids, logits_to_keep=1).logits.sum() * 0.0

    def save_model(self, model, folder, state_dict=None):
        save_tar(model, self.tokenizer, folder, self.save_dtype, state_dict)

    def metrics(self, sums, totals, seconds):
        n = sums["loss_count"]
        counts = [f"samples_{t}" for t in TASKS] + [f"source_{s}" for s in self.sources]
        return {"loss": sums["loss_sum"] / n if n else float("nan"),
                **{f"loss_{t}": sums[f"loss_sum_{t}"] / sums[f"loss_count_{t}"] for t in TASKS
                   if sums[f"loss_count_{t}"]},
                "tokens_per_s": sums["tokens"] / max(seconds, 1e-9),
                "padding_fraction": sums["padding"] / max(sums["micro_batches"], 1),
                **{k: int(sums[k]) for k in counts if sums[k]},  # in this report's window
                **{k: int(v) for k, v in totals.items() if v and k.startswith("skipped_")},
                **{f"total_{k}": int(v) for k, v in totals.items() if v and k in counts}}


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    worker_loop(MLLMTask, MLLMTrainConfig, config)


def folder_dtype(folder: str) -> torch.dtype:
    """The dtype a Hugging Face folder's config.json records (its weights'); float32 when it records none."""
    raw = storage.read_bytes(storage.join(str(folder), "config.json"))
    conf = json.loads(raw)
    name = conf.get("dtype") or conf.get("torch_dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)


def local_folder(path: str) -> str:
    """A local copy of a (remote) model folder's top-level files; a local folder as it is."""
    from tarflow.models.mllm import fetch_model_folder

    return str(fetch_model_folder(path)) if storage.is_remote(path) else path


def initial_model(cfg: MLLMTrainConfig):
    """(model in float32, Tar tokenizer, the base's dtype): `base` + Tar's vocabulary, image rows from the TA-Tok
    codebook when widths match, else the mean embedding. Built on the workers (never on the driver), the same on
    each: nothing in it is random. The base loads in its own dtype and is then trained in float32 master weights;
    checkpoints are saved in the base's dtype again."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from tarflow.models.mllm import add_tar_tokens, new_tar_model, tokenizer_kwargs

    base = local_folder(cfg.base)
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True, **tokenizer_kwargs())
    add_tar_tokens(tok, num_image_tokens=cfg.num_image_tokens)
    model = Qwen2ForCausalLM.from_pretrained(base, local_files_only=True, dtype="auto", use_safetensors=True)
    dtype = next(model.parameters()).dtype
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
    return model.float(), tok, dtype


def save_tar(model, tokenizer, folder: str, dtype: torch.dtype, state_dict: dict | None = None) -> None:
    """A Tar folder (safetensors in `dtype`, config.json saying so, the tokenizer); `state_dict`: whole tensors
    gathered under FSDP, else the model's own."""
    sd = state_dict if state_dict is not None else model.state_dict()
    if model.config.tie_word_embeddings:  # the head is the embedding: saved once
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.save_pretrained(folder, state_dict=sd, safe_serialization=True)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        conf = json.load(f)
    name = str(dtype).removeprefix("torch.")
    for key in [k for k in ("dtype", "torch_dtype") if k in conf] or ["torch_dtype"]:
        conf[key] = name  # save_pretrained records the float32 master weights' dtype
    with open(path, "w") as f:
        json.dump(conf, f, indent=2, sort_keys=True)
    tokenizer.save_pretrained(folder)


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


TAR_TATOK_FACTS = ({1: 729, 2: 169, 3: 81}, 65536)  # Tar's TA-Tok: 27 x 27 codes at scale 1, 65,536 codes


def data_facts(footers, problems: Problems | None = None, tatok_sha256: tuple[str, str] | None = None,
               count_rows: bool = True) -> dict:
    """What the workers need to know of the data, from the files' footers: tokens per pool scale and the TA-Tok
    codebook size, and the rows per kind for the task mix (`count_rows`). Every code shard must come from one
    TA-Tok (else a problem listing the offenders), the one given as `tatok_sha256` = (sha256, its flag and path) when given.
    Parquet without a code shard's metadata (conversation tables made elsewhere) is taken to hold Tar's TA-Tok
    codes (rows whose codes do not fit are skipped and counted, never trained on)."""
    own = problems is None
    problems = problems if problems is not None else Problems()
    for f in footers:
        if f.error:
            problems.add(f.path, f.error, "give code shards written by the tokenize job, or conversation Parquet")
        elif f.meta is None and "conversations" not in f.columns:
            problems.add(f.path, "neither a code shard nor a conversation table (no `conversations` column)",
                         "give the tokenize job's output or Parquet with LLaVA-style `conversations`")
    shards = [f for f in footers if f.meta]
    sha = check_one_tatok(shards, problems, tatok_sha256)
    if own:
        problems.raise_if_any()
    if shards:
        meta = next((f.meta for f in shards if f.meta["model"]["sha256"] == sha), shards[0].meta)
        g = math.isqrt(int(meta["model"]["args"]["bottleneck_token_num"]))
        tokens_per_scale, codebook = {s: (g // s) ** 2 for s in (1, 2, 3)}, int(meta["model"]["codebook_size"])
    else:
        if footers:
            log.info("no file in the data has a code shard's metadata: image codes are taken as Tar's TA-Tok's "
                     "(%s tokens per pool scale, %d codes)", TAR_TATOK_FACTS[0], TAR_TATOK_FACTS[1])
        tokens_per_scale, codebook = TAR_TATOK_FACTS
    return {"tokens_per_scale": tokens_per_scale, "codebook_size": codebook, "tatok_sha256": sha,
            "rows": count_row_kinds([f for f in footers if not f.error]) if count_rows else {}}


def count_row_kinds(footers) -> dict:
    """Rows per kind: `caption` (code shard rows: I2T or T2I), `image_chat` (conversations with an <image>: I2T)
    and `text` (conversations without: text-only). Only the `conversations` column of conversation tables is
    read."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def count(f) -> dict:
        if "conversations" not in f.columns:
            return {"caption": f.num_rows}
        fs, p = storage.filesystem(f.path)
        with fs.open(p, "rb") as fh:
            conv = pq.read_table(fh, columns=["conversations"]).column("conversations").combine_chunks()
        if pa.types.is_string(conv.type) or pa.types.is_large_string(conv.type):  # the JSON form
            has_image = pc.fill_null(pc.match_substring(conv, "<image>"), False).to_numpy(zero_copy_only=False)
            return {"image_chat": int(has_image.sum()), "text": int(len(conv) - has_image.sum())}
        values = pc.struct_field(pc.list_flatten(conv), "value")
        hit = pc.fill_null(pc.match_substring(values, "<image>"), False).cast(pa.int32())
        parent = pc.list_parent_indices(conv).to_numpy(zero_copy_only=False)
        has_image = np.bincount(parent, weights=hit.to_numpy(zero_copy_only=False), minlength=len(conv)) > 0
        return {"image_chat": int(has_image.sum()), "text": int(len(conv) - has_image.sum())}

    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(count, footers))
    return {k: sum(c.get(k, 0) for c in counts) for k in ("caption", "image_chat", "text")}


def text_keep_probability(task_mix: dict, rows: dict) -> float:
    """The probability that a text-only row is kept, so that text-only samples are text / (i2t + t2i + text) of
    all samples (each caption or image-chat row gives one image sample); 1 when there are too few text rows."""
    w_image, w_text = task_mix.get("i2t", 0) + task_mix.get("t2i", 0), task_mix.get("text", 0)
    image_rows = rows.get("caption", 0) + rows.get("image_chat", 0)
    if w_text <= 0:
        return 0.0
    if not rows.get("text") or w_image <= 0 or not image_rows:
        return 1.0
    keep = w_text / w_image * image_rows / rows["text"]
    if keep > 1:
        log.info("text-only rows are %.1f%% of the samples, fewer than the task mix's %.1f%%: all are kept",
                 100 * rows["text"] / (rows["text"] + image_rows), 100 * w_text / (w_text + w_image))
    return min(1.0, keep)


def is_tar_folder(path: str) -> bool:
    """A model folder whose tokenizer already has Tar's tokens (an `<im_start>` added token). transformers 4
    lists added tokens in tokenizer_config.json, 5 only in tokenizer.json: either counts."""
    for name in ("tokenizer_config.json", "tokenizer.json"):
        p = storage.join(path, name)
        if storage.exists(p) and b'"<im_start>"' in storage.read_bytes(p):
            return True
    return False


def preflight(cfg: MLLMTrainConfig) -> dict:
    """Every check that needs no Ray, on the driver, all problems at once (UsageError, one line each): the
    settings, --base / --resume-from, --tatok, --data (readable, one TA-Tok, the TA-Tok given), the codebook
    against --num-image-tokens, and a rerun's data against its run's. A --base that is already a Tar folder is
    continued from (its image rows as they are), as --resume-from would. Nothing is built here: the workers
    prepare the model. Returns what the workers get."""
    problems = Problems()
    cfg.check(problems)
    problems.check(bool(cfg.base) != bool(cfg.resume_from), "--base/--resume-from", "give exactly one",
                   "--base QWEN2_FOLDER to add Tar's vocabulary, --resume-from TAR_FOLDER to continue")
    problems.check(bool(cfg.scales) and all(s in (1, 2, 3) for s in cfg.scales), "--scales", f"is {cfg.scales}",
                   "pool scales are 1, 2 or 3")
    problems.check(cfg.max_length >= 16 and cfg.rows_per_step >= 1, "--max-length/--rows-per-step",
                   f"are {cfg.max_length}/{cfg.rows_per_step}", "give a row length >= 16 and >= 1 rows per step")
    bad_mix = [k for k, w in cfg.task_mix.items() if k not in TASK_IDS or w < 0]
    problems.check(not bad_mix and sum(cfg.task_mix.values()) > 0, "--task-mix", f"is {cfg.task_mix}",
                   f"give non-negative weights of {', '.join(TASKS)}, e.g. i2t=2,t2i=4,text=1 (a conversation "
                   "task of weight 0 is left out; caption rows are i2t or t2i by their weights)")
    for flag, path, what in (("--base", cfg.base, "base Qwen2 folder"),
                             ("--resume-from", cfg.resume_from, "Tar checkpoint folder")):
        if check_model_folder(problems, path, flag, what) and flag == "--base" and is_tar_folder(path):
            log.info("--base %s is a Tar folder (its tokenizer has Tar's tokens): training continues from its rows, "
                     "as with --resume-from", path)
            cfg.base, cfg.resume_from = None, path
    tatok_sha = None
    if cfg.tatok:
        if storage.exists(cfg.tatok) and not storage.isdir(cfg.tatok):
            tatok_sha = (storage.sha256(cfg.tatok), f"--tatok {cfg.tatok}")  # cached: see storage.sha256
        else:
            problems.add(f"--tatok {cfg.tatok}", "not found",
                         "give the TA-Tok checkpoint (ta_tok.pth) that made the codes")
    sources = None
    if cfg.data_config:
        from tarflow.train.mix import plan_mix, read_mix_config

        problems.check(not cfg.data, "--data/--data-config", "both given",
                       "give --data for one source, or --data-config with every source in the mix file")
        sources, files = read_mix_config(cfg.data_config, problems), []
        for src in sources:
            src.files = code_shard_files(src.paths, problems, f"--data-config source {src.name}:",
                                         parquet_files=True)
            files += src.files
    else:
        files = code_shard_files(cfg.data, problems, parquet_files=True)
    footers = read_footers(files, check=schema.check_any_code_shard)
    facts = data_facts(footers, problems, tatok_sha, count_rows=sources is None)
    if sources:
        rows = {f.path: f.num_rows for f in footers}
        for src in sources:
            src.file_rows = [rows[f] for f in src.files]
            src.rows = sum(src.file_rows)
            problems.check(src.rows > 0 or not src.files, f"--data-config {cfg.data_config}",
                           f"source {src.name!r} has no rows", "give each source tokenize outputs with rows")
        plan_mix(sources)
    if not cfg.resume_from and facts["codebook_size"] > cfg.num_image_tokens:
        problems.add("--num-image-tokens", f"the code shards' TA-Tok has {facts['codebook_size']} codes but only "
                     f"{cfg.num_image_tokens} image tokens would be added to the base",
                     f"set --num-image-tokens to at least {facts['codebook_size']}")
    # in a mix the sources' ratios set the shares: text-only rows are all kept (unless the task mix's text is 0)
    text_keep = 1.0 if sources is not None else text_keep_probability(cfg.task_mix, facts["rows"])
    run_facts = {"data_files": files, "tatok_sha256": facts["tatok_sha256"],
                 "tokens_per_scale": facts["tokens_per_scale"], "codebook_size": facts["codebook_size"]}
    if sources is not None:  # another mix is other data, even on the same files
        run_facts["mix"] = [{"name": s.name, "ratio": s.ratio, "paths": s.paths} for s in sources]
    out = finish_preflight(cfg, problems, run_facts, files=files, tokens_per_scale=facts["tokens_per_scale"],
                           codebook_size=facts["codebook_size"], text_keep=text_keep,
                           sources=[s.as_dict() for s in sources] if sources is not None else None)
    if sources is not None:
        log.info("data mix: %s", "; ".join(f"{s.name}: {s.rows} rows, ratio {s.ratio:g}, read {s.copies}x, "
                                           f"kept {s.keep:.3f}" for s in sources))
    return out


def run_train_mllm(cfg: MLLMTrainConfig, plan: dict | None = None, train_loop=None,
                   loop_extra: dict | None = None) -> TrainSummary:
    """Train with Ray Train (after `preflight`, run here when `plan` is None); returns the summary (its checkpoint
    is a Hugging Face Tar folder). `train_loop` replaces the per-worker loop (e.g. one wrapping
    `train_loop_per_worker`), with `loop_extra` added to its config."""
    import ray.data

    plan = plan or preflight(cfg)
    if plan.get("sources"):
        data = {}  # the workers read their rows of each source themselves (tarflow.train.mix)
    else:
        data = ray.data.read_parquet(plan["files"], shuffle=None)
    summary = fit(cfg, train_loop or train_loop_per_worker, {**plan, **(loop_extra or {})}, data)
    return MLLMTrainSummary(**summary.as_dict())


@dataclass
class MLLMTrainSummary(TrainSummary):
    """The core's summary, with the run's samples per task and per source."""

    def render(self, what: str = "training") -> str:
        m = self.metrics
        tasks = {k.removeprefix("total_samples_"): v for k, v in m.items() if k.startswith("total_samples_")}
        sources = {k.removeprefix("total_source_"): v for k, v in m.items() if k.startswith("total_source_")}
        losses = {k.removeprefix("loss_"): round(v, 4) for k, v in m.items() if k.startswith("loss_")}
        head, _, tail = super().render(what).partition("\n")
        return "\n".join([head, f"samples per task {tasks}, per source {sources}", f"loss per task {losses}", tail])
