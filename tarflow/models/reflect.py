"""Self-reflection: the Tar MLLM scores images it generated, from their codes, with one forward pass.

Tar reads and writes the same TA-Tok tokens, so generated codes can go straight back in as the image of an I2T
question (the reference's I2T layout: image tokens, "\\n", question), with no de-tokenizer in between:

    codes (n at their scale) + prompt -> chat(user = <I..>*n + "\\n" + question(prompt)) + generation prompt
    one batched forward, left-padded (B, P) + attention mask, logits at the last position only (B, V)
    score = P(affirmative) / (P(affirmative) + P(negative))  at the first answer position
          = sigmoid(logsumexp(logp[yes ids]) - logsumexp(logp[no ids]))

The affirmative / negative ids are the single-token spellings of "Yes"/"yes"/" Yes"/... in the tokenizer
(found by encoding them, never hard-coded ids). A row's score depends only on its own tokens: padding is
masked and positions restart per row, so any batching gives the same scores within float tolerance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tarflow.models.mllm import DEFAULT_SYSTEM, TarVocab, i2t_prompt_ids

# the question put after the image tokens; {prompt} is replaced by the generation prompt
DEFAULT_QUESTION = 'Does this image match the description "{prompt}"? Answer yes or no.'
PROMPT_FIELD = "{prompt}"
AFFIRMATIVE_WORDS = ("Yes", "yes", " Yes", " yes", "YES")
NEGATIVE_WORDS = ("No", "no", " No", " no", "NO")


def question_for(template: str, prompt: str) -> str:
    """The question for `prompt` (plain replacement: braces elsewhere in the template stay as they are)."""
    return template.replace(PROMPT_FIELD, prompt)


def check_template(template: str) -> None:
    if PROMPT_FIELD not in template:
        raise ValueError(f"reflect question {template!r} has no {PROMPT_FIELD} field: the model must be asked "
                         f"about the prompt; e.g. {DEFAULT_QUESTION!r}")


def single_token_ids(tokenizer, words) -> tuple[int, ...]:
    """Ids of those `words` that encode to exactly one token, in order, each once."""
    out = []
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] not in out:
            out.append(int(ids[0]))
    return tuple(out)


def answer_token_ids(tokenizer, affirmative=AFFIRMATIVE_WORDS, negative=NEGATIVE_WORDS):
    """(affirmative ids, negative ids) from the tokenizer; an error if either set is empty or they overlap."""
    yes, no = single_token_ids(tokenizer, affirmative), single_token_ids(tokenizer, negative)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not yes or not no:
        raise ValueError(f"tokenizer {name!r}: none of {list(affirmative if not yes else negative)} is a single "
                         f"token; self-reflection needs single-token answers (use the Tar / Qwen2 tokenizer)")
    if set(yes) & set(no):
        raise ValueError(f"tokenizer {name!r}: affirmative and negative answers share ids {set(yes) & set(no)}")
    return yes, no


def reflect_prompt_ids(tokenizer, vocab: TarVocab, codes, prompt: str, template: str = DEFAULT_QUESTION,
                       system: str | None = DEFAULT_SYSTEM) -> list[int]:
    """The I2T prompt asking whether the image of `codes` matches `prompt` (codes as generated, at their scale)."""
    return i2t_prompt_ids(tokenizer, vocab, codes, question_for(template, prompt), system=system)


def rank_candidates(scores: list[float]) -> list[int]:
    """Candidate indices best first: higher score first, ties by the lower candidate index, NaN last."""
    return sorted(range(len(scores)), key=lambda i: (math.isnan(scores[i]), -scores[i] if scores[i] == scores[i]
                                                     else 0.0, i))


def candidate_seed(seed: int, candidate: int) -> int:
    """Candidate c's sampling seed for a request with `seed`: c = 0 keeps the request's seed (so one candidate
    gives exactly the image made without reflection); others are mixed (splitmix64) so that they collide
    neither with each other nor with the seeds seed + k of a prompt's other images."""
    if candidate == 0:
        return int(seed)
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(candidate) * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) % (1 << 62)


@dataclass
class Scored:
    scores: list[float]  # P(yes) / (P(yes) + P(no)), per row
    lengths: list[int]  # prompt tokens per row
    seconds: float

    @property
    def tokens(self) -> int:  # prompt tokens run through the model (padding excluded)
        return sum(self.lengths)


class ReflectScorer:
    """Scores (prompt, codes) pairs with a Tar model (a Hugging Face Qwen2ForCausalLM) in batched forwards."""

    def __init__(self, model, tokenizer, vocab: TarVocab, template: str = DEFAULT_QUESTION,
                 system: str | None = DEFAULT_SYSTEM, max_batch: int = 64,
                 answer_ids: tuple[tuple[int, ...], tuple[int, ...]] | None = None):
        """`answer_ids` (yes ids, no ids) replaces the tokenizer's only where there is no tokenizer (benchmarks
        on token ids)."""
        check_template(template)
        self.model, self.tokenizer, self.vocab = model, tokenizer, vocab
        self.template, self.system, self.max_batch = template, system, max_batch
        self.yes_ids, self.no_ids = answer_ids or answer_token_ids(tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_ids(self, prompt: str, codes) -> list[int]:
        return reflect_prompt_ids(self.tokenizer, self.vocab, codes, prompt, self.template, self.system)

    @torch.no_grad()
    def score_ids(self, prompts: list[list[int]]) -> torch.Tensor:
        """One forward pass over left-padded `prompts` (B ragged id lists) -> (B,) float32 scores."""
        dev = self.device
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, P), self.vocab.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's answer position is the last column
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # each row's positions start at 0 at its first real token
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                            logits_to_keep=1).logits[:, -1].float()  # (B, V)
        logp = torch.log_softmax(logits, dim=-1)
        yes = torch.logsumexp(logp[:, list(self.yes_ids)], dim=-1)  # (B,)
        no = torch.logsumexp(logp[:, list(self.no_ids)], dim=-1)
        return torch.sigmoid(yes - no)  # = P(yes) / (P(yes) + P(no))

    def score(self, prompts: list[str], codes: list, batch_size: int | None = None) -> Scored:
        """Scores of (prompt, codes) pairs, in chunks of `batch_size` rows (default: max_batch) sorted by
        length so that little padding is run; the order of the result is the order of the pairs."""
        import time

        t0 = time.perf_counter()
        ids = [self.prompt_ids(p, c) for p, c in zip(prompts, codes, strict=True)]
        if not ids:
            return Scored([], [], 0.0)
        bs = batch_size or self.max_batch
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        scores = [math.nan] * len(ids)
        for k in range(0, len(order), bs):
            chunk = order[k:k + bs]
            for i, s in zip(chunk, self.score_ids([ids[i] for i in chunk]).cpu().tolist()):
                scores[i] = s
        return Scored(scores, [len(x) for x in ids], time.perf_counter() - t0)
