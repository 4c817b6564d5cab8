"""The MLLM's batched decoder against Hugging Face `generate` at batch 1 (the correctness baseline)."""
from __future__ import annotations

import pytest
import torch

from tarflow.models.generation import BatchedDecoder, Sampling

VOCAB, PAD, STOP = 300, 0, 7


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=256)
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so greedy paths are varied, not constant
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return m


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15], [20, 21, 22, 23]]


def _hf_greedy(model, prompt, n, processors=None, stop=None):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=PAD,
                         eos_token_id=stop, logits_processor=processors)
    return out[0, len(prompt):].tolist()


def test_greedy_batch_equals_hf_generate_at_batch_1(model):
    dec = BatchedDecoder(model, pad_id=PAD)
    got = dec.generate(PROMPTS, 12, Sampling(greedy=True))
    for p, toks in zip(PROMPTS, got.tokens):
        assert toks == _hf_greedy(model, p, 12)
    assert len({tuple(t) for t in got.tokens}) > 1 and not any(got.stopped)


def test_rows_stop_on_their_own_stop_token(model):
    dec = BatchedDecoder(model, pad_id=PAD)
    free = dec.generate(PROMPTS, 12, Sampling(greedy=True)).tokens
    stop = next(t for row in free for t in row[2:])  # a token that some row produces after its first two
    got = dec.generate(PROMPTS, 12, Sampling(greedy=True), stop_ids=(stop,))
    for p, row, toks, stopped in zip(PROMPTS, free, got.tokens, got.stopped):
        want = row[:row.index(stop)] if stop in row else row
        assert toks == want and stopped == (stop in row)
        assert toks == [t for t in _hf_greedy(model, p, 12, stop=stop) if t != stop][:len(want)]


def test_restricted_range_equals_hf_with_a_logits_processor(model):
    from transformers import LogitsProcessor, LogitsProcessorList

    lo, hi = 100, 200

    class OnlyRange(LogitsProcessor):
        def __call__(self, input_ids, scores):
            masked = torch.full_like(scores, float("-inf"))
            masked[:, lo:hi] = scores[:, lo:hi]
            return masked

    dec = BatchedDecoder(model, pad_id=PAD)
    got = dec.generate(PROMPTS, 9, Sampling(greedy=True), allowed_range=(lo, hi))
    for p, toks in zip(PROMPTS, got.tokens):
        assert all(lo <= t < hi for t in toks) and len(toks) == 9
        assert toks == _hf_greedy(model, p, 9, LogitsProcessorList([OnlyRange()]))


def test_seeded_sampling_is_per_row(model):
    dec = BatchedDecoder(model, pad_id=PAD)
    s = Sampling(temperature=1.0, top_k=50, top_p=0.95)
    batch = dec.generate(PROMPTS, 10, s, seeds=[1, 2, 3, 4]).tokens
    for i in (0, 2):
        assert dec.generate([PROMPTS[i]], 10, s, seeds=[i + 1]).tokens[0] == batch[i]
    assert dec.generate(PROMPTS, 10, s, seeds=[5, 6, 7, 8]).tokens != batch
