"""`algo.policy_loss` (ppo with DAPO's decoupled clip, gspo, cispo), DAPO's overlong shaping and dynamic sampling:
hand-computed numbers, the papers' definitions, accumulation 1 x 4 = 4 x 1 (pure and through PPOTrainer.update),
the config's refusals and defaults."""

import math
from pathlib import Path

import pytest
import torch

from ppolm.algo.aggregation import agg_norm
from ppolm.algo.losses import policy_loss
from ppolm.algo.policy_losses import POLICY_LOSSES, cispo_loss, gspo_loss, ppo_loss, resolve_clip
from ppolm.rewards.overlong import overlong_penalty
from ppolm.trainers.dynamic_sampling import (REFILL_STREAM, Round, concat_rollouts, fill_batch, refill_rows,
                                             refill_streams, varied_groups)
from ppolm.types import Rollout
from test_loss_agg import first_step_gradients  # the first optimizer step's gradient of a trainer

ROOT = Path(__file__).resolve().parents[1]
T = torch.tensor
LN = math.log


# ---- ppo: DAPO's decoupled clip range ----------------------------------------------------------------------
def test_ppo_clip_higher_hand_computed():
    mask = T([[1.0, 1.0]])
    lp, old = T([[LN(1.25), LN(0.75)]]), torch.zeros(1, 2)
    adv = T([[1.0, -1.0]])
    # ratio 1.25 with A = +1: inside 1 + 0.28 (term -1.25), beyond 1 + 0.2 (term -1.2); ratio 0.75 with A = -1:
    # below 1 - 0.2 either way, max(0.75, 0.8) = 0.8
    assert ppo_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28).loss.item() == pytest.approx((-1.25 + 0.8) / 2)
    assert ppo_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2).loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    x = lp.clone().requires_grad_(True)
    ppo_loss(x, old, adv, mask, clip_low=0.2, clip_high=0.28).loss.backward()
    assert x.grad[0, 0].item() == pytest.approx(-1.25 / 2) and x.grad[0, 1].item() == 0.0  # clipped: no gradient


def test_ppo_default_is_bit_identical_to_the_symmetric_clip():
    torch.manual_seed(0)
    lp, old, adv = torch.randn(5, 6) * 0.3, torch.randn(5, 6) * 0.3, torch.randn(5, 6)
    mask = (torch.rand(5, 6) > 0.3).float()
    low, high = resolve_clip("ppo", 0.2, None, None)
    assert (low, high) == (0.2, 0.2)
    a = ppo_loss(lp, old, adv, mask, clip_low=low, clip_high=high, norm=7.0, agg="seq_mean_token_mean")
    b = policy_loss(lp, old, adv, mask, 0.2, norm=7.0, agg="seq_mean_token_mean")
    assert torch.equal(a.loss, b.loss) and torch.equal(a.clipfrac, b.clipfrac)


# ---- gspo --------------------------------------------------------------------------------------------------
def test_gspo_hand_computed():
    """Row 0: token ratios 2 and 1, s = sqrt(2), A = +1: clipped at 1.2 (term -1.2, no gradient). Row 1: one
    token, s = 0.9, A = -1: term 0.9 (unclipped). Mean over the two responses."""
    lp = T([[LN(2.0), 0.0], [LN(0.9), 0.0]]).requires_grad_(True)
    old, mask = torch.zeros(2, 2), T([[1.0, 1.0], [1.0, 0.0]])
    adv = T([[1.0, 1.0], [-1.0, 0.0]])  # one advantage per response, broadcast over its tokens
    out = gspo_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert out.loss.item() == pytest.approx((-1.2 + 0.9) / 2, abs=1e-6)
    assert out.clipfrac.item() == pytest.approx(2 / 3)  # row 0's two tokens of the three
    assert out.ratio_mean.item() == pytest.approx((2 * math.sqrt(2) + 0.9) / 3, abs=1e-6)
    out.loss.backward()
    # d/dlp of 1/2 * (-A1 * s1), ds1/dlp = s1 (one token); row 0 is clipped; padding gets nothing
    assert torch.allclose(lp.grad, T([[0.0, 0.0], [0.45, 0.0]]), atol=1e-6)


