"""The tokenize job: img2dataset shards, or LLaVA-style conversation tables, -> TA-Tok code Parquet shards, on
Ray Data.

    shard list --ShardReader (tasks: raw bytes, no decoding)
               --ImageDecoder (CPU tasks: decode, convert, resize to TA-Tok's input size [and the VQ's, the VAE's])
               --TATokEncoder (GPU actor pool: one encoder pass, codes at every requested scale [+ VQ codes,
                 latents])
               --PartWriter --> finalize tasks: CodeShardWriter (codes/, errors/), then _manifest/
    (conversation tables: ConversationReader, ConversationDecoder, the same encoder on every image of a row,
     ConversationShardWriter)

Every sample (conversation row) of a shard travels as one row, good or bad, and each shard ends with an "end"
row that carries its sample count; a shard is written only once all its rows have arrived (in parts on the
output's storage, see tarflow.pipelines.sharded), so a shard is never written partially and a killed job redoes
exactly the shards that have no manifest. Rows are keyed by (shard, index): a block replayed by a retried task
cannot duplicate a sample.

With `vq` (training data for the AR de-tokenizer) each image is also resized to vq_resolution x vq_resolution
exactly as for TA-Tok (RGB, PIL bicubic on uint8, aspect not kept, no crop), so that the condition (TA-Tok
codes) and the target (VQ codes) see the same picture, and the pixel VQ encodes it (/255 -> [0, 1]).

With `latents` (training data for the diffusion de-tokenizer) the same again at latent_resolution, encoded by
the VAE (SANA's DC-AE, float32, pixels /127.5 - 1 -> [-1, 1]) on the same actor; the raw latents (C, R/f,
R/f) are stored as float16 (see tarflow.data.schema), so training never decodes an image again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa

from tarflow.data import schema, storage
from tarflow.data.codeshard import (CONVERSATION_FACTS, CodeShardWriter, ConversationShardWriter, TokenizeFacts,
                                    code_shard_layout)
from tarflow.data.images import DEFAULT_MAX_PIXELS
from tarflow.data.img2dataset import DEFAULT_MAX_MEMBER_BYTES, InputError, ShardInput, resolve_inputs
from tarflow.data.schema import conversation_encoded_rows, tokenize_encoded_rows
# the reading and decoding stages, shared with the TA-Tok trainer
from tarflow.pipelines.image_stages import read_and_decode, read_and_decode_conversations
from tarflow.pipelines.sharded import OutputConflict  # noqa: F401  (raised by run_tokenize; jobs catch it)
from tarflow.pipelines.sharded import (DEFAULT_STALL_TIMEOUT_S, JobSummary, PartWriter, ShardJob,
                                       check_pool_leaves_cpus, guarded, plan_pool, plan_shards, run_sharded)

log = logging.getLogger("tarflow.tokenize")



class TATokEncoder:
    """Actor: decoded rows -> rows with TA-Tok codes at every requested scale (one encoder pass), and with
    `vq` the pixel-VQ codes of the `vq_pixels` images, and with `latents` (the run's latents facts) the VAE
    latents of the `latent_pixels` images."""

    def __init__(self, checkpoint: str, scales: Sequence[int], dtype: str = "auto", device: str = "auto",
                 vq: str | None = None, vq_resolution: int = 256, latents: dict | None = None,
                 conversations: bool = False, images_per_call: int = 256):
        import torch

        if conversations and (vq or latents):
            raise ValueError("--vq and --latents are for image-text pairs, not conversation tables")

        from tarflow.models.device import resolve_device_dtype
        from tarflow.models.tatok import TATok
        from tarflow.models.vqvae import VQVAE

        self.torch = torch
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.model = TATok.from_checkpoint(checkpoint).to(self.device, self.dtype)
        self.scales = [int(s) for s in scales]
        # The VQ stays in float32 whatever `dtype`: its codes are argmaxes of cosine similarities, which bf16
        # rounding flips, and they are training targets.
        self.vq = VQVAE.from_checkpoint(vq).to(self.device) if vq else None
        self.vq_facts = vq_facts(self.vq, vq_resolution) if vq else None
        self.latents = latents
        self.vae = None
        if latents:
            from tarflow.models.diffusion_detok import load_vae

            self.vae = load_vae(latents["checkpoint"], self.device)
        self.schema = tokenize_encoded_rows(self.scales, self.model.codebook_size, self.vq_facts, latents)
        self.code_type = schema.code_value_type(self.model.codebook_size)
        self.conversations, self.images_per_call = conversations, max(1, int(images_per_call))
        if conversations:
            self.schema = conversation_encoded_rows(self.scales, self.model.codebook_size)

    def _tatok_codes(self, arr: np.ndarray) -> dict[int, np.ndarray]:
        """(N, S, S, 3) uint8 images -> {scale: (N, tokens) codes}: one encoder pass for every scale."""
        from tarflow.models.tatok import pixels_from_uint8

        x = self.torch.from_numpy(arr)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        by_scale = self.model.encode_scales(pixels_from_uint8(x), self.scales)
        return {s: c.cpu().numpy() for s, c in by_scale.items()}

    @guarded("encode", "schema")
    def __call__(self, batch: pa.Table) -> pa.Table:
        from tarflow.models.tatok import pixels_from_uint8

        if self.conversations:
            return self._encode_conversations(batch)
        torch, S = self.torch, self.model.input_size
        ok = batch.column("ok").to_numpy(zero_copy_only=False)
        idx_ok = np.flatnonzero(ok)
        codes = {}
        if len(idx_ok):
            pix = batch.column("pixels").to_pylist()
            codes = self._tatok_codes(np.stack([np.frombuffer(pix[i], dtype=np.uint8).reshape(S, S, 3)
                                                for i in idx_ok]))
        out = batch.drop_columns(["pixels", "vq_pixels", "latent_pixels"])
        for s in self.scales:
            out = out.append_column(schema.code_column(s), _code_lists(codes.get(s), idx_ok, ok,
                                                                        self.model.num_tokens(s), self.code_type))
        if self.vq is not None:
            f = self.vq_facts
            vq_codes = None
            if len(idx_ok):
                R = f["resolution"]
                pix = batch.column("vq_pixels").to_pylist()
                arr = np.stack([np.frombuffer(pix[i], dtype=np.uint8).reshape(R, R, 3) for i in idx_ok])
                # in chunks of ~2M pixels: the VQ encoder's full-resolution activations of a 256-image batch at
                # 256 px would take tens of GB
                step = max(1, (32 * 256 * 256) // (R * R))
                vq_codes = np.concatenate([
                    self.vq.encode(pixels_from_uint8(torch.from_numpy(arr[i:i + step]).to(self.device))).cpu().numpy()
                    for i in range(0, len(arr), step)])
            out = out.append_column(f["column"], _code_lists(vq_codes, idx_ok, ok, f["num_tokens"],
                                                             schema.code_value_type(f["codebook_size"])))
        if self.vae is not None:
            out = out.append_column(self.latents["column"], self._latents(batch, idx_ok, ok))
        return out.select(self.schema.names).cast(self.schema)

    def _encode_conversations(self, batch: pa.Table) -> pa.Table:
        """Every image of the batch's good rows through the encoder together (`images_per_call` at a time),
        the codes split back per row in image order."""
        S = self.model.input_size
        ok = batch.column("ok").to_numpy(zero_copy_only=False)
        pix = batch.column("pixels").to_pylist()
        counts = np.array([len(pix[i]) if ok[i] else 0 for i in range(len(batch))], dtype=np.int64)
        flat = [np.frombuffer(b, dtype=np.uint8).reshape(S, S, 3) for i in np.flatnonzero(ok) for b in pix[i]]
        parts = [self._tatok_codes(np.stack(flat[i:i + self.images_per_call]))
                 for i in range(0, len(flat), self.images_per_call)]
        out = batch.drop_columns(["pixels"])
        for s in self.scales:
            n = self.model.num_tokens(s)
            codes = np.concatenate([p[s] for p in parts]) if parts else np.zeros((0, n), dtype=np.int64)
            out = out.append_column(schema.code_column(s), _nested_code_lists(codes, counts, ok, n, self.code_type))
        return out.select(self.schema.names).cast(self.schema)

    def _latents(self, batch: pa.Table, idx_ok, ok) -> pa.FixedSizeListArray:
        """The VAE latents of the good rows' `latent_pixels`, float16, one fixed-size list per row (null for
        failed rows)."""
        from tarflow.models.diffusion_detok import encode_latents

        f = self.latents
        R, n = f["resolution"], int(np.prod(f["shape"]))
        flat = np.zeros((len(ok), n), dtype=np.float16)
        if len(idx_ok):
            pix = batch.column("latent_pixels").to_pylist()
            arr = np.stack([np.frombuffer(pix[i], dtype=np.uint8).reshape(R, R, 3) for i in idx_ok])
            # in chunks of ~2M pixels, as for the VQ: a DC-AE's full-resolution activations are the large part
            step = max(1, (32 * 256 * 256) // (R * R))
            lat = np.concatenate([encode_latents(self.vae, self.torch.from_numpy(arr[i:i + step])).cpu().numpy()
                                  for i in range(0, len(arr), step)])  # (k, C, h, w) float32
            if lat.shape[1:] != tuple(f["shape"]):
                raise RuntimeError(f"VAE {f['checkpoint']}: latents of shape {lat.shape[1:]}, expected "
                                   f"{tuple(f['shape'])} from its config")
            flat[idx_ok] = lat.reshape(len(idx_ok), n).astype(np.float16)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.float16()), n,
                                                 mask=pa.array(~ok))


def _code_lists(codes, idx_ok, ok, n: int, value_type: pa.DataType) -> pa.ListArray:
    """(len(idx_ok), n) codes of the good rows -> one list per row of the batch, null for failed rows."""
    np_type = value_type.to_pandas_dtype()
    flat = np.zeros((len(ok), n), dtype=np_type)
    if len(idx_ok):
        flat[idx_ok] = codes.astype(np_type)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (len(ok) + 1) * n, n, dtype=np.int32)),
                                    pa.array(flat.reshape(-1), type=value_type), mask=pa.array(~ok))


def _nested_code_lists(codes, counts, ok, n: int, value_type: pa.DataType) -> pa.ListArray:
    """(sum(counts), n) codes, rows' images in order -> one list of per-image code lists per row (an empty list
    for a text-only row, null for a failed row)."""
    np_type = value_type.to_pandas_dtype()
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, (len(codes) + 1) * n, n, dtype=np.int32)),
                                     pa.array(codes.astype(np_type).reshape(-1), type=value_type))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), inner, mask=pa.array(~ok))


def vq_facts(vq, resolution: int) -> dict:
    """What a code shard records about its VQ codes (manifest, footer): a rerun with others must not mix."""
    return _vq_facts(vq.path, vq.sha256, vq.codebook_size, vq.downsample, resolution)


def _vq_facts(path: str, sha: str, codebook_size: int, downsample: int, resolution: int) -> dict:
    d = downsample
    if resolution < d or resolution % d:
        raise ValueError(f"--vq-resolution {resolution} is not a positive multiple of the VQ's downsample "
                         f"factor {d} ({path})")
    return {"checkpoint": path, "sha256": sha, "codebook_size": int(codebook_size), "downsample": d,
            "resolution": int(resolution), "num_tokens": (resolution // d) ** 2,
            "column": schema.vq_column(resolution, d),
            "preprocess": "RGB, PIL bicubic resize of the uint8 image to resolution^2 (aspect not kept), /255"}


def latents_facts(path: str, resolution: int) -> dict:
    """What a code shard records about its latents (manifest, footer), from the VAE's config alone (no weights
    read on the driver): the VAE by content hash of its folder, the shape and the column. Raises ValueError /
    FileNotFoundError (one line, naming the path and the fix)."""
    from tarflow.models.diffusion_detok import vae_config, vae_downsample, vae_folder
    from tarflow.data.shards import folder_identity

    folder = vae_folder(path)
    cfg = vae_config(folder)
    f = vae_downsample(cfg)
    if resolution < f or resolution % f:
        raise ValueError(f"--latent-resolution {resolution} is not a positive multiple of the VAE's downsample "
                         f"factor {f} ({folder})")
    c, side = int(cfg["latent_channels"]), resolution // f
    return {"checkpoint": path, "sha256": folder_identity(folder)["sha256"], "class": cfg["_class_name"],
            "latent_channels": c, "downsample": f, "resolution": int(resolution), "shape": [c, side, side],
            "dtype": "float16", "scaling_factor": float(cfg.get("scaling_factor", 1.0)),
            "column": schema.latents_column(resolution), "version": schema.LATENTS_VERSION,
            "preprocess": "RGB, PIL bicubic resize of the uint8 image to resolution^2 (aspect not kept), "
                          "/127.5 - 1; the encoder's latents, unscaled"}


# ----------------------------------------------------------------------------------------------------------
# Driver side


@dataclass
class TokenizeConfig:
    input: str | list[str]
    output: str
    tatok: str
    scales: list[int] = field(default_factory=lambda: [1, 2, 3])
    input_format: str = "auto"
    overwrite: bool = False
    exif_transpose: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    read_chunk: int = 64
    decode_batch_size: int = 32
    encode_batch_size: int | None = None  # default: 256 on GPU, 32 on CPU
    num_encoders: int | None = None  # most encoder actors; default: every GPU the cluster has or can add, 1 on CPU
    min_encoders: int = 1  # the autoscaling pool never shrinks below this
    gpus_per_encoder: float | None = None  # default: 1 when the cluster has or can add GPUs (or device cuda)
    cpus_per_encoder: float = 1.0
    decode_cpus: float | None = None  # default: 1 with GPUs, 0.5 without
    max_concurrent_shards: int = 8  # shards read at once
    max_writers: int = 8  # shards assembled and written at once (finalize tasks)
    # memory each encoder actor reserves (bytes); None: 4x the checkpoints' size, at least 512 MiB; 0: none, for
    # autoscalers whose node types declare no memory (a reservation they cannot see is never satisfied)
    encoder_memory: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_shards: int | None = None
    progress_every_s: float = 10.0
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S  # no rows for this long, the cluster not growing: stop
    vq: str | None = None  # pixel VQ checkpoint: also store its codes (AR de-tokenizer training data)
    vq_resolution: int = 256  # the de-tokenizer's resolution: images are resized to this square for the VQ
    # AutoencoderDC folder, or a SANA pipeline folder (its vae/): also store latents (diffusion de-tok training data)
    latents: str | None = None
    latent_resolution: int = 512  # images are resized to this square for the VAE
    image_root: str | None = None  # conversation tables: where relative image paths are read from (local or s3://)


def model_facts(cfg: TokenizeConfig, conversations: bool = False) -> TokenizeFacts:
    """The facts of a run from the checkpoints' headers and content hashes; no model is built (the driver
    of a job over a 2.4 GB TA-Tok reads a few hundred KB of it and hashes the rest in a stream)."""
    from tarflow.data.checkpoint_header import HeaderError, read_header
    from tarflow.models.checkpoint import CheckpointError
    from tarflow.models.tatok import tatok_header

    args, grid = tatok_header(cfg.tatok)
    for s in cfg.scales:
        if not 1 <= s <= grid:
            raise ValueError(f"--scales: pool scale {s} is out of range 1..{grid} for this TA-Tok ({cfg.tatok})")
    vq = None
    if cfg.vq:
        from tarflow.models.vqvae import config_from_state_dict

        try:
            sd = read_header(cfg.vq).get("model")
        except FileNotFoundError:
            raise CheckpointError(cfg.vq, "file not found", "check the --vq path") from None
        except (HeaderError, AttributeError) as e:
            raise CheckpointError(cfg.vq, f"not a VQ checkpoint ({e})", "give vq_ds16_t2i.pt") from None
        vq_cfg = config_from_state_dict(sd or {}, cfg.vq)
        vq = _vq_facts(cfg.vq, storage.sha256(cfg.vq), vq_cfg.codebook_size, 2 ** (len(vq_cfg.ch_mult) - 1),
                       cfg.vq_resolution)
    return TokenizeFacts(
        checkpoint=cfg.tatok, checkpoint_sha256=storage.sha256(cfg.tatok), model_args=args.raw,
        codebook_size=args.codebook_size, input_size=args.input_size, scales=list(cfg.scales),
        options={"exif_transpose": cfg.exif_transpose, "max_pixels": cfg.max_pixels}, vq=vq,
        latents=latents_facts(cfg.latents, cfg.latent_resolution) if cfg.latents else None,
        conversations=dict(CONVERSATION_FACTS) if conversations else None,
        image_root=cfg.image_root if conversations else None,
    )


def build_dataset(shards: list[ShardInput], cfg: TokenizeConfig, facts: TokenizeFacts, parts_dir: str | None,
                  encoder_cls=TATokEncoder, encoder_kwargs: dict | None = None):
    """The Ray Dataset of the job: read -> decode -> encode -> PartWriter (without `parts_dir`: the encoded
    rows themselves, for benchmarks). `encoder_cls` may be a TATokEncoder subclass (extra constructor
    arguments in `encoder_kwargs`)."""
    import ray.data

    pool = plan_pool(cfg.device, cfg.gpus_per_encoder, cfg.min_encoders, cfg.num_encoders)
    enc_bs = cfg.encode_batch_size or (256 if pool.gpus_per_worker else 32)
    # Without GPUs the encoder shares the CPUs: smaller decode reservations keep a 2-CPU laptop from starving
    # one stage while another holds its reservation.
    decode_cpus = cfg.decode_cpus if cfg.decode_cpus is not None else (1.0 if pool.gpus_per_worker else 0.5)
    check_pool_leaves_cpus(pool, cfg.cpus_per_encoder, max(decode_cpus, 0.25), "--min-encoders", "--cpus-per-encoder")
    log.info("encoders: %d..%d actors, %g GPU each; batch %d", pool.min_workers, pool.max_workers,
             pool.gpus_per_worker, enc_bs)
    # Stages stay separate because their resource requests differ (Ray Data fuses adjacent map stages whose
    # requests match): reading must not decode, and CPU decoding must overlap accelerator inference. The
    # encoder's memory request (room for its model) makes it distinct even when CPU counts coincide.
    vae_bytes = 0
    if facts.latents:  # the VAE's own folder (a pipeline folder's vae/: never its text encoder)
        from tarflow.models.diffusion_detok import vae_folder

        vae_bytes = sum(storage.list_sizes(vae_folder(facts.latents["checkpoint"]), recursive=True).values())
    encoder_memory = cfg.encoder_memory if cfg.encoder_memory is not None else max(
        512 << 20, 4 * (storage.size(cfg.tatok) + (storage.size(cfg.vq) if cfg.vq else 0) + vae_bytes))
    if facts.conversations:
        ds = read_and_decode_conversations(shards, cfg, facts.input_size, decode_cpus)
        encoder_kwargs = {"conversations": True, "images_per_call": enc_bs, **(encoder_kwargs or {})}
    else:
        ds = read_and_decode(shards, cfg, facts.input_size, decode_cpus, facts.vq["resolution"] if facts.vq else None,
                             facts.latents["resolution"] if facts.latents else None)
    ds = ds.map_batches(encoder_cls, fn_constructor_kwargs=dict(checkpoint=cfg.tatok, scales=cfg.scales,
                                                                dtype=cfg.dtype, device=cfg.device,
                                                                vq=cfg.vq, vq_resolution=cfg.vq_resolution,
                                                                latents=facts.latents,
                                                                **(encoder_kwargs or {})),
                        batch_size=enc_bs, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(min_size=pool.min_workers, max_size=pool.max_workers),
                        num_gpus=pool.gpus_per_worker, num_cpus=cfg.cpus_per_encoder,
                        **({"memory": encoder_memory} if encoder_memory else {}))
    if parts_dir is None:
        return ds
    return ds.map_batches(PartWriter(parts_dir), batch_size=None, batch_format="pyarrow", num_cpus=0.25)


TokenizeSummary = JobSummary


def input_is_conversations(shards: list[ShardInput], cfg: TokenizeConfig) -> bool:
    """Whether the job reads conversation tables (then all its inputs must be; --vq and --latents do not apply).
    Raises InputError (one line)."""
    kinds = {s.format == "conversations" for s in shards}
    if len(kinds) > 1:
        conv = next(s.path for s in shards if s.format == "conversations")
        other = next(s.path for s in shards if s.format != "conversations")
        raise InputError(f"--input mixes conversation tables ({conv}) and img2dataset shards ({other}); their "
                         "outputs differ: tokenize each kind into its own --output")
    if True in kinds and (cfg.vq or cfg.latents):
        flag = "--vq" if cfg.vq else "--latents"
        raise InputError(f"{flag} with conversation tables: VQ codes and latents are the de-tokenizers' training "
                         f"data, made from image-text pairs; drop {flag}, or give img2dataset shards")
    return True in kinds


def run_tokenize(cfg: TokenizeConfig, encoder_cls=TATokEncoder, encoder_kwargs: dict | None = None,
                 shards: list[ShardInput] | None = None) -> JobSummary:
    """`shards`: cfg.input already resolved (by the job's check), else resolved here."""
    t0 = time.time()
    shards = shards or resolve_inputs(cfg.input, cfg.input_format)
    if cfg.max_shards:
        shards = shards[: cfg.max_shards]
    conversations = input_is_conversations(shards, cfg)
    facts = model_facts(cfg, conversations)
    layout = code_shard_layout(cfg.output)
    by_name = {s.name: s for s in shards}

    def same_input(name, manifest):
        return manifest.get("input", {}).get("size") == by_name[name].size

    plan = plan_shards(layout, by_name, facts.facts(), same_input, cfg.overwrite)
    summary = JobSummary(job="tokenize", shards_total=len(shards), shards_skipped=len(plan.done), output=cfg.output,
                         plan_seconds=plan.seconds)
    log.info("%d input shards: %d to do, %d already done (skipped); planned in %.1f s", len(shards),
             len(plan.todo), len(plan.done), plan.seconds)
    if plan.todo:
        spec = ShardJob(job="tokenize", layout=layout, facts=facts.facts(), sources=facts.sources(),
                        writer=ConversationShardWriter(facts) if conversations else CodeShardWriter(facts),
                        schema_versions={("conversation_shard" if conversations else "code_shard"):
                                         schema.CONVERSATION_SHARD_VERSION if conversations
                                         else schema.CODE_SHARD_VERSION, "errors": schema.ERRORS_VERSION})
        inputs = {n: {"path": by_name[n].path, "size": by_name[n].size, "format": by_name[n].format}
                  for n in plan.todo}
        run_sharded(spec, inputs, lambda names, parts: build_dataset([by_name[n] for n in names], cfg, facts, parts,
                                                                     encoder_cls, encoder_kwargs),
                    summary, t0, cfg.max_writers, cfg.progress_every_s, stall_timeout_s=cfg.stall_timeout_s)
    summary.seconds = time.time() - t0
    return summary
