"""Packed, token-budget micro-batches (ppo.max_tokens): the packing maths by hand, packed == padded on the tiny
models (log-probs, values, entropy, gradients), and a PPO run with packing equal to the padded run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppolm.config import ConfigError, PPORunConfig, load_config
from ppolm.models.packing import (
    VARLEN_SDPA, pack_rows, require_packing, supports_packing, token_budget_batches, unpack_responses,
    use_varlen_attention,
)
from ppolm.models.policy import SeparateCritic, ValueHead, score_tokens
from ppolm.models.tiny import tiny_model
from ppolm.trainers.micro_batches import MicroBatchSizes, over_micro_batches, split_to_count

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["log.progress=false", "log.tensorboard=false", "checkpoint.every=0"]


def test_pack_rows_by_hand():
    # T = 5, R = 2. row 0: prompt [7 8 9], response [4 5]; row 1: prompt [6], response [3], pad after it.
    ids = torch.tensor([[7, 8, 9, 4, 5], [0, 0, 6, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    p = pack_rows(ids, mask, R=2)
    assert p.input_ids.tolist() == [[7, 8, 9, 4, 5, 6, 3]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    # response token 4 is predicted at flat 2 (token 9), 5 at 3, row 1's 3 at flat 5 (token 6)
    assert p.predict_index.tolist() == [2, 3, 5]
    assert p.rows.tolist() == [0, 0, 1] and p.cols.tolist() == [0, 1, 0]
    assert p.cu_seqlens.tolist() == [0, 5, 7] and (p.B, p.R, p.max_len) == (2, 2, 5)


def test_pack_rows_refuses_an_empty_prompt():
    with pytest.raises(ValueError, match="empty prompt"):
        pack_rows(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]), R=1)


def test_unpack_responses_fills_padding_with_zero_and_passes_gradients():
    p = pack_rows(torch.tensor([[7, 8, 9, 4, 5], [0, 0, 6, 3, 0]]), torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]]), 2)
    x = torch.tensor([1.5, -2.0, 3.0], requires_grad=True)
    grid = unpack_responses(x, p)
    assert grid.tolist() == [[1.5, -2.0], [3.0, 0.0]]
    (grid * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]  # the padded cell's weight (4.0) reaches nothing


def test_token_budget_batches_by_hand():
    as_pairs = lambda bs: [(b.start, b.stop) for b in bs]  # noqa: E731
    # 3 + 5 = 8 fits; 2 + 7 does not; 7 + 1 = 8 fits
    assert as_pairs(token_budget_batches(torch.tensor([3, 5, 2, 7, 1]), 8)) == [(0, 2), (2, 3), (3, 5)]
    # a row longer than the budget is a micro-batch alone
    assert as_pairs(token_budget_batches(torch.tensor([2, 20, 2]), 8)) == [(0, 1), (1, 2), (2, 3)]
    assert as_pairs(token_budget_batches(torch.tensor([1, 1, 1]), 100)) == [(0, 3)]


@pytest.mark.parametrize("seed", range(5))
def test_token_budget_batches_cover_every_row_once(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 60, (37,), generator=gen)
    budget = int(torch.randint(20, 200, (1,), generator=gen))
    batches = token_budget_batches(lengths, budget)
    covered = [r for b in batches for r in range(b.start, b.stop)]
    assert covered == list(range(37))  # each row once, in order
    for b in batches:
        assert b.stop - b.start == 1 or int(lengths[b].sum()) <= budget
    # greedy: a batch could not have taken the next row
    for b, nxt in zip(batches, batches[1:]):
        assert int(lengths[b.start:nxt.start + 1].sum()) > budget


def test_split_to_count_splits_the_largest_until_the_count():
    batches = split_to_count([slice(0, 5), slice(5, 6)], 4)
    assert [(b.start, b.stop) for b in batches] == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert len(split_to_count([slice(0, 1)], 3)) == 1  # one row cannot be split


def test_micro_batch_sizes_split_rows_and_tokens():
    mask = torch.tensor([[1] * 6, [0] * 4 + [1] * 2, [0] * 3 + [1] * 3, [0] * 2 + [1] * 4])
    rows = MicroBatchSizes(rollout_prompts=4, rows=3, max_tokens=None)
    assert [(b.start, b.stop) for b in rows.split(mask)] == [(0, 3), (3, 4)]
    tokens = MicroBatchSizes(rollout_prompts=4, rows=4, max_tokens=8)
    assert [(b.start, b.stop) for b in tokens.split(mask)] == [(0, 2), (2, 4)]
    out = over_micro_batches(lambda b: (mask[b].sum(-1), None), tokens.split(mask))
    assert out[0].tolist() == [6, 2, 3, 4] and out[1] is None


def _ragged_batch(vocab: int, lengths: list[tuple[int, int]], seed: int = 0):
    """Left-padded prompts and right-padded responses of very different lengths: (ids, mask, R)."""
    gen = torch.Generator().manual_seed(seed)
    P, R = max(p for p, _ in lengths), max(r for _, r in lengths)
    ids = torch.zeros(len(lengths), P + R, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (p, r) in enumerate(lengths):
        ids[b, P - p:P + r] = torch.randint(5, vocab, (p + r,), generator=gen)
        mask[b, P - p:P + r] = 1
    return ids, mask, R


LENGTHS = [(3, 1), (40, 25), (7, 2), (1, 30), (22, 9)]


@pytest.mark.parametrize("attention", ["varlen", "block-mask"])
@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2", "tiny-random-qwen2"])
def test_packed_equals_padded_scores_and_gradients(name, attention):
    """varlen: ppolm's per-row sdpa (what packed runs use on sdpa models); block-mask: transformers' own
    packed-sequence mask, built from the restarting position ids (what eager attention gets)."""
    model, tok = tiny_model(name, seed=3)
    model.eval()
    if attention == "varlen":
        use_varlen_attention(model)
        assert model.config._attn_implementation == VARLEN_SDPA
    torch.manual_seed(0)
    head = ValueHead(model.config.hidden_size if hasattr(model.config, "hidden_size") else 64, init="normal")
    ids, mask, R = _ragged_batch(len(tok), LENGTHS)
    resp_mask = mask[:, -R:].float()
    weights = torch.randn(ids.shape[0], R)
    results = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        out = score_tokens(model, ids, mask, ids[:, -R:], value_head=head, need_entropy=True, packed=packed)
        # a masked loss of every output, as the PPO losses are
        loss = ((out.logprobs + out.values + 0.1 * out.entropy) * weights * resp_mask).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in [*model.named_parameters(), *head.named_parameters()]}
        results.append((out, loss.detach(), grads))
    (pad, pad_loss, pad_grads), (pack, pack_loss, pack_grads) = results
    on = resp_mask.bool()
    for field in ("logprobs", "values", "entropy"):
        a, b = getattr(pad, field), getattr(pack, field)
        assert torch.allclose(a[on], b[on], atol=1e-5, rtol=1e-5), (field, (a[on] - b[on]).abs().max())
        assert (b[~on] == 0).all()  # padded positions: 0, masked out by every loss
    assert torch.allclose(pad_loss, pack_loss, rtol=1e-5)
    for n in pad_grads:
        scale = float(pad_grads[n].abs().max()) + 1e-12
        assert float((pad_grads[n] - pack_grads[n]).abs().max()) < 1e-4 * scale, n


def test_varlen_attention_leaves_unpacked_calls_unchanged():
    """Padded scoring and KV-cached decoding through the varlen implementation are transformers' sdpa, bit for bit."""
    from ppolm.rollout import generate

    model, tok = tiny_model("tiny-random-qwen2", seed=5)
    ids, mask, R = _ragged_batch(len(tok), LENGTHS, seed=2)
    prompt_ids, prompt_mask = ids[:, :-R], mask[:, :-R]
    uniforms = torch.rand(len(LENGTHS), 6, generator=torch.Generator().manual_seed(0))
    outs = []
    for switch in (False, True):
        if switch:
            use_varlen_attention(model)
        with torch.no_grad():
            scores = score_tokens(model, ids, mask, ids[:, -R:]).logprobs
        rollout = generate(model, tok, prompt_ids, prompt_mask, uniforms, max_new_tokens=6)
        outs.append((scores, rollout.response_ids))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_packed_equals_padded_separate_critic():
    model, tok = tiny_model("tiny-random-llama", seed=4)
    torch.manual_seed(1)
    critic = SeparateCritic(model.base_model, ValueHead(64, init="normal")).eval()
    ids, mask, R = _ragged_batch(len(tok), LENGTHS, seed=1)
    on = mask[:, -R:].bool()
    pad, pack = critic(ids, mask, R, None), critic(ids, mask, R, None, packed=True)
    assert torch.allclose(pad[on], pack[on], atol=1e-5) and (pack[~on] == 0).all()


