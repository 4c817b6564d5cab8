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
"""
from __future__ import annotations

import hashlib
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
from tarflow.pipelines.sharded import (JobSummary, PartWriter, ShardJob, ShardLayout, ShardWritten, end_row,
                                       file_identity, folder_identity, guarded, parquet_bytes, plan_pool,
                                       plan_shards, run_sharded, split_failed)

log = logging.getLogger("tarflow.generate")

_COMMON = [pa.field("shard", pa.string()), pa.field("idx", pa.int64()), pa.field("key", pa.string()),
           pa.field("kind", pa.string()), pa.field("end_info", pa.string()), pa.field("error_stage", pa.string()),
           pa.field("error_reason", pa.string()), pa.field("error_detail", pa.string()),
           pa.field("id", pa.string()), pa.field("index", pa.int32()), pa.field("prompt", pa.string()),
           pa.field("scale", pa.int32()), pa.field("seed", pa.int64())]
REQUEST_SCHEMA = pa.schema(_COMMON)
_GENERATED = [pa.field("ok", pa.bool_()), pa.field("codes", pa.list_(pa.int32())), pa.field("codes_fix", pa.string()),
              pa.field("width", pa.int32()), pa.field("height", pa.int32())]
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


def shard_requests(requests: list[dict], per_shard: int) -> dict[str, list[dict]]:
    """Cut requests into output shards of `per_shard`, keyed the img2dataset way (shard * 10^d + row)."""
    digits = math.ceil(math.log10(per_shard)) if per_shard > 1 else 0
    shards = {}
    for s in range(math.ceil(len(requests) / per_shard)):
        name = f"{s:05d}"
        part = requests[s * per_shard:(s + 1) * per_shard]
        shards[name] = [{**r, "shard": name, "idx": i, "kind": "sample",
                         "key": f"{s * 10 ** digits + i:0{digits + 5}d}"} for i, r in enumerate(part)]
    return shards


# ----------------------------------------------------------------------------------------------------------
# Stages


class T2IGenerator:
    """Actor: requests -> generated images. Holds the Tar MLLM, TA-Tok (its decoder gives the de-tokenizer's
    condition) and the de-tokenizer: AR (+ pixel VQ) by default, or diffusion (SANA)."""

    def __init__(self, mllm: str, tatok: str, detok: str = "ar", ar: str | None = None, vq: str | None = None,
                 diffusion: str | None = None, sampling: dict | None = None, detok_sampling: dict | None = None,
                 dtype: str = "auto", device: str = "auto", compile: bool = False):
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
        for scale in sorted({r["scale"] for r in todo}):
            group = [r for r in todo if r["scale"] == scale]
            codes, fixes = self._codes(group, scale)
            pixels = self._pixels(codes, [r["seed"] for r in group])
            for r, c, f, px in zip(group, codes, fixes, pixels):
                r.update(ok=True, codes=c, codes_fix=f, height=px.shape[0], width=px.shape[1],
                         pixels=np.ascontiguousarray(px, dtype=np.uint8).tobytes())
        return pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)


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
                "samples_per_shard": self.samples_per_shard}


def generate_layout(output: str) -> ShardLayout:
    return ShardLayout(output, (("tar", "{shard}.tar"), ("parquet", "{shard}.parquet"),
                                ("stats", "{shard}_stats.json"), ("errors", f"{schema.ERRORS_DIR}/{{shard}}.parquet")),
                       schema.GENERATE_MANIFEST_FORMAT, schema.GENERATE_MANIFEST_VERSION)


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
                "error_message": r["error_detail"]}

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
        return ShardWritten(
            outputs={"tar": {"path": paths["tar"], "bytes": len(tar_bytes)},
                     "parquet": {"path": paths["parquet"], "bytes": len(meta_bytes)},
                     "errors": {"path": paths["errors"], "rows": len(errors), "bytes": len(err_bytes)}},
            counts={"samples_in": len(rows), "ok": len(ok), "failed": len(errors), "failed_by_reason": reasons},
            totals={f"codes_{k}": v for k, v in fixes.items() if k != "ok"})


def request_blocks(shards: dict[str, list[dict]], names: list[str], block: int) -> list[pa.Table]:
    """The requests of `names`, shard after shard, each shard's end row right after its last request, cut
    into blocks of `block` rows: a shard completes as soon as its own blocks are through."""
    out = []
    for n in names:
        rows = shards[n] + [end_row(n, len(shards[n]))]
        table = pa.Table.from_pylist([{k: r.get(k) for k in REQUEST_SCHEMA.names} for r in rows],
                                     schema=REQUEST_SCHEMA)
        out += [table.slice(i, block) for i in range(0, len(table), block)]
    return out


def run_generate(cfg: GenerateConfig, generator_cls=T2IGenerator) -> JobSummary:
    import ray.data

    from tarflow.pipelines.tokenize import tatok_header

    t0 = time.time()
    table_sha = storage.sha256(cfg.prompts)
    rows = read_prompt_table(cfg.prompts)
    _, grid = tatok_header(cfg.tatok)
    requests = expand_requests(rows, cfg.scale, cfg.seed, cfg.n, valid_scales={1, 2, 3} & set(range(1, grid + 1)))
    shards = shard_requests(requests, cfg.samples_per_shard)
    del rows, requests
    facts = cfg.facts(cfg.model_identities())
    layout = generate_layout(cfg.output)
    plan = plan_shards(layout, shards, facts, lambda n, m: m.get("input", {}).get("sha256") == table_sha,
                       cfg.overwrite)
    summary = JobSummary(job="generate", unit="images", shards_total=len(shards), shards_skipped=len(plan.done),
                         output=cfg.output, plan_seconds=plan.seconds)
    log.info("%d images in %d shards: %d to do, %d already done", sum(len(v) for v in shards.values()),
             len(shards), len(plan.todo), len(plan.done))
    if plan.todo:
        pool = plan_pool(cfg.device, cfg.gpus_per_worker, cfg.min_workers, cfg.num_workers)
        block = cfg.batch_size or (32 if pool.gpus_per_worker else 4)  # blocks of one batch spread over the pool

        def stages(names: list[str], parts_dir: str):
            ds = ray.data.from_arrow(request_blocks(shards, names, block))
            ds = ds.map_batches(generator_cls, fn_constructor_kwargs=dict(
                mllm=cfg.mllm, tatok=cfg.tatok, detok=cfg.detok, ar=cfg.ar_detok, vq=cfg.vq,
                diffusion=cfg.diffusion_detok, sampling=cfg.sampling, detok_sampling=cfg.detok_sampling,
                dtype=cfg.dtype, device=cfg.device, compile=cfg.compile), batch_size=block, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(min_size=pool.min_workers, max_size=pool.max_workers),
                num_gpus=pool.gpus_per_worker, num_cpus=cfg.cpus_per_worker)
            ds = ds.map_batches(ImageEncoder(cfg.image_format), batch_size=None, batch_format="pyarrow", num_cpus=0.5)
            return ds.map_batches(PartWriter(parts_dir), batch_size=None, batch_format="pyarrow", num_cpus=0.25)

        spec = ShardJob(job="generate", layout=layout, facts=facts, sources=cfg.detokenizer_id() | {"mllm": cfg.mllm},
                        writer=GeneratedShardWriter(cfg), schema_versions={"errors": schema.ERRORS_VERSION})
        inputs = {n: {"prompts": cfg.prompts, "sha256": table_sha} for n in plan.todo}
        run_sharded(spec, inputs, stages, summary, t0, cfg.max_writers, cfg.progress_every_s)
    summary.seconds = time.time() - t0
    return summary
