"""Token sampling shared by the AR de-tokenizer and the MLLM decoder.

Two sources of randomness:
- a torch.Generator (one stream for the batch), as the reference samples; or
- per-row seeds: Gumbel-max with noise from a counter-based hash of (seed, step, token). A row's tokens then
  depend only on its own seed and logits, not on which rows share its batch or on the device's RNG, so bulk
  jobs are deterministic per sample however they are batched or retried.
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _M1, _M2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic): a good 64-bit integer hash."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def row_uniforms(seeds: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """(B,) int64 seeds -> (B, n) float32 uniforms in (0, 1), a function of (seed, step, column) only."""
    base = splitmix64(splitmix64(seeds.long()) + step)[:, None]  # (B, 1)
    z = splitmix64(base + torch.arange(n, device=seeds.device, dtype=torch.long))  # (B, n)
    # 23 bits: (k + 0.5) / 2^23 is exact in float32 and strictly inside (0, 1); with 24 bits the top value
    # rounds to 1.0 and its Gumbel noise to +inf
    return (_shr(z, 41).float() + 0.5) / float(1 << 23)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
                  ) -> torch.Tensor:
    """(B, V) -> float32 logits / temperature with tokens outside top-k, then outside the top-p nucleus, at -inf
    (the token that crosses top_p is kept, and always at least one)."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[:, 1:] = drop[:, :-1].clone()
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, seeds: torch.Tensor | None = None, step: int = 0
           ) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. top_k=1 (or temperature 0) is greedy argmax."""
    if top_k == 1 or temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits, temperature, top_k, top_p)
    if seeds is not None:
        gumbel = -torch.log(-torch.log(row_uniforms(seeds, step, logits.shape[-1])))
        return (logits + gumbel).argmax(dim=-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
