"""`loss.agg`: the three aggregations against hand-computed numbers, accumulation 1 x N = N x 1 in each mode
(pure, and through PPOTrainer.update), and each estimator's paper default."""

import math
from pathlib import Path

import pytest
import torch

from ppolm.algo.aggregation import AGGREGATIONS, agg_loss, agg_norm
from ppolm.algo.estimators import ESTIMATORS
from ppolm.algo.losses import entropy_bonus, kl_loss, policy_loss, token_mean

ROOT = Path(__file__).resolve().parents[1]
T = torch.tensor
MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]

# rows of 3, 1 and 0 response tokens; 100.0 sits on padding and must not count
X = T([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0], [100.0, 100.0, 100.0]])
M = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def first_step_gradients(t) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Run PPO step 0 of trainer `t`; its metrics and the gradient of its first optimizer step."""
    first: list[dict[str, torch.Tensor]] = []
    step = t.optim.step

    def spy(*args, **kwargs):
        out = step(*args, **kwargs)  # the optimizer has stepped; .grad still holds this step's gradient
        if not first:
            first.append({n: p.grad.clone() for n, p in t.actor.named_parameters() if p.grad is not None})
        return out

    t.optim.step = spy
    return t.step(0).metrics, first[0]


def test_registry_names_the_three_modes():
    assert list(AGGREGATIONS) == MODES
    with pytest.raises(ValueError, match="allowed: token_mean, seq_mean_token_mean, seq_mean_token_sum_norm"):
        agg_loss(X, M, "seq_mean")


def test_hand_computed_values_and_normalisers():
    # token_mean: (1 + 2 + 3 + 4) / 4 tokens
    assert agg_loss(X, M, "token_mean").item() == pytest.approx(2.5)
    # seq_mean_token_mean: row means 2 and 4 over the 2 rows that have tokens (the empty row is not a response)
    assert agg_loss(X, M, "seq_mean_token_mean").item() == pytest.approx(3.0)
    # seq_mean_token_sum_norm: row sums 6 and 4 (and 0) over 3 rows x max_len 4; without max_len, R = 3
    assert agg_loss(X, M, "seq_mean_token_sum_norm", max_len=4).item() == pytest.approx(10 / 12)
    assert agg_loss(X, M, "seq_mean_token_sum_norm").item() == pytest.approx(10 / 9)
    assert [float(agg_norm(m, M, 4)) for m in MODES] == [4.0, 2.0, 12.0]
    # a given normaliser replaces the rows' own; no tokens at all gives 0, not NaN
    assert agg_loss(X, M, "seq_mean_token_mean", norm=4.0).item() == pytest.approx(6 / 4)
    assert all(agg_loss(X, torch.zeros_like(M), m).item() == 0.0 for m in MODES)


def test_hand_computed_gradients_weigh_tokens_or_responses():
    x = X.clone().requires_grad_(True)
    agg_loss(x, M, "token_mean").backward()
    assert torch.allclose(x.grad, M / 4)  # every token 1/4
    x.grad = None
    agg_loss(x, M, "seq_mean_token_mean").backward()
    # each response weighs 1/2, shared by its tokens: 1/6 each for the 3-token row, 1/2 for the 1-token row
    assert torch.allclose(x.grad, T([[1 / 6, 1 / 6, 1 / 6], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    x.grad = None
    agg_loss(x, M, "seq_mean_token_sum_norm", max_len=4).backward()
    assert torch.allclose(x.grad, M / 12)  # every token the same constant weight 1 / (rows x max_len)


def test_policy_loss_length_bias_in_each_mode():
    """ratio 1, so the per-token loss is -A: a short right answer (A = +1, 1 token) and a long wrong one
    (A = -1, 3 tokens). token_mean pays the long one per token, GRPO's per-response mean makes the two cancel
    (the wrong answer is penalised less per token because it is long), Dr. GRPO's constant keeps token weights
    equal again."""
    lp = torch.zeros(2, 3)
    adv = T([[1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = T([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    got = {m: policy_loss(lp, lp, adv, mask, 0.2, agg=m).loss.item() for m in MODES}
    assert got == pytest.approx({"token_mean": (-1 + 3) / 4, "seq_mean_token_mean": (-1 + 1) / 2,
                                 "seq_mean_token_sum_norm": (-1 + 3) / (2 * 3)})
    # the KL and entropy terms follow the same aggregation
    ent = T([[2.0, 9.0, 9.0], [1.0, 1.0, 4.0]])
    assert entropy_bonus(ent, mask, agg="seq_mean_token_mean").item() == pytest.approx((2 + 2) / 2)
    ref = T([[math.log(0.5), 0.0, 0.0], [0.0, 0.0, 0.0]])
    k3 = (0.5 - 1) - math.log(0.5)
    assert kl_loss(lp, ref, mask, "k3", agg="seq_mean_token_mean").item() == pytest.approx(k3 / 2, abs=1e-6)
    assert kl_loss(lp, ref, mask, "k3", agg="token_mean").item() == pytest.approx(k3 / 4, abs=1e-6)


def test_token_mean_is_bit_identical_to_the_previous_normalisation():
    torch.manual_seed(0)
    x, mask = torch.randn(6, 7), (torch.rand(6, 7) > 0.4).float()
    n = float(mask.sum())
    assert torch.equal(agg_loss(x, mask, "token_mean", norm=n), token_mean(x, mask, n))
    assert torch.equal(agg_loss(x, mask, "token_mean"), token_mean(x, mask, None))


@pytest.mark.parametrize("mode", MODES)
def test_accumulation_1x4_equals_4x1(mode):
    """Four micro-batches of 2 rows, each divided by the whole minibatch's normaliser (the sum of theirs), give
    the loss and gradient of the 8 rows at once; dividing each by its own normaliser does not."""
    torch.manual_seed(3)
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    lengths = T([5, 1, 3, 0, 2, 5, 4, 1])  # ragged, one empty response
    mask = (torch.arange(5) < lengths.unsqueeze(1)).double()
    whole = agg_loss(x, mask, mode, max_len=6)
    (g_whole,) = torch.autograd.grad(whole, x)
    parts = [slice(2 * i, 2 * i + 2) for i in range(4)]
    norm = float(sum(agg_norm(mode, mask[s], 6) for s in parts))
    assert norm == float(agg_norm(mode, mask, 6))
    acc = sum(agg_loss(x[s], mask[s], mode, norm=norm, max_len=6) for s in parts)
    (g_acc,) = torch.autograd.grad(acc, x)
    assert torch.allclose(acc, whole, atol=1e-12) and torch.allclose(g_acc, g_whole, atol=1e-12)
    local = sum(agg_loss(x[s], mask[s], mode, max_len=6) for s in parts)
    assert not torch.allclose(local, whole)


def test_paper_defaults_and_group_estimators_match_the_config():
    from ppolm.config import GROUP_ESTIMATORS

    assert {n: e.loss_agg for n, e in ESTIMATORS.items()} == {
        "gae": "token_mean", "grpo": "seq_mean_token_mean", "rloo": "seq_mean_token_sum_norm",
        "reinforce_pp": "token_mean", "dr_grpo": "seq_mean_token_sum_norm"}
    assert {n for n, e in ESTIMATORS.items() if e.group_baseline} == set(GROUP_ESTIMATORS)


def test_describe_lists_loss_agg():
    from ppolm.config import PPORunConfig, describe

    rows = {key: (default, doc) for key, default, doc in describe(PPORunConfig)}
    default, doc = rows["loss.agg"]
    assert default == "None" and all(m in doc for m in MODES) and "paper default" in doc


# ---- through the trainer: every term of PPOTrainer.update accumulates exactly ---------------------------------
GROUPS = ["rollout.samples_per_prompt=4", "rollout.batch_size=4"]  # 16 rows, minibatches of 8 = 2 groups


@pytest.mark.parametrize("overrides, resolved", [
    (("algo.estimator=gae", "loss.agg=seq_mean_token_mean"), "seq_mean_token_mean"),  # + value loss (tokens)
    (("algo.estimator=grpo", *GROUPS, "loss.agg=token_mean"), "token_mean"),
    (("algo.estimator=rloo", *GROUPS), "seq_mean_token_sum_norm"),  # null: rloo's default
], ids=["gae-seq_mean_token_mean", "grpo-token_mean", "rloo-auto"])
def test_update_accumulation_4x1_equals_1x4(tmp_path, overrides, resolved):
    from ppolm.config import PPORunConfig, load_config
    from ppolm.trainers.ppo import PPOTrainer

    common = ["log.progress=false", "log.tensorboard=false", "checkpoint.every=0", "max_steps=1", "ppo.epochs=1",
              "ppo.fuse_first_forward=false", "kl.in=loss", "kl.estimator=k3", "kl.coef=0.1", "ppo.ent_coef=0.01",
              *overrides]
    grads, losses = [], []
    for accum in (1, 4):
        cfg = load_config(PPORunConfig, ROOT / "configs/tiny.yaml",
                          [*common, f"output_dir={tmp_path / str(accum)}", f"ppo.grad_accum_steps={accum}"])
        # a reward that differs between the responses of a group (the toy task's is ~0 for a random model)
        t = PPOTrainer(cfg, reward_fn=lambda prompts, completions, **rows: [len(set(c)) / 10 for c in completions])
        assert t.loss_agg == resolved
        metrics, grad = first_step_gradients(t)
        losses.append(metrics)
        grads.append(grad)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert losses[0]["loss/policy"] != 0.0
    scale = max(float(g.abs().max()) for g in grads[0].values())
    worst = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])
    assert worst < 1e-5 * scale, (worst, scale)  # rounding only: a wrong share is off by percents
    for key in ("loss/policy", "loss/kl", *(["loss/value"] if "algo.estimator=gae" in overrides else [])):
        assert losses[0][key] == pytest.approx(losses[1][key], rel=1e-5, abs=1e-7), key
    text = (tmp_path / "4" / "config.yaml").read_text()
    assert ("# loss.agg null resolved to" in text) == ("loss.agg=" not in " ".join(overrides))
