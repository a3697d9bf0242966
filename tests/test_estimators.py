"""The advantage estimators of `algo.estimator` and the KL loss term against hand-computed numbers."""

import math
import re

import pytest
import torch

from ppolm.algo.advantages import gae
from ppolm.algo.estimators import (
    ESTIMATORS, discounted_returns, dr_grpo_advantages, estimate, get_estimator, grpo_advantages, per_token,
    rloo_advantages,
)
from ppolm.algo.losses import kl_loss

T = torch.tensor


def test_grpo_hand_computed_equal_group_and_group_of_one():
    # group 1: [1, 0, 0, 1] mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 2 all equal -> 0
    adv = grpo_advantages(T([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert torch.allclose(adv, T([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]), atol=1e-6)
    # a group of one has no baseline: the reward itself (mean 0, std 1)
    assert torch.equal(grpo_advantages(T([0.3, -1.0]), group_size=1), T([0.3, -1.0]))


def test_rloo_hand_computed_leave_one_out():
    # [1, 0, 0, 1]: 1 - (0 + 0 + 1) / 3 = 2/3, 0 - (1 + 0 + 1) / 3 = -2/3; [3, 1]: 3 - 1 = 2, 1 - 3 = -2
    assert torch.allclose(rloo_advantages(T([1.0, 0.0, 0.0, 1.0]), 4), T([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    assert torch.allclose(rloo_advantages(T([3.0, 1.0, 5.0, 5.0]), 2), T([2.0, -2.0, 0.0, 0.0]))
    assert torch.equal(rloo_advantages(T([0.5]), 1), T([0.5]))


def test_dr_grpo_is_mean_centred_without_std_and_rloo_is_its_rescaling():
    r = T([1.0, 0.0, 0.0, 1.0, 0.2, 0.2, 0.2, 0.2])
    assert torch.allclose(dr_grpo_advantages(r, 4), T([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(rloo_advantages(r, 4), 4 / 3 * dr_grpo_advantages(r, 4))
    assert torch.equal(dr_grpo_advantages(T([0.7, 0.1]), 1), T([0.7, 0.1]))


def test_groups_must_split_the_rows():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(T([1.0, 2.0, 3.0]), 4)
    with pytest.raises(ValueError, match="allowed: gae, grpo"):
        get_estimator("ppo")


def test_discounted_returns_hand_computed_with_padding():
    rewards = T([[0.1, -0.2, 1.0, 9.0], [0.5, 7.0, 7.0, 7.0]])  # 9.0 / 7.0 sit on padding and must not leak
    mask = T([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(discounted_returns(rewards, mask, 1.0), T([[0.9, 0.8, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]]))
    # gamma 0.5: G2 = 1.0, G1 = -0.2 + 0.5 * 1.0 = 0.3, G0 = 0.1 + 0.5 * 0.3 = 0.25
    assert torch.allclose(discounted_returns(rewards, mask, 0.5)[0], T([0.25, 0.3, 1.0, 0.0]))


def test_outcome_estimate_broadcasts_per_sequence_and_masks_padding():
    # two groups of two; total rewards (padding excluded): 1.0, 0.0 | 0.5, 0.5
    rewards = T([[0.0, 1.0, 5.0], [0.0, 0.0, 5.0], [0.5, 0.0, 0.0], [0.2, 0.3, 5.0]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    adv, ret = estimate("rloo", rewards, None, mask, group_size=2, gamma=1.0, lam=0.95)
    assert torch.allclose(adv, T([[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(ret, adv)
    adv, _ = estimate("dr_grpo", rewards, None, mask, group_size=2, gamma=1.0, lam=0.95)
    assert torch.allclose(adv[:2], T([[0.5, 0.5, 0.0], [-0.5, -0.5, 0.0]]))
    adv, _ = estimate("grpo", rewards, None, mask, group_size=2, gamma=1.0, lam=0.95)
    s = 1 / math.sqrt(2)  # unbiased std of [1, 0]
    assert torch.allclose(adv[0], T([0.5 / s, 0.5 / s, 0.0]), atol=1e-5)
    assert torch.equal(adv[2:], torch.zeros(2, 3))  # all-equal group
    assert torch.equal(per_token(T([2.0]), T([[1.0, 0.0]])), T([[2.0, 0.0]]))


def test_estimate_gae_and_reinforce_pp_dispatch():
    rewards = T([[0.0, 0.0, 1.0]])
    values = T([[0.1, 0.2, 0.3]])
    mask = torch.ones(1, 3)
    a, r = estimate("gae", rewards, values, mask, group_size=1, gamma=1.0, lam=0.9)
    ga, gr = gae(rewards, values, mask, 1.0, 0.9)
    assert torch.equal(a, ga) and torch.equal(r, gr)
    a, _ = estimate("reinforce_pp", rewards, None, mask, group_size=4, gamma=1.0, lam=0.9)
    assert torch.equal(a, T([[1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="needs values"):
        estimate("gae", rewards, None, mask, group_size=1, gamma=1.0, lam=0.9)


def test_registry_critic_and_normalisation_flags():
    assert [n for n, e in ESTIMATORS.items() if e.needs_critic] == ["gae"]
    assert ESTIMATORS["dr_grpo"].loss_agg == "seq_mean_token_sum_norm"
    assert ESTIMATORS["grpo"].loss_agg == "seq_mean_token_mean"
    assert [n for n, e in ESTIMATORS.items() if e.group_baseline] == ["grpo", "rloo", "dr_grpo"]
    assert ESTIMATORS["reinforce_pp"].whiten == "always"


def test_kl_loss_hand_computed_and_gradient():
    lp = T([[math.log(0.5), 0.0]], requires_grad=True)
    ref = T([[math.log(0.25), -3.0]])
    mask = T([[1.0, 0.0]])
    k3 = (0.5 - 1) - math.log(0.5)  # r = ref / pi = 0.5
    loss = kl_loss(lp, ref, mask, "k3")
    assert loss.item() == pytest.approx(k3, abs=1e-6)
    assert kl_loss(lp, ref, mask, "k1").item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    # d/d lp of (exp(ref - lp) - 1 - (ref - lp)) = -r + 1 = 0.5; padding gets no gradient
    assert torch.allclose(lp.grad, T([[0.5, 0.0]]), atol=1e-6)
    assert kl_loss(lp, ref, mask, "k3", norm=4.0).item() == pytest.approx(k3 / 4, abs=1e-6)


def test_describe_lists_the_estimators_and_kl_in():
    from ppolm.config import PPORunConfig, describe, load_config

    rows = {key: (default, doc) for key, default, doc in describe(PPORunConfig)}
    assert rows["algo.estimator"][0] == "'gae'"
    assert all(name in rows["algo.estimator"][1] for name in ESTIMATORS)
    assert rows["kl.in"][0] == "'reward'" and "kl.in_" not in rows
    assert rows["rollout.samples_per_prompt"][0] == "1"
    cfg = load_config(PPORunConfig, None, ["kl.in=loss", "kl.estimator=k3", "algo.estimator=rloo",
                                           "rollout.samples_per_prompt=4"])
    assert cfg.kl.in_ == "loss" and cfg.model_dump(mode="json")["kl"]["in"] == "loss"
    assert rows["loss.agg"][0] == "None" and "paper default" in rows["loss.agg"][1]


@pytest.mark.parametrize("overrides, message", [
    (["algo.estimator=grpo"], "algo.estimator 'grpo' needs rollout.samples_per_prompt >= 2 (got 1)"),
    (["algo.estimator=rloo"], "algo.estimator 'rloo' needs rollout.samples_per_prompt >= 2"),
    (["algo.estimator=dr_grpo"], "algo.estimator 'dr_grpo' needs rollout.samples_per_prompt >= 2"),
    (["kl.in=loss"], "kl.in: 'loss' with kl.estimator: 'k1'"),
    (["kl.in=loss", "kl.coef=0", "kl.adaptive=true"], "kl.in: 'loss' with kl.estimator: 'k1'"),
])
def test_settings_that_do_nothing_are_refused(overrides, message):
    """A group estimator with k = 1 is REINFORCE without a baseline; a k1 KL in the loss has zero expected
    gradient (E_pi[grad log pi] = 0)."""
    from ppolm.config import ConfigError, PPORunConfig, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(PPORunConfig, None, overrides)


def test_settings_that_work_are_accepted():
    from ppolm.config import PPORunConfig, load_config

    for overrides in (["algo.estimator=grpo", "rollout.samples_per_prompt=2", "ppo.minibatch_size=8"],
                      ["algo.estimator=reinforce_pp"], ["kl.in=loss", "kl.estimator=k3"],
                      ["kl.in=loss", "kl.estimator=k2"],
                      ["kl.in=loss", "kl.coef=0"]):  # the KL term is off: nothing to refuse
        load_config(PPORunConfig, None, overrides)


def test_k1_in_the_loss_has_no_expected_gradient_and_k3_has():
    """Why kl.in: loss refuses k1: over every token of a small vocabulary weighted by pi (the exact expectation
    over samples of pi), the gradient of the k1 term is 0; k3's is not."""
    logits = T([0.3, -1.2, 0.8], requires_grad=True)
    ref = torch.log_softmax(T([1.0, 0.0, -1.0]), -1)
    logp = torch.log_softmax(logits, -1)
    p = logp.exp().detach()
    grads = {}
    for est in ("k1", "k3"):
        terms = torch.stack([kl_loss(logp[i].view(1, 1), ref[i].view(1, 1), torch.ones(1, 1), est) for i in range(3)])
        (grads[est],) = torch.autograd.grad((p * terms).sum(), logits, retain_graph=True)
    assert torch.allclose(grads["k1"], torch.zeros(3), atol=1e-7)
    assert grads["k3"].abs().max() > 1e-2
