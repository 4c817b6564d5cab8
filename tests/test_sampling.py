"""Sampling: filters keep the right tokens; per-row seeded sampling follows the softmax and its seed only."""
from __future__ import annotations

import torch

from tarflow.models.sampling import filter_logits, row_uniforms, sample

LOGITS = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])


def test_top_k_top_p_and_temperature_filter_the_right_tokens():
    logits = LOGITS.repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, top_k=2, generator=g).tolist()) == {0, 1}
    # top-p 0.5: token 0 alone holds 0.71 of the mass
    assert set(sample(logits, top_p=0.5, generator=g).tolist()) == {0}
    # top-p 0.8: token 0 (0.71) is under, so the crossing token 1 is kept too
    assert set(sample(logits, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, temperature=100.0, generator=g).tolist()) == {0, 1, 2, 3, 4}
    assert torch.isinf(filter_logits(LOGITS, top_k=3)).tolist() == [[False, False, False, True, True]]
    assert sample(logits, top_k=1).unique().tolist() == [0]


def test_seeded_sampling_matches_the_softmax_and_depends_only_on_seed_and_step():
    seeds = torch.arange(20000)
    counts = torch.bincount(sample(LOGITS.repeat(20000, 1), seeds=seeds, step=3), minlength=5).float() / 20000
    torch.testing.assert_close(counts, LOGITS.softmax(-1)[0], atol=0.015, rtol=0)
    u = row_uniforms(torch.tensor([7, 8, 7]), 5, 1000)
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert not torch.equal(u[0], row_uniforms(torch.tensor([7]), 6, 1000)[0])
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.02


def test_masked_tokens_are_never_sampled():
    """Even the largest uniform must give finite Gumbel noise: -inf logits stay -inf, never NaN."""
    logits = torch.full((4096, 1000), float("-inf"))
    logits[:, 10:20] = torch.randn(4096, 10)
    for step in range(8):
        tok = sample(logits, top_k=1200, top_p=0.95, seeds=torch.arange(4096), step=step)
        assert bool(((tok >= 10) & (tok < 20)).all())
    top = (torch.tensor((1 << 23) - 1).float() + 0.5) / float(1 << 23)
    assert float(top) < 1.0
