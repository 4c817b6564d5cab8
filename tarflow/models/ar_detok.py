"""The AR de-tokenizer: TA-Tok "rec" features -> pixel-VQ tokens, a LlamaGen-style decoder-only transformer.

    cond (B, n_cond, C)  TA-Tok rec features, one condition token per TA-Tok token
      -> clip_proj: Linear(C, d)                                   (B, n_cond, d)
    tokens (B, T) VQ-16 codes -> tok_embeddings                    (B, T, d)
    [cond ; tokens] + abs_pe[:, :n_cond + T]  (learned absolute positions, no RoPE)
      -> n_layer x (RMSNorm -> causal MHA (fused wqkv) ; RMSNorm -> SwiGLU)
      -> RMSNorm -> output: Linear(d, vocab)                       logits; row n_cond-1+j predicts token j

Generation prefills the condition into a KV cache allocated once for the whole batch (doubled for CFG: the
null condition is all zeros), then decodes one token per step with a fixed-shape step (the whole cache,
masked by position) so that the step can be compiled or graph-captured. logits = u + (c - u) * cfg.

Checkpoint: the reference's `{'model': {'name', 'args', 'sd'}}`; `name` picks a size preset unless `args`
gives n_layer / n_head / dim itself.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from tarflow.models.checkpoint import CheckpointError, load_state_dict_strict, read_checkpoint, unwrap_model_entry
from tarflow.models.sampling import sample

# name -> (n_layer, n_head, dim)
PRESETS = {
    "llama-abs-S": (12, 6, 384),
    "llama-abs-B": (12, 12, 768),
    "llama-abs-L": (24, 16, 1024),
    "llama-abs-LP": (30, 20, 1280),  # Tar's ar_dtok_lp_{256,512,1024}px, 632M
    "llama-abs-XL": (36, 20, 1280),
    "llama-abs-XXL": (48, 24, 1536),
    "llama-abs-XXXL": (48, 40, 2560),
}


@dataclass
class ARArgs:
    """The reference's model args (defaults as the reference's); only clip_cond models exist in Tar."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    model_type: str = "class_cond"
    cond_dim: int = 1152
    cond_vocab_size: int = 8192
    vocab_size: int = 8192
    cls_token_num: int = 1
    max_batch_size: int = 32
    max_seq_len: int = 2048
    use_fixed_pe: bool = False
    frame_prediction: bool = False

    @classmethod
    def from_ckpt(cls, name: str, args: Mapping, path: str = "<args>") -> "ARArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise CheckpointError(path, f"unknown AR model args {unknown}")
        merged = dict(args)
        if not {"n_layer", "n_head", "dim"} <= set(merged):
            if name not in PRESETS:
                raise CheckpointError(path, f"model name {name!r} is not a known preset ({', '.join(PRESETS)}) and "
                                            "args do not give n_layer/n_head/dim")
            for k, v in zip(("n_layer", "n_head", "dim"), PRESETS[name]):
                merged.setdefault(k, v)
        a = cls(**merged)
        if a.model_type != "clip_cond":
            raise CheckpointError(path, f"model_type {a.model_type!r}: tarflow's AR de-tokenizer is clip_cond only")
        if a.dim % a.n_head:
            raise CheckpointError(path, f"dim {a.dim} is not divisible by n_head {a.n_head}")
        return a

    @property
    def ffn_hidden(self) -> int:
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return -(-h // self.multiple_of) * self.multiple_of  # round up to a multiple


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalise in fp32 whatever the compute dtype
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, a: ARArgs):
        super().__init__()
        self.n_head = a.n_head
        self.n_kv_head = a.n_kv_head or a.n_head
        self.head_dim = a.dim // a.n_head
        self.wqkv = nn.Linear(a.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(a.dim, a.dim, bias=False)
        self.resid_dropout = nn.Dropout(a.resid_dropout_p)

    def qkv(self, x):  # (B, T, d) -> 3 x (B, h, T, hd)
        B, T, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q, k, v, mask=None, causal=False):  # -> (B, T, d)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        B, _, T, _ = y.shape
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, -1)))

    def forward(self, x):  # full causal attention, no cache (training, teacher forcing)
        return self.attend(*self.qkv(x), causal=True)


class FeedForward(nn.Module):
    def __init__(self, a: ARArgs):
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.ffn_hidden, bias=False)
        self.w3 = nn.Linear(a.dim, a.ffn_hidden, bias=False)
        self.w2 = nn.Linear(a.ffn_hidden, a.dim, bias=False)
        self.ffn_dropout = nn.Dropout(a.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, a: ARArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.feed_forward = FeedForward(a)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class KVCache:
    """Keys and values of every layer for the whole batch, allocated once: (L, B, h_kv, S, hd) each."""

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, dtype, device):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len