def test_gspo_paper_clip_range_acts_on_tiny_sequence_ratios():
    """3e-4 / 4e-4 (Zheng et al. 2025): a response whose mean log-ratio is 5e-4 is already clipped for A > 0."""
    mask = torch.ones(1, 4)
    lp = torch.full((1, 4), 5e-4)
    low, high = resolve_clip("gspo", 0.2, None, None)
    assert (low, high) == (3e-4, 4e-4)
    assert gspo_loss(lp, torch.zeros(1, 4), torch.ones(1, 4), mask, clip_low=low, clip_high=high).clipfrac.item() == 1.0
    assert gspo_loss(lp, torch.zeros(1, 4), torch.ones(1, 4), mask, clip_low=0.2, clip_high=0.2).clipfrac.item() == 0.0


def test_gspo_equals_the_sequence_level_objective():
    """With one advantage per response, the GSPO-token form gives the loss and gradient of eq. 5 computed
    directly: 1/G sum_i max(-A_i s_i, -A_i clip(s_i)), s_i = exp(mean_t log(pi / pi_old))."""
    torch.manual_seed(4)
    lengths = T([5, 1, 3, 4, 2, 5])
    mask = (torch.arange(5) < lengths.unsqueeze(1)).double()
    old = torch.randn(6, 5, dtype=torch.float64) * 0.1
    lp = (old + torch.randn(6, 5, dtype=torch.float64) * 0.08).requires_grad_(True)
    a = torch.randn(6, dtype=torch.float64)
    adv = a.unsqueeze(1) * mask
    out = gspo_loss(lp, old, adv, mask, clip_low=0.05, clip_high=0.1)
    (g,) = torch.autograd.grad(out.loss, lp)
    s = torch.exp(((lp - old) * mask).sum(-1) / mask.sum(-1))
    direct = torch.maximum(-a * s, -a * s.clamp(0.95, 1.1)).mean()
    (g_direct,) = torch.autograd.grad(direct, lp)
    assert 0 < int(((s < 0.95) | (s > 1.1)).sum()) < 6  # some responses clipped, some not
    assert torch.allclose(out.loss.double(), direct, atol=1e-12) and torch.allclose(g, g_direct, atol=1e-12)


# ---- cispo -------------------------------------------------------------------------------------------------
def test_cispo_hand_computed_every_token_keeps_its_gradient():
    """ratios 1.5, 0.5, 5.0 with A = +1, -1, +1 and the defaults (no lower bound, cap 4): weights 1.5, 0.5, 4.
    The loss is -mean(w A log pi); the gradient of each token is -w A / 3, also for the clipped one, where PPO's
    is 0."""
    old = T([[LN(0.2), LN(0.4), LN(0.1)]])
    lp = (old + T([[LN(1.5), LN(0.5), LN(5.0)]])).requires_grad_(True)
    adv, mask = T([[1.0, -1.0, 1.0]]), torch.ones(1, 3)
    low, high = resolve_clip("cispo", 0.2, None, None)
    assert (low, high) == (1.0, 3.0)
    out = cispo_loss(lp, old, adv, mask, clip_low=low, clip_high=high)
    w = T([1.5, 0.5, 4.0])
    assert out.loss.item() == pytest.approx(float(-(w * adv[0] * lp[0].detach()).mean()), abs=1e-6)
    assert out.clipfrac.item() == pytest.approx(1 / 3)
    out.loss.backward()
    assert torch.allclose(lp.grad, -(w * adv[0] / 3).unsqueeze(0), atol=1e-6)
    ppo_lp = lp.detach().clone().requires_grad_(True)
    ppo_loss(ppo_lp, old, adv, mask, clip_low=0.2, clip_high=0.2).loss.backward()
    assert ppo_lp.grad[0, 0].item() == 0.0 and ppo_lp.grad[0, 2].item() == 0.0  # what CISPO keeps
    # a lower bound, when asked for: the 0.5 weight becomes 0.8
    lp2 = lp.detach().clone().requires_grad_(True)
    cispo_loss(lp2, old, adv, mask, clip_low=0.2, clip_high=0.28).loss.backward()
    assert torch.allclose(lp2.grad, -(T([1.28, 0.8, 1.28]) * adv[0] / 3).unsqueeze(0), atol=1e-6)


