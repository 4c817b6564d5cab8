"""TA-Tok: the text-aligned image tokenizer of Tar, in plain PyTorch.

    pixels (B, 3, S, S) in [0, 1]
      -> scale layer (x - 0.5) / 0.5
      -> SigLIP vision encoder, only up to the selected layer (hidden_states[select_layer_id], no post-LN)
                                                                           (B, g*g, C)   g = S / patch
      -> average pool, kernel = stride = s, floor                         (B, (g//s)^2, C)
      -> encode_task_layer: Linear(C, C) + Tanh
      -> bottleneck.in_linear: Linear(C, D)                                (B, n, D)
      -> simvq: argmax_k cos(z, normalize(embedding_proj(E))_k)           (B, n) codes in [0, K)

    codes (B, n)
      -> codebook rows (normalised) -> bottleneck.out_linear               (B, n, D)
      -> Siglip2-style decoder (patch 1, D channels, 16x16 position table resized to sqrt(n)) + post-LN
      -> decode_task_layer: Linear, Tanh, Linear                           (B, n, C)  "rec" features

The encoder's and decoder's transformer layers (and the encoder's patch and position embeddings) are
transformers' own SigLIP / Siglip2 modules; only the decoder's position-table resize is written here (see
Siglip2Embeddings for why). The checkpoint format is the reference's: `{'model': {'args': ARGS, 'sd': state_dict}}`. Module and parameter
names below follow that state dict so it loads strictly, key for key.
"""
from __future__ import annotations

import copy
import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tarflow.data import storage
from tarflow.models.checkpoint import CheckpointError, load_state_dict_strict, read_checkpoint, unwrap_model_entry

# ----------------------------------------------------------------------------------------------------------
# Configs


@dataclass
class VisionConfig:
    """The fields of a (Siglip|Siglip2)VisionConfig that the architecture depends on."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    num_patches: int = 256  # Siglip2 only: size of the learned position table (16 x 16)

    @classmethod
    def from_json(cls, cfg: Mapping[str, Any]) -> "VisionConfig":
        cfg = cfg.get("vision_config", cfg)  # a full SiglipConfig or a bare vision config
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in cfg.items() if k in known})


# google/siglip2-so400m-patch14-384, the real TA-Tok's teacher; built in so that no download is ever needed.
SIGLIP2_SO400M_384 = VisionConfig(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
)
BUILTIN_TEACHERS = {"google/siglip2-so400m-patch14-384": SIGLIP2_SO400M_384}


@dataclass
class TATokArgs:
    """ARGS of the reference checkpoint, parsed and checked."""

    input_size: int
    teacher: str
    bottleneck_dim: int
    codebook_size: int
    l2_normalized: bool = True
    stochastic: bool = True
    stochastic_temperature: float = 0.03
    bottleneck_token_num: int = 729
    pool_scale: int = 1
    decoder_depth: int = 3
    select_layer_id: int = -2
    raw: dict = field(default_factory=dict, repr=False)  # the args exactly as stored, written back on save

    @classmethod
    def from_ckpt_args(cls, args: Mapping[str, Any], path: str = "<args>") -> "TATokArgs":
        try:
            bn = args["bottleneck"]["args"]
            reg = bn["regularizer"]
            if reg.get("name", "simvq") != "simvq":
                raise CheckpointError(path, f"regularizer {reg.get('name')!r} is not supported (only 'simvq')")
            ra = reg["args"]
            return cls(
                input_size=int(args["input_size"]),
                teacher=str(args["teacher"]),
                bottleneck_dim=int(bn["bottleneck_dim"]),
                codebook_size=int(ra["codebook_size"]),
                l2_normalized=bool(ra.get("l2_normalized", True)),
                stochastic=bool(ra.get("stochastic", True)),
                stochastic_temperature=float(ra.get("stochastic_temperature", 0.03)),
                bottleneck_token_num=int(args.get("bottleneck_token_num", 729)),
                pool_scale=int(args.get("pool_scale", 1)),
                decoder_depth=int(args.get("decoder_depth", 3)),
                select_layer_id=int(args.get("select_layer_id", -2)),
                raw=copy.deepcopy(dict(args)),
            )
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(path, f"args are not TA-Tok args ({type(e).__name__}: {e})") from None


def resolve_teacher(teacher: str, ckpt_path: str | None = None) -> VisionConfig:
    """The encoder's config: a built-in hub id, or a folder with config.json (as given, then next to the ckpt)."""
    if teacher in BUILTIN_TEACHERS:
        return copy.deepcopy(BUILTIN_TEACHERS[teacher])
    candidates = [teacher]
    if ckpt_path is not None and not storage.is_remote(teacher) and not teacher.startswith("/"):
        candidates.append(storage.join(storage.dirname(ckpt_path), teacher))
    for folder in candidates:
        cfg_path = storage.join(folder, "config.json")
        if storage.exists(cfg_path):
            return VisionConfig.from_json(json.loads(storage.read_bytes(cfg_path)))
    raise CheckpointError(
        ckpt_path or teacher,
        f"teacher {teacher!r} is neither a built-in config ({', '.join(BUILTIN_TEACHERS)}) nor a folder with "
        f"config.json (looked in {candidates})",
        "put the encoder's config.json in a folder next to the checkpoint, named as the teacher arg",
    )


