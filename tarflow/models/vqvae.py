"""Pixel VQ: the LlamaGen-style VQ-16 image tokenizer (VQGAN family), in plain PyTorch.

Tar's AR de-tokenizer samples VQ tokens; this model turns them into pixels (and pixels into tokens, for
making training data).

    tokens (B, h*w) int64 in [0, K)
      -> normalize(codebook)[tokens] -> (B, D, h, w)                   D = codebook dim (8)
      -> post_quant_conv 1x1                                           (B, Z, h, w)     Z = z_channels
      -> Decoder: conv_in, mid [res, attn, res], levels from the lowest resolution up
         (level 0 has attention; every level but the last upsamples x2), norm, swish, conv_out
                                                                       (B, 3, 16h, 16w) in about [-1, 1]
      -> x * 0.5 + 0.5                                                 float image, not clamped

    pixels (B, 3, H, W) in [0, 1]
      -> (x - 0.5) / 0.5 -> Encoder (mirror image; downsample = pad right/bottom + 3x3 stride 2)
      -> quant_conv 1x1 -> (B, D, H/16, W/16)
      -> argmax_k cos(z, codebook_k)                                   (B, h*w) tokens

The checkpoint format is LlamaGen's (`vq_ds16_t2i.pt`): `{'model': VQModel.state_dict()}`. Module and
parameter names below follow that state dict so it loads strictly; no config is stored in it, so every width
is read back from the tensor shapes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tarflow.models.checkpoint import CheckpointError, load_state_dict_strict, read_checkpoint, unwrap_model_entry

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class VQConfig:
    ch: int = 128                                   # width of encoder.conv_in
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)      # encoder level widths / ch, highest resolution first
    decoder_ch_mult: tuple[int, ...] | None = None  # same convention; None = ch_mult (LlamaGen allows both)
    num_res_blocks: int = 2                         # per encoder level; the decoder has one more
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8
    codebook_used_size: int = 0                     # length of the `quantize.codebook_used` buffer; 0 = absent

    @property
    def dec_mult(self) -> tuple[int, ...]:
        return tuple(self.decoder_ch_mult if self.decoder_ch_mult is not None else self.ch_mult)

    def check(self) -> None:
        if len(self.ch_mult) < 1 or len(self.dec_mult) != len(self.ch_mult):
            raise ValueError(f"encoder has {len(self.ch_mult)} levels, decoder {len(self.dec_mult)}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks {self.num_res_blocks} < 1")
        for w in [self.ch] + [self.ch * m for m in self.ch_mult + self.dec_mult]:
            if w % 32:  # GroupNorm(32) needs it
                raise ValueError(f"width {w} is not a multiple of 32 (GroupNorm has 32 groups)")


def _conv_out_width(sd: Mapping[str, torch.Tensor], key: str, path: str) -> int:
    t = sd.get(key)
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise CheckpointError(path, f"ckpt['model'] lacks the conv weight {key!r} (or it is not 4-D)",
                              "is this a LlamaGen VQ checkpoint?")
    return int(t.shape[0])


def _indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def config_from_state_dict(sd: Mapping[str, torch.Tensor], path: str = "<state dict>") -> VQConfig:
    """Read every width back from a LlamaGen VQModel state dict."""
    ch = _conv_out_width(sd, "encoder.conv_in.weight", path)
    levels = _indices(sd, "encoder.conv_blocks.")
    dec_levels = _indices(sd, "decoder.conv_blocks.")
    if not levels or levels != list(range(len(levels))) or dec_levels != levels:
        raise CheckpointError(path, f"encoder levels {levels} and decoder levels {dec_levels} are not both 0..L-1",
                              "is this a LlamaGen VQ checkpoint?")
    L = len(levels)
    res = _indices(sd, "encoder.conv_blocks.0.res.")
    if not res or res != list(range(len(res))):
        raise CheckpointError(path, f"encoder level 0 has res blocks {res}, expected 0..n-1")

    def mult(width: int, what: str) -> int:
        if width % ch:
            raise CheckpointError(path, f"{what} width {width} is not a multiple of ch={ch}")
        return width // ch

    # a level's output width is its first res block's conv1 output (the rest of the level keeps it)
    ch_mult = tuple(mult(_conv_out_width(sd, f"encoder.conv_blocks.{l}.res.0.conv1.weight", path), f"encoder level {l}")
                    for l in range(L))
    # decoder blocks are stored lowest resolution first; reverse to the encoder's convention
    dec_mult = tuple(mult(_conv_out_width(sd, f"decoder.conv_blocks.{k}.res.0.conv1.weight", path), f"decoder level {k}")
                     for k in reversed(range(L)))
    z = _conv_out_width(sd, "encoder.conv_out.weight", path)
    emb = sd.get("quantize.embedding.weight")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
        raise CheckpointError(path, "ckpt['model'] lacks a 2-D 'quantize.embedding.weight' (the codebook)")
    used = sd.get("quantize.codebook_used")
    cfg = VQConfig(ch=ch, ch_mult=ch_mult, decoder_ch_mult=None if dec_mult == ch_mult else dec_mult,
                   num_res_blocks=len(res), z_channels=z, codebook_size=int(emb.shape[0]),
                   codebook_dim=int(emb.shape[1]),
                   codebook_used_size=int(used.numel()) if isinstance(used, torch.Tensor) else 0)
    try:
        cfg.check()
    except ValueError as e:
        raise CheckpointError(path, f"inferred an impossible config ({e})") from None
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def Normalize(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = Normalize(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = Normalize(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)  # (dropout 0 in the reference: nothing to do)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):  # (B, c_in, h, w) -> (B, c_out, h, w)
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions; 1x1 convs are per-position linears."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = Normalize(c)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):  # (B, C, h, w)
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, 1, h*w, C): one head, positions as the sequence; sdpa's default scale is C^-0.5 as in the reference
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(-1, -2) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):  # (B, C, h, w) -> (B, C, h/2, w/2)
        # asymmetric pad (right/bottom only) is what the trained weights expect, not padding=1
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):  # (B, C, h, w) -> (B, C, 2h, 2w)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks, each followed by an attention block where the level has them."""

    def __init__(self, widths: Sequence[tuple[int, int]], attn: bool, resample: nn.Module | None, name: str):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(a, b) for a, b in widths)
        self.attn = nn.ModuleList(AttnBlock(b) for _, b in widths) if attn else nn.ModuleList()
        if resample is not None:
            setattr(self, name, resample)  # key name is 'downsample' or 'upsample' in the state dict
        self.resample = name if resample is not None else None

    def forward(self, x):
        for i, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self.resample)(x) if self.resample else x


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        L, widths = len(cfg.ch_mult), [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, 1, 1)
        blocks, c = [], cfg.ch
        for l in range(L):
            w = [(c, widths[l])] + [(widths[l], widths[l])] * (cfg.num_res_blocks - 1)
            last = l == L - 1
            blocks.append(Level(w, attn=last, resample=None if last else Downsample(widths[l]), name="downsample"))
            c = widths[l]
        self.conv_blocks = nn.ModuleList(blocks)
        self.mid = nn.Sequential(ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c))
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, 1, 1)

    def forward(self, x):  # (B, 3, H, W) in [-1, 1] -> (B, Z, H/2^(L-1), W/2^(L-1))
        h = self.conv_in(x)
        for blk in self.conv_blocks:
            h = blk(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mult = cfg.dec_mult
        L = len(mult)
        c = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, 1, 1)
        self.mid = nn.Sequential(ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c))
        blocks = []
        for k in range(L):  # k = 0 is the lowest resolution
            out = cfg.ch * mult[L - 1 - k]
            w = [(c, out)] + [(out, out)] * cfg.num_res_blocks  # num_res_blocks + 1 per level
            last = k == L - 1
            blocks.append(Level(w, attn=k == 0, resample=None if last else Upsample(out), name="upsample"))
            c = out
        self.conv_blocks = nn.ModuleList(blocks)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 3, 3, 1, 1)

    def forward(self, z):  # (B, Z, h, w) -> (B, 3, h*2^(L-1), w*2^(L-1)) in about [-1, 1]
        h = self.mid(self.conv_in(z))
        for blk in self.conv_blocks:
            h = blk(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        if cfg.codebook_used_size:
            # training-time usage statistics; unused here but part of the checkpoint, so it must load strictly
            self.register_buffer("codebook_used", torch.zeros(cfg.codebook_used_size))

    def codebook(self) -> torch.Tensor:  # (K, D) float32, unit rows (codebook_l2_norm)
        return F.normalize(self.embedding.weight.float(), p=2, dim=-1)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, h, w) -> (B, D, h, w) float32
        return self.codebook()[tokens].permute(0, 3, 1, 2)

    def nearest(self, z: torch.Tensor, chunk: int = 8192) -> torch.Tensor:  # (B, D, h, w) -> (B, h*w) int64
        B, D = z.shape[:2]
        z = F.normalize(z.float().reshape(B, D, -1).transpose(1, 2).reshape(-1, D), p=2, dim=-1)  # (B*h*w, D)
        e = self.codebook()
        # on unit vectors min L2 == max dot; chunk rows so (rows, K) scores stay small for K = 16384
        idx = torch.cat([(zc @ e.T).argmax(-1) for zc in z.split(chunk)])
        return idx.reshape(B, -1)