# ---- every variant: accumulation 1 x 4 = 4 x 1 --------------------------------------------------------------
@pytest.mark.parametrize("name, agg", [("ppo", "token_mean"), ("ppo", "seq_mean_token_sum_norm"),
                                       ("gspo", "seq_mean_token_mean"), ("cispo", "token_mean"),
                                       ("cispo", "seq_mean_token_mean")])
def test_accumulation_1x4_equals_4x1(name, agg):
    """Four micro-batches of 2 rows, each divided by the whole minibatch's normaliser, give the loss and gradient
    of the 8 rows at once (ragged rows, one empty)."""
    torch.manual_seed(5)
    lengths = T([5, 1, 3, 0, 2, 5, 4, 1])
    mask = (torch.arange(5) < lengths.unsqueeze(1)).double()
    old = torch.randn(8, 5, dtype=torch.float64) * 0.1 - 1.0
    lp = (old + torch.randn(8, 5, dtype=torch.float64) * 0.3).requires_grad_(True)
    adv = torch.randn(8, 1, dtype=torch.float64) * mask  # one advantage per response
    fn = POLICY_LOSSES[name].fn
    kw = {"clip_low": 0.1, "clip_high": 0.15}
    whole = fn(lp, old, adv, mask, **kw, agg=agg, norm=float(agg_norm(agg, mask, 6))).loss
    (g_whole,) = torch.autograd.grad(whole, lp)
    parts = [slice(2 * i, 2 * i + 2) for i in range(4)]
    norm = float(sum(agg_norm(agg, mask[s], 6) for s in parts))
    acc = sum(fn(lp[s], old[s], adv[s], mask[s], **kw, agg=agg, norm=norm).loss for s in parts)
    (g_acc,) = torch.autograd.grad(acc, lp)
    assert torch.allclose(acc, whole, atol=1e-12) and torch.allclose(g_acc, g_whole, atol=1e-12)
    assert g_whole.abs().sum() > 0


def test_registry_matches_the_config():
    from ppolm.config import AlgoConfig, PPORunConfig, describe

    assert list(POLICY_LOSSES) == list(AlgoConfig.model_fields["policy_loss"].annotation.__args__)
    rows = {key: (default, doc) for key, default, doc in describe(PPORunConfig)}
    new = {"algo.policy_loss": "'ppo'", "algo.clip_eps_low": "None", "algo.clip_eps_high": "None",
           "algo.dynamic_sampling": "False", "algo.dynamic_sampling_max_rounds": "4", "algo.overlong_buffer": "0",
           "algo.overlong_penalty": "1.0"}
    for key, default in new.items():  # what `ppolm ppo --describe` prints
        assert rows[key][0] == default and rows[key][1], key
    assert all(n in rows["algo.policy_loss"][1] for n in POLICY_LOSSES)


# ---- DAPO's overlong shaping -------------------------------------------------------------------------------
def test_overlong_penalty_hand_computed():
    # L_max 20, L_cache 4: nothing up to 16 tokens, then -1/4 per token, -1 at 20
    got = overlong_penalty(T([10, 16, 17, 18, 20]), max_len=20, buffer=4)
    assert torch.allclose(got, T([0.0, 0.0, -0.25, -0.5, -1.0]))
    assert torch.allclose(overlong_penalty(T([18, 25]), 20, 4, penalty=0.5), T([-0.25, -0.5]))  # > L_max: -factor
    # the paper's run: 20480 with a 4096 buffer
    assert torch.allclose(overlong_penalty(T([16384, 18432, 20480]), 20480, 4096), T([0.0, -0.5, -1.0]))
    assert torch.equal(overlong_penalty(T([20, 3]), 20, 0), torch.zeros(2))


