"""The PPO equations against hand-computed numbers, plus property checks."""

import math

import pytest
import torch

from ppolm.algo.advantages import gae, shaped_rewards
from ppolm.algo.kl import AdaptiveKLController, FixedKLController
from ppolm.algo.losses import entropy_bonus, explained_variance, pairwise_loss, policy_loss, sft_loss, value_loss
from ppolm.ops import (entropy_from_logits, kl_estimate, logprobs_and_entropy, logprobs_from_logits, masked_mean,
                       masked_var, masked_whiten)

T = torch.tensor


def test_masked_mean_var_whiten_hand_computed():
    x = T([[1.0, 2.0, 99.0], [3.0, 4.0, -7.0]])
    m = T([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert masked_mean(x, m).item() == pytest.approx(2.5)
    assert masked_var(x, m).item() == pytest.approx(5.0 / 3.0)  # unbiased: sum sq dev 5 / 3
    w = masked_whiten(x, m)
    s = math.sqrt(5.0 / 3.0)
    expected = T([[-1.5 / s, -0.5 / s, 0.0], [0.5 / s, 1.5 / s, 0.0]])
    assert torch.allclose(w, expected, atol=1e-5)
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0  # empty mask: 0, not NaN


def test_logprobs_and_entropy_hand_computed():
    logits = torch.log(T([[[0.5, 0.25, 0.25]]]))
    assert logprobs_from_logits(logits, T([[1]])).item() == pytest.approx(math.log(0.25))
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert entropy_from_logits(logits).item() == pytest.approx(h, abs=1e-6)


def test_fused_logprobs_and_entropy_hand_computed_with_gradients():
    # p = (1/4, 3/4): log p(label 1) = ln 3/4, H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623;
    # d log p_1 / dz = onehot - p = (-1/4, 1/4); dH/dz = -p (log p + H) = (0.2060, -0.2060)
    z = torch.log(T([[0.25, 0.75]])).requires_grad_()
    lp, h = logprobs_and_entropy(z, T([1]))
    assert lp.item() == pytest.approx(math.log(0.75)) and h.item() == pytest.approx(0.562335, abs=1e-6)
    (g_lp,) = torch.autograd.grad(lp.sum(), z, retain_graph=True)
    assert torch.allclose(g_lp, T([[-0.25, 0.25]]), atol=1e-6)
    (g_h,) = torch.autograd.grad(h.sum(), z)
    assert torch.allclose(g_h, T([[0.205986, -0.205986]]), atol=1e-5)


@pytest.mark.parametrize("entropy_grad", [True, False])
def test_fused_logprobs_and_entropy_equal_autograd_of_the_plain_functions(entropy_grad):
    g = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(2, 5, 11, generator=g)).requires_grad_()
    y = torch.randint(0, 11, (2, 5), generator=g)
    w_lp, w_h = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    lp, h = logprobs_and_entropy(z, y, entropy_grad)
    (got,) = torch.autograd.grad((lp * w_lp).sum() + ((h * w_h).sum() if entropy_grad else 0), z)
    lp0, h0 = logprobs_from_logits(z, y), entropy_from_logits(z)
    (want,) = torch.autograd.grad((lp0 * w_lp).sum() + ((h0 * w_h).sum() if entropy_grad else 0), z)
    assert torch.allclose(lp, lp0, atol=1e-5) and torch.allclose(h, h0, atol=1e-5)
    assert torch.allclose(got, want, atol=1e-5)
    assert h.requires_grad == entropy_grad


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_row_blocked_reductions_are_bitwise_those_of_one_pass(monkeypatch, rows):
    """logsumexp, log-probs, entropy and the fused function's values taken REDUCE_ROWS rows at a time (10 rows in
    blocks of 1, 3 or 4, the last one short) equal one pass (one block of all rows) bit for bit; the plain functions
    equal the one-pass maths bit for bit."""
    import ppolm.ops as ops

    g = torch.Generator().manual_seed(1)
    z = 4 * torch.randn(2, 5, 300, generator=g)
    y = torch.randint(0, 300, (2, 5), generator=g)

    def values(block_rows: int) -> list[torch.Tensor]:
        monkeypatch.setattr(ops, "REDUCE_ROWS", block_rows)
        return [ops.logsumexp_rows(z), logprobs_from_logits(z, y), entropy_from_logits(z),
                *logprobs_and_entropy(z, y)]

    one_pass, blocked = values(10**9), values(rows)
    assert all(torch.equal(a, b) for a, b in zip(one_pass, blocked))
    lse = torch.logsumexp(z, dim=-1)
    plain = [lse, torch.gather(z, -1, y.unsqueeze(-1)).squeeze(-1) - lse, lse - (torch.softmax(z, -1) * z).sum(-1)]
    assert all(torch.equal(a, b) for a, b in zip(blocked, plain))
    assert ops.logsumexp_rows(z[:0]).shape == (0, 5)


def test_kl_estimators_hand_computed():
    lp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    log_r = math.log(0.5)
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(-log_r)
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.5 * log_r**2)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx((0.5 - 1) - log_r)
    assert kl_estimate(lp, lp, "k3").item() == 0.0
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k9")