class ARDetokenizer(nn.Module):
    def __init__(self, args: ARArgs):
        super().__init__()
        self.args = args
        d = args.dim
        self.clip_proj = nn.Linear(args.cond_dim, d)
        self.tok_embeddings = nn.Embedding(args.vocab_size, d)
        self.tok_dropout = nn.Dropout(args.token_dropout_p)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(d, args.norm_eps)
        self.output = nn.Linear(d, args.vocab_size, bias=False)
        n_pos = args.max_seq_len + args.cls_token_num - 1
        if args.use_fixed_pe:
            self.register_buffer("abs_pe", _sincos(n_pos, d).unsqueeze(0))
        else:
            self.abs_pe = nn.Parameter(torch.randn(1, n_pos, d) * 0.02)
        self.name: str | None = None
        self.path: str | None = None
        self.sha256: str | None = None

    # -- loading ----------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str) -> "ARDetokenizer":
        ckpt = read_checkpoint(path)
        entry = unwrap_model_entry(ckpt, ("args", "sd"))
        name = str(entry.get("name", ""))
        if not isinstance(entry["args"], Mapping):
            raise CheckpointError(path, "ckpt['model']['args'] is not a dict")
        model = cls(ARArgs.from_ckpt(name, entry["args"], path))
        sd = {k: v for k, v in entry["sd"].items() if ".kv_cache." not in k}  # caches saved after sampling
        load_state_dict_strict(model, sd, path)
        model.name, model.path, model.sha256 = name, path, ckpt.sha256
        return model.eval()

    def checkpoint_dict(self) -> dict:
        from dataclasses import asdict

        return {"model": {"name": self.name or "llama-abs-custom", "args": asdict(self.args), "sd": self.state_dict()}}

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def max_positions(self) -> int:
        return self.abs_pe.shape[1]

    # -- teacher forcing --------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """idx (B, T) VQ tokens, cond (B, n_cond, C) -> logits (B, T + 1, vocab); row j predicts token j."""
        n_cond, T = cond.shape[1], idx.shape[1]
        if n_cond + T > self.max_positions:
            raise ValueError(f"{n_cond} condition + {T} tokens exceed the {self.max_positions} positions")
        h = torch.cat([self.clip_proj(cond.to(self.clip_proj.weight.dtype)), self.tok_embeddings(idx)], dim=1)
        h = self.tok_dropout(h) + self.abs_pe[:, : n_cond + T]
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))[:, n_cond - 1:]

    # -- generation -------------------------------------------------------------------------------------
    def _prefill(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:  # (B', n_cond, C) -> (B', vocab)
        n = x.shape[1]
        h = self.clip_proj(x.to(self.clip_proj.weight.dtype)) + self.abs_pe[:, :n]
        for i, layer in enumerate(self.layers):
            a = layer.attention
            q, k, v = a.qkv(layer.attention_norm(h))
            cache.k[i, :, :, :n], cache.v[i, :, :, :n] = k, v
            h = h + a.attend(q, k, v, causal=True)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return self.output(self.norm(h[:, -1]))

    def decode_step(self, tok: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row at position `pos` (0-dim tensor) -> logits (B', vocab). Fixed shapes: the whole
        cache is read and positions after `pos` are masked, so the step can be compiled / graph-captured."""
        # index_select, not abs_pe[:, pos]: indexing with a tensor makes torch.compile specialise on its value
        # (one recompile per step, then eager once the recompile limit is hit)
        h = self.tok_embeddings(tok)[:, None] + self.abs_pe.index_select(1, pos[None])  # (B', 1, d)
        mask = (torch.arange(cache.max_len, device=h.device) <= pos)[None, None, None]  # (1, 1, 1, S)
        for i, layer in enumerate(self.layers):
            a = layer.attention
            q, k, v = a.qkv(layer.attention_norm(h))
            cache.k[i].index_copy_(2, pos[None], k)
            cache.v[i].index_copy_(2, pos[None], v)
            h = h + a.attend(q, cache.k[i], cache.v[i], mask=mask)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return self.output(self.norm(h[:, 0]))

    @torch.no_grad()
    def generate(self, cond: torch.Tensor, *, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, num_tokens: int | None = None, generator: torch.Generator | None = None,
                 seeds: torch.Tensor | None = None, step_fn=None) -> torch.Tensor:
        """cond (B, n_cond, C) rec features -> VQ tokens (B, num_tokens) int64 (default: max_seq_len).

        top_k=1 is greedy (argmax), reproducible across implementations; otherwise tokens are sampled with
        `generator`, or with per-row `seeds` (B,) so that a row's image does not depend on its batch.
        `step_fn` replaces `decode_step` (e.g. a compiled version of it).
        """
        B, n_cond = cond.shape[:2]
        n = num_tokens or self.args.max_seq_len
        if n_cond + n - 1 > self.max_positions:
            raise ValueError(f"{n_cond} condition tokens + {n} image tokens need {n_cond + n - 1} positions; "
                             f"this model has {self.max_positions}")
        use_cfg = cfg_scale != 1.0
        x = torch.cat([cond, torch.zeros_like(cond)]) if use_cfg else cond  # null condition: all zeros
        a0 = self.layers[0].attention
        dtype = self.tok_embeddings.weight.dtype
        cache = KVCache(len(self.layers), x.shape[0], a0.n_kv_head, _round_up(n_cond + n, 8), a0.head_dim, dtype,
                        cond.device)
        step = step_fn or self.decode_step

        def pick(logits, j):  # (B', vocab) -> (B,)
            logits = logits.float()
            if use_cfg:
                c, u = logits[:B], logits[B:]
                logits = u + (c - u) * cfg_scale
            return sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                          seeds=seeds, step=j)

        out = torch.empty(B, n, dtype=torch.long, device=cond.device)
        out[:, 0] = pick(self._prefill(x, cache), 0)
        for j in range(1, n):
            tok = torch.cat([out[:, j - 1], out[:, j - 1]]) if use_cfg else out[:, j - 1]
            pos = torch.tensor(n_cond + j - 1, device=cond.device)
            out[:, j] = pick(step(tok, pos, cache), j)
        return out


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _sincos(n_pos: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sin/cos position table (use_fixed_pe): sin on the first half of the channels, cos on the rest."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