# ---- DAPO's dynamic sampling: the pure parts ---------------------------------------------------------------
def _rollout(n: int, prompt_len: int, resp_len: int, tag: str) -> Rollout:
    return Rollout(torch.full((n, prompt_len), 7), torch.ones(n, prompt_len), torch.full((n, resp_len), 9),
                   torch.ones(n, resp_len), torch.zeros(n, dtype=torch.bool), [f"{tag}{i}" for i in range(n)],
                   [f"{tag}c{i}" for i in range(n)])


def test_varied_groups_and_refill_rows():
    assert varied_groups(T([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2).tolist() == [False, True, False]
    one = refill_rows(10, seed=3, step=5, round_=1, global_batch=4, rank=0, local_batch=4)
    two = refill_rows(10, 3, 5, 1, 4, 0, 2) + refill_rows(10, 3, 5, 1, 4, 1, 2)
    assert one == two  # the same prompts for any process split
    assert one != refill_rows(10, 3, 5, 2, 4, 0, 4) and one != refill_rows(10, 3, 6, 1, 4, 0, 4)
    assert len(refill_rows(3, 0, 0, 1, 8, 0, 8)) == 8  # more prompts than the set holds: several permutations
    streams = refill_streams(one[:2], round_=2, global_batch=4, group_size=3)
    assert streams == [REFILL_STREAM + 12 + j for j in range(6)]


def test_concat_rollouts_repads_left_and_right():
    a, b = _rollout(2, 3, 2, "a"), _rollout(1, 5, 4, "b")
    c = concat_rollouts([a, b], pad_id=0)
    assert c.prompt_ids.shape == (3, 5) and c.response_ids.shape == (3, 4)
    assert c.prompt_mask[0].tolist() == [0, 0, 1, 1, 1] and c.response_mask[0].tolist() == [1, 1, 0, 0]
    assert c.prompt_ids[0].tolist() == [0, 0, 7, 7, 7] and c.prompts == ["a0", "a1", "b0"]


def _round(raw: list[float], tag: str) -> Round:
    return Round(_rollout(len(raw), 2, 2, tag), T(raw) * 10, T(raw))


def test_fill_batch_keeps_varied_groups_and_refills():
    first = _round([1, 1, 0, 1], "r0")  # groups of 2: [1, 1] dropped, [0, 1] kept
    calls = []

    def sample(r):
        calls.append(r)
        return _round([0, 0, 1, 0], f"r{r}")  # [0, 0] dropped, [1, 0] kept

    batch, scores, m = fill_batch(first, sample, groups=2, group_size=2, max_rounds=4, any_short=lambda s: s,
                                  global_sum=float, pad_id=0)
    assert calls == [1] and batch.prompts == ["r02", "r03", "r12", "r13"]
    assert scores.tolist() == [0.0, 10.0, 10.0, 0.0]
    assert m == {"dynamic_sampling/rounds": 2.0, "dynamic_sampling/dropped_groups": 2.0,
                 "dynamic_sampling/filled_groups": 0.0}


def test_fill_batch_bound_fills_with_dropped_groups_and_follows_the_other_processes():
    flat = lambda r: _round([1, 1, 0, 0], f"r{r}")  # noqa: E731
    batch, _, m = fill_batch(flat(0), flat, groups=2, group_size=2, max_rounds=3, any_short=lambda s: s,
                             global_sum=float, pad_id=0)
    assert m["dynamic_sampling/rounds"] == 3.0 and m["dynamic_sampling/filled_groups"] == 2.0
    assert batch.prompts == ["r00", "r01", "r02", "r03"]  # the first dropped groups
    # this process is full after round 0, another is not: it runs the same rounds
    calls = []
    full = _round([0, 1, 1, 0], "r0")
    fill_batch(full, lambda r: calls.append(r) or flat(r), groups=2, group_size=2, max_rounds=3,
               any_short=lambda short: True, global_sum=float, pad_id=0)
    assert calls == [1, 2]


# ---- the config refuses what does not mean what it says, in one line ----------------------------------------
@pytest.mark.parametrize("overrides, needle", [
    (("algo.policy_loss=gspo", "algo.estimator=grpo", "rollout.samples_per_prompt=4", "loss.agg=token_mean"),
     "seq_mean_token_mean"),
    (("algo.policy_loss=cispo", "ppo.clip_eps=0.1"), "algo.clip_eps_low"),
    (("algo.dynamic_sampling=true",), "group estimator"),
    (("algo.dynamic_sampling=true", "algo.estimator=reinforce_pp", "rollout.samples_per_prompt=4"),
     "group estimator"),
    (("algo.dynamic_sampling_max_rounds=8",), "which is off"),
    (("algo.overlong_penalty=0.5",), "algo.overlong_buffer"),
    (("algo.overlong_buffer=17",), "rollout.max_new_tokens (16)"),
    (("algo.clip_eps_low=1.5",), "algo.clip_eps_low"),
])
def test_config_refuses(overrides, needle):
    from ppolm.config import PPORunConfig, load_config
    from ppolm.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(PPORunConfig, ROOT / "configs/tiny.yaml", list(overrides))
    assert needle in str(err.value) and "\n" not in str(err.value).strip()


# ---- through the trainer -----------------------------------------------------------------------------------
GROUPS = ["algo.estimator=grpo", "rollout.samples_per_prompt=4", "rollout.batch_size=4"]  # 16 rows
COMMON = ["log.progress=false", "log.tensorboard=false", "checkpoint.every=0", "max_steps=1"]


def _trainer(tmp_path, *overrides, reward_fn=None):
    from ppolm.config import PPORunConfig, load_config
    from ppolm.trainers.ppo import PPOTrainer

    cfg = load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [*COMMON, f"output_dir={tmp_path}", *overrides])
    return PPOTrainer(cfg, reward_fn=reward_fn or (lambda prompts, completions, **rows:
                                                   [len(set(c)) / 10 for c in completions]))


@pytest.mark.parametrize("variant", ["gspo", "cispo"])
def test_update_accumulation_4x1_equals_1x4(tmp_path, variant):
    """The first optimizer step's gradient with 4 micro-batches equals the one with 1 (minibatches of 2 groups)."""
    grads, losses = [], []
    for accum in (1, 4):
        t = _trainer(tmp_path / str(accum), *GROUPS, f"algo.policy_loss={variant}", "ppo.epochs=1",
                     "ppo.fuse_first_forward=false", f"ppo.grad_accum_steps={accum}", "algo.clip_eps_low=0.2",
                     "algo.clip_eps_high=0.2")
        metrics, grad = first_step_gradients(t)
        losses.append(metrics)
        grads.append(grad)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    scale = max(float(g.abs().max()) for g in grads[0].values())
    assert scale > 0
    worst = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])
    assert worst < 1e-5 * scale, (worst, scale)
    assert losses[0]["loss/policy"] == pytest.approx(losses[1]["loss/policy"], rel=1e-5, abs=1e-7)


