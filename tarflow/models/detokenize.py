"""TA-Tok codes -> pixels through the AR de-tokenizer: the end-to-end path of the reference's MMAutoEncoder.

    codes (B, n)  --TA-Tok decoder-->  rec (B, n, C)  --AR de-tokenizer-->  VQ tokens (B, g*g)
                  --VQ-16 decoder-->   image (B, 3, 16g, 16g) in about [0, 1]  --clamp, *255, trunc-->  uint8
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tarflow.models.ar_detok import ARDetokenizer
from tarflow.models.tatok import TATok
from tarflow.models.vqvae import VQVAE


@dataclass
class ARSampling:
    """The reference's T2I defaults: CFG 4, plain sampling (top_k 0, top_p 1, temperature 1)."""

    cfg_scale: float = 4.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


class ARImageDecoder:
    """TA-Tok (decoder part), AR de-tokenizer and pixel VQ, loaded once and used together."""

    def __init__(self, tatok: TATok, ar: ARDetokenizer, vq: VQVAE):
        if ar.args.cond_dim != tatok.encoder_cfg.hidden_size:
            raise ValueError(f"AR de-tokenizer expects {ar.args.cond_dim}-wide conditions but TA-Tok gives "
                             f"{tatok.encoder_cfg.hidden_size}-wide rec features")
        if ar.vocab_size != vq.codebook_size:
            raise ValueError(f"AR de-tokenizer vocabulary {ar.vocab_size} != VQ codebook {vq.codebook_size}")
        self.tatok, self.ar, self.vq = tatok, ar, vq

    @classmethod
    def from_checkpoints(cls, tatok: str, ar: str, vq: str) -> "ARImageDecoder":
        return cls(TATok.from_checkpoint(tatok), ARDetokenizer.from_checkpoint(ar), VQVAE.from_checkpoint(vq))

    def to(self, *args, **kwargs) -> "ARImageDecoder":
        for m in (self.tatok, self.ar, self.vq):
            m.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def vq_tokens(self, codes: torch.Tensor, sampling: ARSampling = ARSampling(),
                  generator: torch.Generator | None = None, seeds: torch.Tensor | None = None,
                  step_fn=None) -> torch.Tensor:
        """(B, n) TA-Tok codes -> (B, max_seq_len) VQ tokens (per-row `seeds` make rows batch-independent)."""
        rec = self.tatok.decode(codes)
        return self.ar.generate(rec, cfg_scale=sampling.cfg_scale, temperature=sampling.temperature,
                                top_k=sampling.top_k, top_p=sampling.top_p, generator=generator, seeds=seeds,
                                step_fn=step_fn)

    @torch.no_grad()
    def __call__(self, codes: torch.Tensor, sampling: ARSampling = ARSampling(),
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n) TA-Tok codes -> (B, H, W, 3) uint8 images."""
        tokens = self.vq_tokens(codes, sampling, generator)
        return self.vq.to_uint8(self.vq.decode_code(tokens))


def detokenize(codes: torch.Tensor, tatok: TATok, ar: ARDetokenizer, vq: VQVAE, *, cfg_scale: float = 4.0,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """TA-Tok codes (B, n) -> uint8 images (B, H, W, 3) through the AR de-tokenizer and the pixel VQ."""
    return ARImageDecoder(tatok, ar, vq)(codes, ARSampling(cfg_scale, temperature, top_k, top_p), generator)