def test_packing_support_is_checked():
    model, _ = tiny_model("tiny-random-llama")
    assert supports_packing(model) and supports_packing(model.base_model)
    require_packing(model)
    with pytest.raises(ConfigError, match="ppo.max_tokens"):
        require_packing(torch.nn.Linear(2, 2))


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overrides", [
    (),  # gae with a value head, two epochs of two minibatches
    ("algo.estimator=grpo", "rollout.batch_size=4", "rollout.samples_per_prompt=4", "ppo.minibatch_size=16",
     "ppo.epochs=1", "kl.in=loss", "kl.estimator=k3", "ppo.ent_coef=0.01"),  # fused first forward, seq-mean agg
], ids=["gae", "grpo-fused"])
def test_ppo_run_packed_equals_padded(tmp_path, overrides):
    from ppolm.trainers.ppo import PPOTrainer

    runs = {}
    # budget 150: several micro-batches a minibatch (the toy rows are ~40-60 tokens); 100000: one micro-batch
    for name, extra in [("padded", ()), ("packed", ("ppo.max_tokens=150",)), ("one", ("ppo.max_tokens=100000",))]:
        cfg = load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [*QUIET, f"output_dir={tmp_path / name}",
                                                                      "max_steps=3", *overrides, *extra])
        t = PPOTrainer(cfg, reward_fn=lambda prompts, completions, **rows: [len(set(c)) / 10 for c in completions])
        start = {k: v.detach().clone() for k, v in t.actor.state_dict().items()}
        t.train()
        runs[name] = (_metrics(tmp_path / name), {k: v.detach().clone() for k, v in t.actor.state_dict().items()})
        if name == "one" and overrides:
            assert t.fused_first_forward()
    pad_metrics, pad_weights = runs["padded"]
    for name in ("packed", "one"):
        metrics, weights = runs[name]
        assert len(metrics) == len(pad_metrics) == 3
        for a, b in zip(pad_metrics, metrics):
            # float rounding only (a wrong mask or split is off by percents); the KL per sequence sums ~20 token
            # log-prob differences, so it carries their rounding in absolute terms
            for key in ("reward/mean", "objective/kl", "loss/policy", "policy/entropy", "policy/approx_kl",
                        "optim/grad_norm", "response/length_mean", *(() if overrides else ("loss/value",))):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=5e-5), (name, key)
            assert b["response/length_mean"] == a["response/length_mean"]  # the same samples
            # a clip fraction counts ratios past a threshold: one at the edge may flip under rounding
            assert b["policy/clipfrac"] == pytest.approx(a["policy/clipfrac"], abs=0.02)
        # AdamW turns a near-zero gradient entry's rounding into a step of up to lr, so weights are compared by
        # the size of their difference against the size of the run's whole update
        for k in pad_weights:
            moved = float((pad_weights[k] - start[k]).norm())
            assert float((pad_weights[k] - weights[k]).norm()) <= 1e-3 * moved + 1e-7, (name, k)  # seen: <= 1.1e-4
    assert pad_metrics[-1]["loss/policy"] != 0.0


def test_max_tokens_config():
    with pytest.raises(ConfigError, match="ppo.max_tokens"):
        load_config(PPORunConfig, ROOT / "configs/tiny.yaml", ["ppo.max_tokens=512", "ppo.grad_accum_steps=2"])
    described = subprocess.run([sys.executable, "-m", "ppolm.cli", "ppo", "--describe"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120).stdout
    for key in ("ppo.max_tokens", "ppo.oom_recovery", "rollout.micro_batch_size"):
        assert key in described, key