def test_dynamic_sampling_trains_on_varied_groups_only(tmp_path):
    """Half of the prompts get a reward that does not depend on the answer (their groups are dropped); the batch
    is refilled from further rounds, and every group the update sees has differing scores."""
    def reward(prompts, completions, **rows):  # constant for prompts of even length: those groups are all equal
        return [0.5 if len(p) % 2 == 0 else len(set(c)) / 10 for p, c in zip(prompts, completions)]

    t = _trainer(tmp_path, *GROUPS, "algo.dynamic_sampling=true", "algo.dynamic_sampling_max_rounds=6",
                 "kl.in=loss", "kl.estimator=k3", "algo.overlong_buffer=4", reward_fn=reward)
    seen = []
    experience = t.experience

    def spy(rollout, scores, policy_out=None):
        seen.append(scores.clone())
        return experience(rollout, scores, policy_out)

    t.experience = spy
    m = t.step(0).metrics
    assert m["dynamic_sampling/dropped_groups"] > 0 and m["dynamic_sampling/rounds"] >= 2
    assert m["dynamic_sampling/filled_groups"] == 0.0
    assert seen[0].shape == (16,) and bool(varied_groups(seen[0], 4).all())
    assert m["reward/overlong_penalty_mean"] <= 0.0 and "time/dynamic_sampling_s" in m
    documented = (ROOT / "docs/metrics.md").read_text()
    assert all(f"`{name}`" in documented for name in m)
