"""The inverse-CDF sampler, top-k / top-p filters and the per-row random streams."""

import torch

from ppolm.sampling import filter_logits, row_uniforms, sample_tokens


def test_greedy_and_top_k_one_are_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    u = torch.rand(5)
    assert torch.equal(sample_tokens(logits, u, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample_tokens(logits, u, temperature=1.0, top_k=1), logits.argmax(-1))


def test_inverse_cdf_hand_computed():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    logits = probs.log()
    # CDF [0.1, 0.3, 0.6, 1.0]: u=0.05 -> 0, u=0.25 -> 1, u=0.59 -> 2, u=0.61 -> 3
    for u, tok in [(0.05, 0), (0.25, 1), (0.59, 2), (0.61, 3), (0.999, 3)]:
        assert sample_tokens(logits, torch.tensor([u])).item() == tok


def test_top_p_hand_computed():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.81))
    assert kept.tolist() == [[True, True, True, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=3))
    assert kept.tolist() == [[True, True, True, False]]


def test_sampler_matches_softmax_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(3)
    tokens = sample_tokens(logits, torch.rand(20000, generator=gen), temperature=1.0)
    freq = torch.bincount(tokens, minlength=4).float() / 20000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015)


def test_row_uniforms_depend_only_on_row_id():
    a = row_uniforms(seed=1, step=3, row_ids=[0, 1, 2, 3], length=5)
    b = row_uniforms(seed=1, step=3, row_ids=[2, 3], length=5)
    assert torch.equal(a[2:], b)
    assert not torch.equal(a, row_uniforms(seed=1, step=4, row_ids=[0, 1, 2, 3], length=5))
