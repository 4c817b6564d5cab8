"""The generate job: a prompt table -> synthetic images as img2dataset-style WebDataset shards, on Ray Data.

    prompt table (driver: read, validate, expand n samples per row, cut into output shards)
      --T2IGenerator (GPU actor pool: T2I prompts -> codes with the Tar MLLM -> pixels with a de-tokenizer)
      --ImageEncoder (CPU tasks: PNG / JPEG)
      --PartWriter --> finalize tasks: GeneratedShardWriter ({shard}.tar, .parquet, _stats.json, errors/),
                       then _manifest/

Requests stream shard by shard (each shard's end row right after its requests), so a shard is written as
soon as its images are done: the first manifests appear long before the last request is processed.

Each sample's seed drives both the MLLM's sampling and the de-tokenizer's, per row, so an image depends only on
its prompt, scale and seed: reruns, retries and other batch sizes give the same pixels.

Self-reflection (`reflect`, see the section below and tarflow/models/reflect.py): per request the generator
samples N candidate code sequences, the same MLLM scores each from its codes (one batched forward), and only
the best K are de-tokenized; a request then fills K consecutive rows (indices and keys reserved by the driver).
"""
from __future__ import annotations

import io
import json
import logging
import math
import tarfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tarflow.data import schema, storage
from tarflow.pipelines.sharded import (DEFAULT_STALL_TIMEOUT_S, JobSummary, PartWriter, ShardJob, ShardLayout,
                                       ShardWritten, end_row, check_pool_leaves_cpus, file_identity, folder_identity, guarded,
                                       parquet_bytes, plan_pool, plan_shards, run_sharded, split_failed)

log = logging.getLogger("tarflow.generate")

_COMMON = [pa.field("shard", pa.string()), pa.field("idx", pa.int64()), pa.field("key", pa.string()),
           pa.field("kind", pa.string()), pa.field("end_info", pa.string()), pa.field("error_stage", pa.string()),
           pa.field("error_reason", pa.string()), pa.field("error_detail", pa.string()),
           pa.field("id", pa.string()), pa.field("index", pa.int32()), pa.field("prompt", pa.string()),
           pa.field("scale", pa.int32()), pa.field("seed", pa.int64())]
REQUEST_SCHEMA = pa.schema(_COMMON)
# every candidate of a request, on its rank-0 image's row (for reflect/{shard}.parquet)
REFLECT_CANDIDATE = pa.struct([pa.field("candidate", pa.int32()), pa.field("seed", pa.int64()),
                               pa.field("codes", pa.list_(pa.int32())), pa.field("codes_fix", pa.string()),
                               pa.field("score", pa.float64()), pa.field("rank", pa.int32()),
                               pa.field("kept", pa.bool_())])
_REFLECTED = [pa.field("reflect_score", pa.float64()), pa.field("reflect_rank", pa.int32()),
              pa.field("reflect_candidate", pa.int32()), pa.field("candidates", pa.int32()),
              pa.field("reflect_tokens", pa.int64()), pa.field("reflect_seconds", pa.float64()),
              pa.field("reflect_all", pa.list_(REFLECT_CANDIDATE))]
_GENERATED = [pa.field("ok", pa.bool_()), pa.field("codes", pa.list_(pa.int32())), pa.field("codes_fix", pa.string()),
              pa.field("width", pa.int32()), pa.field("height", pa.int32())] + _REFLECTED
GENERATED_SCHEMA = pa.schema(_COMMON + _GENERATED + [pa.field("pixels", pa.binary())])
ENCODED_SCHEMA = pa.schema(_COMMON + _GENERATED + [pa.field("image", pa.binary())])


# ----------------------------------------------------------------------------------------------------------
# The prompt table


class PromptTableError(ValueError):
    pass