# ----------------------------------------------------------------------------------------------------------
# The model


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
        self.path: str | None = None
        self.sha256: str | None = None

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.cfg.ch_mult) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    # -- loading ----------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str) -> "VQVAE":
        """Load a LlamaGen-format VQ checkpoint (`{'model': state_dict}`, local or s3://) strictly, eval mode."""
        ckpt = read_checkpoint(path)
        sd = unwrap_model_entry(ckpt, ("encoder.conv_in.weight", "decoder.conv_in.weight",
                                       "quantize.embedding.weight", "post_quant_conv.weight"))
        model = cls(config_from_state_dict(sd, path))
        load_state_dict_strict(model, sd, path)
        model.path, model.sha256 = path, ckpt.sha256
        return model.eval()

    def checkpoint_dict(self) -> dict:
        """The reference format, for saving (`torch.save(model.checkpoint_dict(), path)`)."""
        return {"model": self.state_dict()}

    # -- tokens -> pixels -------------------------------------------------------------------------------
    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, h*w) or (B, h, w) -> (B, h, w)
        if tokens.dim() == 3:
            return tokens
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, h*w) or (B, h, w), got shape {tuple(tokens.shape)}")
        n = tokens.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} tokens per image are not a square grid; pass them as (B, h, w)")
        return tokens.reshape(tokens.shape[0], side, side)

    @torch.no_grad()
    def decode_code(self, tokens: torch.Tensor) -> torch.Tensor:
        """VQ tokens (B, h*w) row-major or (B, h, w) -> image (B, 3, 16h, 16w) in the model's dtype, about
        [0, 1] but NOT clamped (the reference's `decode_from_bottleneck`)."""
        tokens = self._grid(tokens).to(self.post_quant_conv.weight.device, torch.long)
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size:
            raise ValueError(f"tokens must lie in [0, {self.codebook_size}), got [{int(tokens.min())}, "
                             f"{int(tokens.max())}]")
        z = self.quantize.lookup(tokens).to(self.dtype)          # (B, D, h, w)
        x = self.decoder(self.post_quant_conv(z))                 # (B, 3, H, W) in about [-1, 1]
        return x * 0.5 + 0.5

    decode = decode_code

    @staticmethod
    def to_uint8(img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float image -> (B, H, W, 3) uint8: clamp [0, 1], * 255, truncate (as the reference)."""
        return (img.float().clamp(0, 1) * 255).permute(0, 2, 3, 1).to(torch.uint8)

    # -- pixels -> tokens -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [0, 1], H and W multiples of `downsample` -> tokens (B, h*w) int64, row-major."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W), got shape {tuple(pixels.shape)}")
        H, W = pixels.shape[-2:]
        if H % self.downsample or W % self.downsample:
            raise ValueError(f"image size {H}x{W} is not a multiple of the downsample factor {self.downsample}")
        x = (pixels.to(self.post_quant_conv.weight.device, self.dtype) - 0.5) / 0.5
        z = self.quant_conv(self.encoder(x))                      # (B, D, h, w)
        return self.quantize.nearest(z)
