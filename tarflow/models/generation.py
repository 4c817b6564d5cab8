"""Batched decoding for the Tar MLLM (a Hugging Face Qwen2ForCausalLM): one static KV cache for the batch.

    prompts (ragged) -> left-padded (B, P) + attention mask (B, P + N)
    prefill once into a StaticCache of length P + N, then one token per step for every row:
      logits (B, V) -> [T2I: everything outside the image-token range at -inf while image tokens are due]
                    -> sample (greedy, or temperature / top-k / top-p, per-row seeds) on the device
      rows stop on their own stop token; the loop ends when all rows have stopped or N tokens were made

Every step has the same shapes (one token per row, the whole cache, a full-length mask), so the model's
forward can be compiled / graph-captured on GPU. Hugging Face `generate` at batch 1 stays the correctness
baseline: with greedy decoding both give the same tokens (tests).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from tarflow.models.sampling import sample


@dataclass
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "greedy": self.greedy}


@dataclass
class Generated:
    tokens: list[list[int]]  # per row, without the prompt and without the stop token
    stopped: list[bool] = field(default_factory=list)  # row ended on a stop token (else: on the length limit)


class BatchedDecoder:
    def __init__(self, model, pad_id: int, compile: bool = False):
        self.model, self.pad_id = model, pad_id
        # transformers renamed forward's `past_key_values` to `cache` during 5.x (the old name warns, then goes)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.forward = torch.compile(model.forward, mode="reduce-overhead", dynamic=False) if compile else model.forward

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(), *,
                 seeds: list[int] | None = None, stop_ids: tuple[int, ...] = (),
                 allowed_range: tuple[int, int] | None = None, check_every: int = 8) -> Generated:
        """Decode up to `max_new_tokens` for each prompt (token id lists of any lengths).

        `allowed_range` (start, stop): only those token ids may be produced (T2I: the image tokens).
        `seeds`: one per row for per-row reproducible sampling; without them a greedy or batch-seeded run.
        """
        from transformers.cache_utils import StaticCache

        if not prompts:
            return Generated([], [])
        dev = self.device
        B, P, N = len(prompts), max(len(p) for p in prompts), max_new_tokens
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P + N), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token is at the same column
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p):P] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)
        row_seeds = torch.tensor(seeds, dtype=torch.long, device=dev) if seeds is not None else None
        stop = torch.tensor(list(stop_ids) or [-1], device=dev)
        lo, hi = allowed_range if allowed_range is not None else (0, None)
        cache = StaticCache(config=self.model.config, max_cache_len=P + N)

        logits = self.model(input_ids=ids, attention_mask=mask[:, :P], position_ids=pos,
                            cache_position=torch.arange(P, device=dev), use_cache=True, logits_to_keep=1,
                            **{self.cache_arg: cache}).logits[:, -1]  # vocab-wide logits for the last position only
        out = torch.full((B, N), self.pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        next_pos = pos[:, -1] + 1
        n = 0
        for t in range(N):
            # sampling only within the allowed range is the same as masking the rest, and sorts less (top-p)
            tok = lo + sample(logits[:, lo:hi].float(), temperature=sampling.temperature,
                              top_k=1 if sampling.greedy else sampling.top_k, top_p=sampling.top_p,
                              seeds=row_seeds, step=t)
            tok = torch.where(done, self.pad_id, tok)
            out[:, t] = tok
            done = done | torch.isin(tok, stop)
            n = t + 1
            if t + 1 == N or ((t + 1) % check_every == 0 and bool(done.all())):
                break
            mask[:, P + t] = 1
            logits = self.forward(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                  cache_position=torch.tensor([P + t], device=dev), use_cache=True,
                                  **{self.cache_arg: cache}).logits[:, -1]
            next_pos = next_pos + 1
        tokens, stopped = [], []
        stop_set = set(stop_ids)
        for row in out[:, :n].tolist():
            cut = next((j for j, x in enumerate(row) if x in stop_set), None)
            tokens.append(row if cut is None else row[:cut])
            stopped.append(cut is not None)
        return Generated(tokens, stopped)