def read_prompt_table(path: str) -> list[dict]:
    """Rows of a Parquet / CSV / JSONL prompt table (local or s3://) as dicts; see schema.PROMPT_TABLE_COLUMNS."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise PromptTableError(f"prompt table {path} does not exist") from None
    lower = path.lower()
    try:
        if lower.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
        elif lower.endswith(".csv"):
            table = pacsv.read_csv(io.BytesIO(data))
        elif lower.endswith((".jsonl", ".json", ".ndjson")):
            table = pajson.read_json(io.BytesIO(data))
        else:
            raise PromptTableError(f"prompt table {path}: use .parquet, .csv or .jsonl")
    except PromptTableError:
        raise
    except Exception as e:
        raise PromptTableError(f"prompt table {path} does not parse ({type(e).__name__}: {e})") from None
    missing = [c for c, what in schema.PROMPT_TABLE_COLUMNS.items() if what == "required" and c not in table.column_names]
    if missing:
        raise PromptTableError(f"prompt table {path} lacks columns {missing} (has {table.column_names}); columns: "
                               + ", ".join(f"{c} ({w})" for c, w in schema.PROMPT_TABLE_COLUMNS.items()))
    return table.to_pylist()


def expand_requests(rows: list[dict], default_scale: int, default_seed: int, default_n: int,
                    valid_scales: set[int]) -> list[dict]:
    """One request per image to make: row r with n images gives (id, index k, seed + k). A bad row gives one
    failed request with a reason (it is recorded in errors/, never silently dropped)."""
    out = []
    for r, row in enumerate(rows):
        rid = str(row.get("id")) if row.get("id") is not None else f"row{r}"
        prompt, scale, seed, n = row.get("prompt"), row.get("scale"), row.get("seed"), row.get("n")
        base = {"id": rid, "index": 0, "prompt": prompt if isinstance(prompt, str) else None, "scale": None,
                "seed": None}
        reason = None
        scale = default_scale if scale is None else scale
        seed = default_seed + r if seed is None else seed
        n = default_n if n is None else n
        if not isinstance(prompt, str) or not prompt.strip():
            reason = ("empty_prompt", "the prompt is empty or missing")
        elif not isinstance(scale, (int, np.integer)) or int(scale) not in valid_scales:
            reason = ("bad_scale", f"scale {scale!r} is not one of {sorted(valid_scales)}")
        elif not isinstance(seed, (int, np.integer)):
            reason = ("bad_seed", f"seed {seed!r} is not an integer")
        elif not isinstance(n, (int, np.integer)) or int(n) < 1:
            reason = ("bad_n", f"n {n!r} is not a positive integer")
        if reason:
            out.append({**base, "error_stage": "request", "error_reason": reason[0], "error_detail": reason[1]})
            continue
        for k in range(int(n)):
            out.append({**base, "index": k, "scale": int(scale), "seed": int(seed) + k})
    return out


def shard_requests(requests: list[dict], per_shard: int, keep: int = 1) -> dict[str, list[dict]]:
    """Cut requests into output shards of `per_shard` images, keyed the img2dataset way (shard * 10^d + row).

    A request makes `keep` images (best-of-N keeps K; a failed request makes one error row): it reserves that
    many consecutive rows, `idx` and `key` being its first one's, `slots` their count."""
    per_request = max(1, per_shard // keep)  # a request's images stay in one shard
    most = max(per_shard, keep)  # rows a shard can hold
    digits = math.ceil(math.log10(most)) if most > 1 else 0
    shards = {}
    for s in range(math.ceil(len(requests) / per_request)):
        name = f"{s:05d}"
        rows, i = [], 0
        for r in requests[s * per_request:(s + 1) * per_request]:
            slots = keep if r.get("error_reason") is None else 1
            rows.append({**r, "shard": name, "idx": i, "kind": "sample", "slots": slots,
                         "key": f"{s * 10 ** digits + i:0{digits + 5}d}"})
            i += slots
        shards[name] = rows
    return shards


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
    """Actor: requests -> generated images. Holds the Tar MLLM, TA-Tok (its decoder gives the de-tokenizer's
    condition) and the de-tokenizer: AR (+ pixel VQ) by default, or diffusion (SANA)."""

    def __init__(self, mllm: str, tatok: str, detok: str = "ar", ar: str | None = None, vq: str | None = None,
                 diffusion: str | None = None, sampling: dict | None = None, detok_sampling: dict | None = None,
                 dtype: str = "auto", device: str = "auto", compile: bool = False, reflect: dict | None = None):
        import torch

        from tarflow.models.generation import BatchedDecoder, Sampling
        from tarflow.models.mllm import load_tar
        from tarflow.models.tatok import TATok

        self.torch = torch
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        dt = getattr(torch, "bfloat16" if device == "cuda" else "float32") if dtype == "auto" else getattr(torch, dtype)
        self.device = torch.device(device)
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
        """Codes for rows with `prompt` and `seed` (requests, or a request's candidates), one decoder batch."""
        from tarflow.models.mllm import parse_image_codes, t2i_prompt_ids

        n = self.tatok.num_tokens(scale)
        prompts = [t2i_prompt_ids(self.tokenizer, self.vocab, r["prompt"], scale) for r in rows]
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

    @guarded("generate", GENERATED_SCHEMA)
    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for r in rows:
            r.update(ok=False, codes=None, codes_fix=None, width=None, height=None, pixels=None)
        todo = [r for r in rows if r["kind"] == "sample" and r["error_reason"] is None]
        if self.reflect:
            todo_ids = {id(r) for r in todo}
            rows = [r for r in rows if id(r) not in todo_ids]
            for scale in sorted({r["scale"] for r in todo}):
                rows += self._best_of_n([r for r in todo if r["scale"] == scale], scale)
            return pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)
        for scale in sorted({r["scale"] for r in todo}):
            group = [r for r in todo if r["scale"] == scale]
            codes, fixes = self._codes(group, scale)
            pixels = self._pixels(codes, [r["seed"] for r in group])
            for r, c, f, px in zip(group, codes, fixes, pixels):
                r.update(ok=True, codes=c, codes_fix=f, height=px.shape[0], width=px.shape[1],
                         pixels=np.ascontiguousarray(px, dtype=np.uint8).tobytes())
        return pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)

    def _best_of_n(self, group: list[dict], scale: int) -> list[dict]:
        """Requests at one scale -> their K best of N candidates each, as K rows per request (idx, idx + 1, ...).

        All candidates of the group are sampled in one decoder batch and scored in batched forwards; only the
        kept ones are de-tokenized."""
        from tarflow.models.reflect import candidate_seed, rank_candidates

        N, K = self.reflect.candidates, self.reflect.keep
        cands = [{"prompt": r["prompt"], "seed": candidate_seed(r["seed"], c)} for r in group for c in range(N)]
        codes, fixes = self._codes(cands, scale)
        scored = self.scorer.score([c["prompt"] for c in cands], codes)
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

    @guarded("encode_image", ENCODED_SCHEMA)
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
        return pa.Table.from_pylist(rows, schema=ENCODED_SCHEMA)


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

    def __init__(self, cfg: GenerateConfig):
        import tarflow

        self.cfg, self.version = cfg, tarflow.__version__

    def _meta(self, r: dict) -> dict:
        return {"key": r["key"], "id": r["id"], "index": r["index"], "prompt": r["prompt"], "seed": r["seed"],
                "scale": r["scale"], "width": r["width"], "height": r["height"],
                "status": "success" if r["ok"] else "failed_to_generate", "mllm": self.cfg.mllm,
                "detokenizer": self.cfg.detokenizer_id(), "sampling": self.cfg.sampling,
                "detok_sampling": self.cfg.detok_sampling, "codes": r["codes"], "codes_fix": r["codes_fix"],
                "error_message": r["error_detail"]} | (self._reflect_meta(r) if self.cfg.reflect else {})

    @staticmethod
    def _reflect_meta(r: dict) -> dict:
        return {"reflect_score": r["reflect_score"], "reflect_rank": r["reflect_rank"],
                "reflect_candidate": r["reflect_candidate"], "candidates": r["candidates"]}

    def __call__(self, name: str, rows: pa.Table, end: dict, paths: dict) -> ShardWritten:
        ext = "png" if self.cfg.image_format == "png" else "jpg"
        buf = io.BytesIO()
        meta_rows = []
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for r in rows.to_pylist():
                meta = self._meta(r)
                meta_rows.append({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in meta.items()})
                if not r["ok"]:
                    continue
                # members sorted by extension within a sample, as img2dataset's writer does
                members = {ext: r["image"], "json": json.dumps(meta, indent=4).encode(), "txt": r["prompt"].encode()}
                for suffix in sorted(members):
                    info = tarfile.TarInfo(f"{r['key']}.{suffix}")
                    info.size, info.mtime, info.mode = len(members[suffix]), 0, 0o444
                    tar.addfile(info, io.BytesIO(members[suffix]))
        ok, errors, reasons = split_failed(rows, name)
        tar_bytes = buf.getvalue()
        meta_bytes = parquet_bytes(pa.Table.from_pylist(meta_rows)) if meta_rows else b""
        err_bytes = parquet_bytes(errors)
        fixes = {d["values"]: d["counts"] for d in pc.value_counts(ok.column("codes_fix")).to_pylist()}
        storage.write_bytes_atomic(paths["tar"], tar_bytes)
        if meta_bytes:
            storage.write_bytes_atomic(paths["parquet"], meta_bytes)
        stats = {"count": len(rows), "successes": len(ok), "failed_to_generate": len(errors),
                 "status_dict": {"success": len(ok), **reasons}, "tarflow_version": self.version}
        storage.write_bytes_atomic(paths["stats"], json.dumps(stats, indent=4).encode())
        storage.write_bytes_atomic(paths["errors"], err_bytes)
        outputs = {"tar": {"path": paths["tar"], "bytes": len(tar_bytes)},
                   "parquet": {"path": paths["parquet"], "bytes": len(meta_bytes)},
                   "errors": {"path": paths["errors"], "rows": len(errors), "bytes": len(err_bytes)}}
        totals = {f"codes_{k}": v for k, v in fixes.items() if k != "ok"}
        if self.cfg.reflect:
            outputs, totals = self._write_reflect(ok, paths, outputs, totals)
        return ShardWritten(outputs=outputs, totals=totals,
                            counts={"samples_in": len(rows), "ok": len(ok), "failed": len(errors),
                                    "failed_by_reason": reasons})

    def _write_reflect(self, ok: pa.Table, paths: dict, outputs: dict, totals: dict) -> tuple[dict, dict]:
        """The scoring cost as totals (the summary sums them), and reflect/{shard}.parquet if asked for."""
        cols = ok.select(["reflect_tokens", "reflect_seconds", "reflect_rank"]).to_pydict()
        firsts = [i for i, k in enumerate(cols["reflect_rank"]) if k == 0]
        totals = {**totals, "reflect_requests": len(firsts),
                  "reflect_candidates_scored": len(firsts) * self.cfg.candidates,
                  "reflect_tokens_scored": sum(cols["reflect_tokens"][i] or 0 for i in firsts),
                  "reflect_seconds": round(sum(cols["reflect_seconds"][i] or 0.0 for i in firsts), 6)}
        if self.cfg.keep_all_scores:
            data = parquet_bytes(reflect_table(ok.filter(pc.equal(ok.column("reflect_rank"), 0)).to_pylist()))
            storage.write_bytes_atomic(paths["reflect"], data)
            outputs = {**outputs, "reflect": {"path": paths["reflect"], "bytes": len(data)}}
        return outputs, totals