def test_shaped_rewards_score_at_last_token():
    scores = T([1.0, 2.0])
    lp = T([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = T([[-1.5, -1.0, -2.0], [-1.0, -1.0, -1.0]])
    mask = T([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    rewards, kl = shaped_rewards(scores, lp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, T([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    # row 0: -0.1 * 0.5 at t=0, score 1.0 at the last real token t=1; row 1 is empty: no reward anywhere.
    assert torch.allclose(rewards, T([[-0.05, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_gae_hand_computed_with_mask():
    rewards = T([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = T([[0.5, 0.4, 0.3], [1.0, 1.0, 9.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: d2 = 0.7; d1 = 0.9*0.3-0.4 = -0.13, A1 = -0.13+0.45*0.7 = 0.185; d0 = 0.36-0.5, A0 = -0.14+0.45*0.185
    # row 1: position 2 is padding (its value 9 must be ignored): A1 = 2-1 = 1; A0 = 0.9*1-1 + 0.45*1 = 0.35
    expected = T([[-0.14 + 0.45 * 0.185, 0.185, 0.7], [0.35, 1.0, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-6)


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 6), torch.randn(4, 6)
    mask = T([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] + [0.0] * 5, [1.0] * 5 + [0.0]])
    adv, ret = gae(rewards * mask, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1])
    assert torch.allclose(adv, (reward_to_go - values) * mask, atol=1e-5)
    assert torch.allclose(ret, reward_to_go * mask, atol=1e-5)


def test_policy_loss_hand_computed():
    mask = T([[1.0, 1.0]])
    out = policy_loss(T([[0.0, math.log(1.5)]]), T([[0.0, 0.0]]), T([[1.0, 1.0]]), mask, clip_eps=0.2)
    # ratio [1, 1.5]; -A*ratio = [-1, -1.5]; clipped [-1, -1.2]; max -> [-1, -1.2]
    assert out.loss.item() == pytest.approx(-1.1, abs=1e-6)
    assert out.clipfrac.item() == pytest.approx(0.5)
    assert out.approx_kl.item() == pytest.approx(0.5 * (0.5 - math.log(1.5)), abs=1e-6)
    neg = policy_loss(T([[0.0, math.log(0.5)]]), T([[0.0, 0.0]]), T([[-1.0, -1.0]]), mask, clip_eps=0.2)
    # ratio [1, 0.5]; -A*ratio = [1, 0.5]; clipped [1, 0.8]; max -> [1, 0.8]
    assert neg.loss.item() == pytest.approx(0.9, abs=1e-6)


def test_policy_loss_gradient_zero_when_clipped():
    lp = T([[math.log(1.5)]]).requires_grad_()
    policy_loss(lp, T([[0.0]]), T([[1.0]]), T([[1.0]]), clip_eps=0.2).loss.backward()
    assert lp.grad.item() == 0.0  # ratio beyond 1+eps with A>0: no incentive to move further


def test_policy_loss_log_ratio_clamp_keeps_finite():
    out = policy_loss(T([[500.0]]), T([[0.0]]), T([[-1.0]]), T([[1.0]]), clip_eps=0.2, log_ratio_clamp=20.0)
    assert torch.isfinite(out.loss)


def test_value_loss_hand_computed():
    out = value_loss(T([[1.0, 2.0]]), T([[1.0, 1.0]]), T([[1.5, 1.0]]), T([[1.0, 1.0]]), clip_eps=0.2)
    # clipped values [1.0, 1.2]; errors [0.25, 1.0] vs [0.25, 0.04]; 0.5 * mean(max) = 0.5 * 0.625
    assert out.loss.item() == pytest.approx(0.3125)
    assert out.clipfrac.item() == 0.0
    unclipped = value_loss(T([[1.0, 2.0]]), T([[1.0, 1.0]]), T([[1.5, 1.0]]), T([[1.0, 1.0]]), clip_eps=None)
    assert unclipped.loss.item() == pytest.approx(0.3125)
    out2 = value_loss(T([[1.0]]), T([[0.0]]), T([[0.0]]), T([[1.0]]), clip_eps=0.2)
    # values-returns = 1 -> 1; clipped value 0.2 -> 0.04; max = 1 -> loss 0.5
    assert out2.loss.item() == pytest.approx(0.5)


def test_padding_does_not_change_losses():
    torch.manual_seed(1)
    lp, old, adv = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    vals, old_v, ret = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).float()
    pad = lambda x, v: torch.cat([x, torch.full((3, 3), v)], 1)  # noqa: E731
    mpad = torch.cat([mask, torch.zeros(3, 3)], 1)
    a = policy_loss(lp, old, adv, mask, 0.2)
    b = policy_loss(pad(lp, 7.0), pad(old, -3.0), pad(adv, 100.0), mpad, 0.2)
    assert torch.allclose(a.loss, b.loss) and torch.allclose(a.clipfrac, b.clipfrac)
    va = value_loss(vals, old_v, ret, mask, 0.2)
    vb = value_loss(pad(vals, 5.0), pad(old_v, 1.0), pad(ret, -9.0), mpad, 0.2)
    assert torch.allclose(va.loss, vb.loss)
    r1, _ = gae(adv * mask, vals, mask, 0.99, 0.95)
    r2, _ = gae(pad(adv * mask, 0.0), pad(vals, 42.0), mpad, 0.99, 0.95)
    assert torch.allclose(r1, r2[:, :4], atol=1e-6)


def test_token_count_normalisation_makes_accumulation_exact():
    torch.manual_seed(2)
    lp, old, adv = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    mask = (torch.rand(4, 5) > 0.3).float()
    whole = policy_loss(lp, old, adv, mask, 0.2).loss
    n = float(mask.sum())
    parts = sum(policy_loss(lp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], 0.2, norm=n).loss
                for i in range(4))
    assert torch.allclose(whole, parts, atol=1e-6)


def test_entropy_bonus_sft_pairwise_explained_variance():
    mask = T([[1.0, 0.0]])
    assert entropy_bonus(T([[2.0, 9.0]]), mask).item() == 2.0
    assert sft_loss(T([[-1.0, -3.0]]), T([[1.0, 1.0]])).item() == 2.0
    assert pairwise_loss(T([0.0]), T([0.0])).item() == pytest.approx(math.log(2.0))
    assert pairwise_loss(T([2.0]), T([0.0])).item() == pytest.approx(math.log(1 + math.exp(-2.0)))
    ret = T([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4)
    assert explained_variance(ret, ret, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 4) + 2.5, ret, m).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_hand_computed():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000.0)
    ctl.update(12.0, n_steps=100)  # error clipped to +0.2 -> 0.1 * (1 + 0.2 * 100 / 10000)
    assert ctl.value == pytest.approx(0.1002)
    ctl2 = AdaptiveKLController(0.1, target=6.0, horizon=10000.0)
    ctl2.update(3.0, n_steps=100)  # error -0.5 clipped to -0.2
    assert ctl2.value == pytest.approx(0.0998)
    ctl3 = AdaptiveKLController(0.1, target=6.0, horizon=10000.0)
    ctl3.update(6.6, n_steps=1000)  # error 0.1 inside the clip
    assert ctl3.value == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 10)
    assert fixed.value == 0.3
    state = ctl.state_dict()
    fresh = AdaptiveKLController(1.0, 6.0, 10000.0)
    fresh.load_state_dict(state)
    assert fresh.value == ctl.value