def tatok_header(path: str):
    """(TATokArgs, grid) of a TA-Tok checkpoint from its header alone: no weights read, no model built."""
    from tarflow.data.checkpoint_header import HeaderError, read_header

    try:
        header = read_header(path)
    except FileNotFoundError:
        raise CheckpointError(path, "file not found", "check the path; s3:// paths need AWS credentials") from None
    except HeaderError as e:
        raise CheckpointError(path, str(e), "is this the reference ta_tok.pth?") from None
    entry = header.get("model") if isinstance(header, dict) else None
    if not isinstance(entry, dict) or "args" not in entry or "sd" not in entry:
        raise CheckpointError(path, "expected the reference format {'model': {'args', 'sd'}}",
                              "is this the right kind of checkpoint for TA-Tok?")
    args = TATokArgs.from_ckpt_args(entry["args"], path)
    enc = resolve_teacher(args.teacher, path)
    return args, enc.image_size // enc.patch_size


# ----------------------------------------------------------------------------------------------------------
# Encoder and decoder: transformers' own SigLIP / Siglip2 vision modules (embeddings, encoder layers, heads),
# held in containers named as the reference's state dict names them. transformers' top-level vision models are
# not used as such: their module layout (and so their state-dict keys) differs across transformers releases,
# and they always run every layer, where TA-Tok needs only the first `select_layer_id` ones. transformers is
# imported when a model is built, not with this module: the CPU decoders import resize_uint8 from here.


def _hf_vision_config(cfg: VisionConfig, siglip2: bool):
    """The transformers (Siglip|Siglip2)VisionConfig of `cfg`, with SDPA attention, as the reference ran."""
    if siglip2:
        from transformers import Siglip2VisionConfig as Config
    else:
        from transformers import SiglipVisionConfig as Config
    fields = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_channels=cfg.num_channels, patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps,
                  hidden_act=cfg.hidden_act)
    hf = Config(**fields, **({"num_patches": cfg.num_patches} if siglip2 else {"image_size": cfg.image_size}))
    hf._attn_implementation = "sdpa"  # F.scaled_dot_product_attention, no mask: full bidirectional attention
    return hf