def request_blocks(shards: dict[str, list[dict]], names: list[str], block: int) -> list[pa.Table]:
    """The requests of `names`, shard after shard, each shard's end row right after its last request, cut
    into blocks of `block` rows: a shard completes as soon as its own blocks are through."""
    out = []
    for n in names:
        rows = shards[n] + [end_row(n, sum(r.get("slots", 1) for r in shards[n]))]
        table = pa.Table.from_pylist([{k: r.get(k) for k in REQUEST_SCHEMA.names} for r in rows],
                                     schema=REQUEST_SCHEMA)
        out += [table.slice(i, block) for i in range(0, len(table), block)]
    return out


def run_generate(cfg: GenerateConfig, generator_cls=T2IGenerator) -> JobSummary:
    import ray.data

    from tarflow.pipelines.tokenize import tatok_header

    t0 = time.time()
    cfg.check()
    table_sha = storage.sha256(cfg.prompts)
    rows = read_prompt_table(cfg.prompts)
    _, grid = tatok_header(cfg.tatok)
    requests = expand_requests(rows, cfg.scale, cfg.seed, cfg.n, valid_scales={1, 2, 3} & set(range(1, grid + 1)))
    shards = shard_requests(requests, cfg.samples_per_shard, cfg.keep if cfg.reflect else 1)
    del rows, requests
    facts = cfg.facts(cfg.model_identities())
    layout = generate_layout(cfg.output, cfg.reflect and cfg.keep_all_scores)
    plan = plan_shards(layout, shards, facts, lambda n, m: m.get("input", {}).get("sha256") == table_sha,
                       cfg.overwrite)
    summary = JobSummary(job="generate", unit="images", shards_total=len(shards), shards_skipped=len(plan.done),
                         output=cfg.output, plan_seconds=plan.seconds)
    log.info("%d images in %d shards: %d to do, %d already done", sum(len(v) for v in shards.values()),
             len(shards), len(plan.todo), len(plan.done))
    if plan.todo:
        pool = plan_pool(cfg.device, cfg.gpus_per_worker, cfg.min_workers, cfg.num_workers)
        check_pool_leaves_cpus(pool, cfg.cpus_per_worker, 0.5, "--min-workers", "--cpus-per-worker")
        block = cfg.batch_size or (32 if pool.gpus_per_worker else 4)  # blocks of one batch spread over the pool

        def stages(names: list[str], parts_dir: str):
            ds = ray.data.from_arrow(request_blocks(shards, names, block))
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