def _run_layers(layers: Iterable[nn.Module], h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
    for layer in layers:
        h = layer(h, None)  # no attention mask: every image has all its tokens
        if isinstance(h, tuple):  # transformers 4.x's layers return (hidden_states, ...)
            h = h[0]
    return h


class LayerStack(nn.Module):
    def __init__(self, layers: Iterable[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class SiglipEncoder(nn.Module):
    """SigLIP vision tower: (B, 3, S, S) -> (B, g*g, C), the output of its first n layers (no post-LN)."""

    def __init__(self, cfg: VisionConfig, with_head: bool = True):
        super().__init__()
        from transformers.models.siglip.modeling_siglip import (
            SiglipEncoderLayer, SiglipMultiheadAttentionPoolingHead, SiglipVisionEmbeddings)

        self.cfg = cfg
        hf = _hf_vision_config(cfg, siglip2=False)
        self.embeddings = SiglipVisionEmbeddings(hf)  # conv patchify, learned positions (g*g, C)
        self.encoder = LayerStack(SiglipEncoderLayer(hf) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if with_head:
            self.head = SiglipMultiheadAttentionPoolingHead(hf)  # in the checkpoints, never used by TA-Tok

    def forward(self, x, n_layers: int):  # (B, 3, S, S) -> (B, g*g, C)
        return _run_layers(self.encoder.layers[:n_layers], self.embeddings(x))


class Siglip2Embeddings(nn.Module):
    """Siglip2's embeddings for a square grid of n "patches" (here codebook vectors, patch size 1): a linear
    patch embedding plus the 16 x 16 position table resized to sqrt(n) x sqrt(n).

    Kept by hand, not transformers' Siglip2VisionEmbeddings: the reference (transformers 4.50) resizes the table
    with F.interpolate(bilinear, antialias); transformers 5.x computes the same resize as a weight-matrix
    product, which rounds differently, and which version does what changes within tarflow's transformers range.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)
        self.table_side = int(math.isqrt(cfg.num_patches))

    def positions(self, side: int, dtype) -> torch.Tensor:  # -> (side*side, C)
        table = self.position_embedding.weight
        C = table.shape[-1]
        grid = table.reshape(self.table_side, self.table_side, C).permute(2, 0, 1).unsqueeze(0)  # (1, C, 16, 16)
        # antialiased bilinear is not implemented for half types on CPU: resize in float32 there
        work = grid.float() if grid.device.type == "cpu" else grid
        grid = F.interpolate(work, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return grid.reshape(C, side * side).transpose(0, 1).to(dtype)

    def forward(self, x):  # (B, n, D) -> (B, n, C)
        side = math.isqrt(x.shape[1])
        h = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        return h + self.positions(side, h.dtype)


class Siglip2Decoder(nn.Module):
    """Siglip2 vision tower over codebook vectors: (B, n, D) -> (B, n, C), all layers, then post-LN."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from transformers.models.siglip2.modeling_siglip2 import (
            Siglip2EncoderLayer, Siglip2MultiheadAttentionPoolingHead)

        hf = _hf_vision_config(cfg, siglip2=True)
        self.embeddings = Siglip2Embeddings(cfg)
        self.encoder = LayerStack(Siglip2EncoderLayer(hf) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = Siglip2MultiheadAttentionPoolingHead(hf)  # in the checkpoints, never used by TA-Tok

    def forward(self, x):  # (B, n, D) -> (B, n, C)
        return self.post_layernorm(_run_layers(self.encoder.layers, self.embeddings(x)))


class DecoderWrapper(nn.Module):
    """Holds the decoder under `vision_model`, as the reference's state dict names it."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = Siglip2Decoder(cfg)

    def forward(self, x):
        return self.vision_model(x)


# ----------------------------------------------------------------------------------------------------------
# Bottleneck and quantizer


class SimVQ(nn.Module):
    """Text-aligned codebook: entries are proj(E), L2-normalised when `l2_normalized`."""

    def __init__(self, codebook_size: int, dim: int, l2_normalized: bool, stochastic: bool):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        self.embedding_proj = nn.Linear(dim, dim)
        self.l2_normalized, self.stochastic = l2_normalized, stochastic
        self._cache: tuple | None = None

    def codebook(self) -> torch.Tensor:  # (K, D) float32, cached: recomputing it is K*D*D flops per call
        w, p = self.embedding.weight, self.embedding_proj.weight
        key = (w.device, w._version, p._version, id(w), id(p), self.training)
        if self.training or self._cache is None or self._cache[0] != key:
            with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
                e = F.linear(w.float(), p.float(), self.embedding_proj.bias.float())
                if self.l2_normalized:
                    e = F.normalize(e, dim=-1)
            if self.training:
                return e
            self._cache = (key, e)
        return self._cache[1]

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> torch.Tensor:  # (B, n, D) -> (B, n) int64
        e = self.codebook()
        z = z.float()
        if self.stochastic:
            # The reference's deterministic eval path: argmax of softmax(cos / T) == argmax of cosine similarity.
            # tarflow never samples codes: the same image always gives the same codes.
            return (F.normalize(z, dim=-1) @ e.t()).argmax(dim=-1)
        if self.l2_normalized:
            z = F.normalize(z, dim=-1)
        # nearest entry by squared L2 distance |z|^2 + |e|^2 - 2 z.e
        d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * (z @ e.t())
        return d.argmin(dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:  # (B, n) -> (B, n, D) float32
        return F.embedding(codes, self.codebook())

    CHUNK = 4096  # tokens per similarity matrix in quantize_train

    def _nearest(self, z: torch.Tensor, e: torch.Tensor, temperature: float | None) -> torch.Tensor:
        """(N, D) -> (N,) codes: cosine argmax (as `quantize`), a sample of softmax(cos / T), or squared L2."""
        if self.stochastic and temperature:
            probs = torch.softmax((F.normalize(z, dim=-1) @ e.t()) / temperature, dim=-1)
            return torch.multinomial(probs, 1)[:, 0]
        if self.stochastic or self.l2_normalized:
            return (F.normalize(z, dim=-1) @ e.t()).argmax(dim=-1)
        return (z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * (z @ e.t())).argmin(dim=-1)

    def quantize_train(self, z: torch.Tensor, temperature: float | None = None):
        """The training path (LARP-style SimVQ): (B, n, D) -> (z_q, codes, commitment, codebook).

        z is L2-normalised when `l2_normalized`; codes are the nearest entries (cosine argmax, as `quantize`), or
        sampled from softmax(cos / temperature) when `temperature` is given (the reference samples in train mode
        when `stochastic`). z_q = z + (q - z).detach() (straight-through: the decoder's gradient reaches the
        encoder unchanged); commitment = |z - sg(q)|^2 pulls the encoder to its code, codebook = |sg(z) - q|^2
        pulls the code (through `embedding_proj`: `embedding` itself is frozen) to the encoder. Means over
        tokens and dims; the caller weights them (reference: 0.25 and 1.0). All float32.
        """
        e = self.codebook()  # (K, D), differentiable in embedding_proj in train mode
        z = z.float()
        if self.l2_normalized:
            z = F.normalize(z, dim=-1)
        with torch.no_grad():
            # in chunks of tokens: at K = 65,536 the similarities of a whole batch (32 x 729 tokens) would take 6 GB
            flat = z.detach().flatten(0, -2)  # (B*n, D)
            codes = torch.cat([self._nearest(flat[i:i + self.CHUNK], e, temperature)
                               for i in range(0, len(flat), self.CHUNK)]).view(z.shape[:-1])
        q = F.embedding(codes, e)  # (B, n, D)
        commitment = F.mse_loss(z, q.detach())
        codebook = F.mse_loss(q, z.detach())
        return z + (q - z).detach(), codes, commitment, codebook


class Bottleneck(nn.Module):
    def __init__(self, in_dim: int, args: TATokArgs):
        super().__init__()
        self.in_linear = nn.Linear(in_dim, args.bottleneck_dim)
        self.out_linear = nn.Linear(args.bottleneck_dim, args.bottleneck_dim)
        self.regularizer = SimVQ(args.codebook_size, args.bottleneck_dim, args.l2_normalized, args.stochastic)


class ScaleLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("scale", torch.full((1, 3, 1, 1), 0.5))

    def forward(self, x):
        return (x - self.shift) / self.scale


# ----------------------------------------------------------------------------------------------------------
# TA-Tok


class TATok(nn.Module):
    def __init__(self, args: TATokArgs, encoder_cfg: VisionConfig):
        super().__init__()
        self.args, self.encoder_cfg = args, encoder_cfg
        C = encoder_cfg.hidden_size
        if encoder_cfg.image_size != args.input_size:
            raise ValueError(f"encoder image_size {encoder_cfg.image_size} != input_size {args.input_size}")
        self.scale_layer = ScaleLayer()
        self.encoder = SiglipEncoder(encoder_cfg)
        self.encode_task_layer = nn.Sequential(nn.Linear(C, C), nn.Tanh())
        self.bottleneck = Bottleneck(C, args)
        dec_cfg = VisionConfig(  # Siglip2VisionConfig() defaults with only these four fields changed
            hidden_size=C, num_hidden_layers=args.decoder_depth, num_channels=args.bottleneck_dim, patch_size=1,
        )
        self.decoder = DecoderWrapper(dec_cfg)
        self.decode_task_layer = nn.Sequential(nn.Linear(C, C), nn.Tanh(), nn.Linear(C, C))
        L = encoder_cfg.num_hidden_layers
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i
        self.n_encoder_layers = args.select_layer_id if args.select_layer_id >= 0 else L + 1 + args.select_layer_id
        if not 0 <= self.n_encoder_layers <= L:
            raise ValueError(f"select_layer_id {args.select_layer_id} is out of range for {L} encoder layers")
        self.grid = encoder_cfg.image_size // encoder_cfg.patch_size
        self.path: str | None = None
        self.sha256: str | None = None

    # -- properties users need -------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.args.input_size

    @property
    def codebook_size(self) -> int:
        return self.args.codebook_size

    def num_tokens(self, pool_scale: int) -> int:
        return (self.grid // pool_scale) ** 2

    # -- loading ----------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, *, stochastic: bool | None = None, l2_normalized: bool | None = None,
                        keep_unused: bool = False) -> "TATok":
        """Load a reference-format TA-Tok checkpoint (local or s3://) strictly.

        `stochastic` / `l2_normalized` override the regularizer args (the reference's non-stochastic variant).
        The encoder layers after select_layer_id, its post-layernorm and head are checked on load and then
        dropped unless `keep_unused`: they are never computed, so they need not take memory.
        """
        ckpt = read_checkpoint(path)
        entry = unwrap_model_entry(ckpt, ("args", "sd"))
        args = TATokArgs.from_ckpt_args(entry["args"], path)
        if stochastic is not None:
            args.stochastic = stochastic
            args.raw["bottleneck"]["args"]["regularizer"]["args"]["stochastic"] = stochastic
        if l2_normalized is not None:
            args.l2_normalized = l2_normalized
            args.raw["bottleneck"]["args"]["regularizer"]["args"]["l2_normalized"] = l2_normalized
        enc_cfg = resolve_teacher(args.teacher, path)
        try:
            model = cls(args, enc_cfg)
        except ValueError as e:
            raise CheckpointError(path, f"inconsistent args: {e}") from None
        sd = entry["sd"]
        if not isinstance(sd, Mapping):
            raise CheckpointError(path, f"ckpt['model']['sd'] is a {type(sd).__name__}, not a state dict")
        sd = {k: v for k, v in sd.items() if not k.startswith("teacher.")}
        load_state_dict_strict(model, sd, path)
        if not keep_unused:
            model.drop_unused()
        model.path, model.sha256 = path, ckpt.sha256
        return model.eval()

    def drop_unused(self) -> None:
        enc = self.encoder
        enc.encoder.layers = enc.encoder.layers[: self.n_encoder_layers]
        for name in ("post_layernorm", "head"):
            if hasattr(enc, name):
                delattr(enc, name)
        if hasattr(self.decoder.vision_model, "head"):
            del self.decoder.vision_model.head

    def checkpoint_dict(self) -> dict:
        """The reference format, for saving (`torch.save(model.checkpoint_dict(), path)`)."""
        return {"model": {"args": copy.deepcopy(self.args.raw), "sd": self.state_dict()}}

    # -- preprocessing ----------------------------------------------------------------------------------
    def preprocess(self, images: Iterable) -> torch.Tensor:
        """PIL images -> (B, 3, S, S) float32 in [0, 1], exactly as the reference: RGB, PIL bicubic resize of
        the uint8 image to S x S (aspect not kept, no crop), / 255."""
        return torch.stack([preprocess_image(im, self.input_size) for im in images])

    # -- encoding ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, g*g, C) hidden_states[select_layer_id] of the encoder."""
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"expected pixels of shape (B, 3, {self.input_size}, {self.input_size}), "
                             f"got {tuple(pixels.shape)}; use TATok.preprocess")
        dtype = self.encode_task_layer[0].weight.dtype
        x = self.scale_layer(pixels.to(self.scale_layer.shift.device, torch.float32)).to(dtype)
        return self.encoder(x, self.n_encoder_layers)

    @staticmethod
    def pool(feats: torch.Tensor, pool_scale: int) -> torch.Tensor:  # (B, g*g, C) -> (B, (g//s)^2, C)
        if pool_scale == 1:
            return feats
        B, T, C = feats.shape
        g = math.isqrt(T)
        grid = feats.transpose(1, 2).reshape(B, C, g, g)
        grid = F.avg_pool2d(grid, kernel_size=pool_scale, stride=pool_scale)  # floor: remainder dropped
        return grid.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def quantize_features(self, feats: torch.Tensor, pool_scale: int) -> torch.Tensor:
        z = self.bottleneck.in_linear(self.encode_task_layer(self.pool(feats, pool_scale)))  # (B, n, D)
        return self.bottleneck.regularizer.quantize(z)

    @torch.no_grad()
    def encode_scales(self, pixels: torch.Tensor, pool_scales: Sequence[int]) -> dict[int, torch.Tensor]:
        """Codes at several pool scales from one encoder pass: {scale: (B, n_scale) int64}."""
        for s in pool_scales:
            if not 1 <= int(s) <= self.grid:
                raise ValueError(f"pool scale {s} is out of range 1..{self.grid}")
        feats = self.encode_features(pixels)
        return {int(s): self.quantize_features(feats, int(s)) for s in pool_scales}

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, pool_scale: int = 1) -> torch.Tensor:
        """(B, 3, S, S) float in [0, 1] -> (B, n) int64 codes; n = (g // pool_scale)^2."""
        return self.encode_scales(pixels, [pool_scale])[pool_scale]

    # -- decoding ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, n) codes, n a square -> (B, n, C) "rec" features, the de-tokenizers' condition."""
        n = codes.shape[-1]
        if math.isqrt(n) ** 2 != n:
            raise ValueError(f"{n} codes do not form a square grid")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        dtype = self.decode_task_layer[0].weight.dtype
        q = self.bottleneck.regularizer.lookup(codes.long().to(self.scale_layer.shift.device))  # (B, n, D) fp32
        x = self.bottleneck.out_linear(q.to(dtype))
        return self.decode_task_layer(self.decoder(x))


    # -- training ---------------------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor, pool_scale: int = 1, temperature: float | None = None) -> dict:
        """The training pass, differentiable: (B, 3, S, S) in [0, 1] -> {"rec": (B, n, C), "codes": (B, n),
        "z": (B, n, D) quantiser input, "commitment", "codebook": scalars}. The same computation as
        `encode` then `decode` (codes, and rec up to float rounding, in eval mode with `temperature` None), with
        the straight-through estimator between them; see SimVQ.quantize_train."""
        dtype = self.encode_task_layer[0].weight.dtype
        x = self.scale_layer(pixels.float()).to(dtype)
        feats = self.encoder(x, self.n_encoder_layers)  # (B, g*g, C)
        z = self.bottleneck.in_linear(self.encode_task_layer(self.pool(feats, pool_scale)))  # (B, n, D)
        zq, codes, commitment, codebook = self.bottleneck.regularizer.quantize_train(z, temperature)
        rec = self.decode_task_layer(self.decoder(self.bottleneck.out_linear(zq.to(dtype))))  # (B, n, C)
        return {"rec": rec, "codes": codes, "z": z, "commitment": commitment, "codebook": codebook}

    def freeze_for_training(self) -> list[str]:
        """requires_grad off for what training must not change: the codebook `embedding` (the LLM's rows: the
        text alignment), and what no output depends on (encoder layers after select_layer_id, its post-LN and
        head, the decoder's head; kept in the state dict for the reference format). DDP needs every trainable
        parameter to get a gradient each step. Returns the frozen names."""
        frozen = ["bottleneck.regularizer.embedding."]
        frozen += [f"encoder.encoder.layers.{i}." for i in range(self.n_encoder_layers, len(self.encoder.encoder.layers))]
        frozen += ["encoder.post_layernorm.", "encoder.head.", "decoder.vision_model.head."]
        names = []
        for name, p in self.named_parameters():
            if any(name.startswith(f) for f in frozen):
                p.requires_grad_(False)
                names.append(name)
        return names


def preprocess_image(image, size: int) -> torch.Tensor:
    """One PIL image -> (3, size, size) float32 in [0, 1] (RGB, PIL bicubic on uint8, / 255)."""
    return pixels_from_uint8(torch.from_numpy(resize_uint8(image, size)[None]))[0]


def resize_uint8(image, size: int) -> np.ndarray:
    """PIL image -> (size, size, 3) uint8: the part of preprocessing that runs on CPU workers."""
    from PIL import Image

    return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8).copy()


def pixels_from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 / 255, bit-identical to preprocess (also on GPU)."""
    return pixels.permute(0, 3, 1, 2).float().div_(255.0)


def reference_args(enc: VisionConfig, *, teacher: str, bottleneck_dim: int, codebook_size: int,
                   decoder_depth: int = 3, select_layer_id: int = -2, commitment_loss_weight: float = 0.25,
                   codebook_loss_weight: float = 1.0, stochastic_temperature: float = 0.03) -> dict:
    """ARGS of a reference ta_tok.pth, every key the reference's constructor takes (and no `input_type`: its
    callers pass that themselves, a stored one is a TypeError there), in its order."""
    return {
        "bottleneck": {"name": "bottleneck", "args": {
            "bottleneck_dim": int(bottleneck_dim), "norm": "none",
            "regularizer": {"name": "simvq", "args": {
                "codebook_size": int(codebook_size), "commitment_loss_weight": float(commitment_loss_weight),
                "codebook_loss_weight": float(codebook_loss_weight), "entropy_loss_weight": 0.0,
                "entropy_loss_temperature": 0.01, "l2_normalized": True, "stochastic": True,
                "stochastic_temperature": float(stochastic_temperature)}}}},
        "bottleneck_token_num": (enc.image_size // enc.patch_size) ** 2, "input_size": int(enc.image_size),
        "teacher": teacher, "pool_scale": 1, "decoder_depth": int(decoder_depth),
        "select_layer_id": int(select_layer_id),
    }


def vision_config_json(enc: VisionConfig) -> dict:
    """A SiglipConfig JSON for `enc` (what AutoConfig.from_pretrained(teacher) reads in the reference)."""
    vision_cfg = {"model_type": "siglip_vision_model", **{k: getattr(enc, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
        "image_size", "patch_size", "layer_norm_eps", "hidden_act")}}
    return {"model_type": "siglip", "vision_config": vision_cfg}


def random_tatok(seed: int = 0, *, input_size: int = 224, patch_size: int = 14, hidden: int = 96, layers: int = 3,
                 heads: int = 4, bottleneck_dim: int = 32, codebook_size: int = 1024, decoder_depth: int = 2,
                 teacher: str = "encoder", encoder: VisionConfig | None = None) -> tuple[TATok, dict]:
    """A TA-Tok with random weights (fixed seed) and the encoder config.json its checkpoint refers to.

    For demos, tests and benchmarks only: its codes carry no meaning. Save with
    `torch.save(model.checkpoint_dict(), p)` and write the returned config as `<dir of p>/<teacher>/config.json`
    (not needed when `teacher` is a built-in id and `encoder` its config, e.g. the real shape for benchmarks).
    """
    enc = encoder or VisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, image_size=input_size, patch_size=patch_size)
    raw = reference_args(enc, teacher=teacher, bottleneck_dim=bottleneck_dim, codebook_size=codebook_size,
                         decoder_depth=decoder_depth)
    args = TATokArgs.from_ckpt_args(raw)
    model = TATok(args, enc)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # one generator per parameter, seeded by its name: the weights do not depend on the order in which
            # transformers' modules register their parameters (q/k/v differ between releases)
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / math.sqrt(fan_in))
    return model.eval(), vision_config_json(enc)
