"""The benchmark's floor (bench/floor.py): its design options change the work, not the maths where they must not.

The fused first forward takes the old log-probs and values from the update's own forward; with one epoch of one
minibatch they are the no-grad forward's numbers, so a fused step and a plain step from the same weights and
the same samples compute the same losses and leave the same weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from floor import FloorPPO, reward_model_from  # noqa: E402

from ppolm.data.collate import left_pad_collate  # noqa: E402
from ppolm.models import load_model, load_tokenizer  # noqa: E402


def _floor(value_head: bool, fused: bool) -> FloorPPO:
    torch.manual_seed(0)  # the value model's and the reward model's score heads
    policy = load_model("tiny-random-llama")
    return FloorPPO(policy, load_tokenizer("tiny-random-llama"), reward_model_from(policy), lr=1e-3,
                    value_head=value_head, fused_first_forward=fused)


def _step(floor: FloorPPO) -> dict:
    tok = floor.tok
    ids, attn = left_pad_collate([tok.encode("hello there"), tok.encode("a longer prompt than that")],
                                 tok.pad_token_id)
    torch.manual_seed(1)  # the same samples on both sides
    return floor.step(ids, attn, 6)


@pytest.mark.parametrize("value_head", [False, True])
def test_fused_first_forward_same_losses_and_weights(value_head):
    plain, fused = _floor(value_head, False), _floor(value_head, True)
    a, b = _step(plain), _step(fused)
    assert a["loss_policy"] == pytest.approx(b["loss_policy"], rel=1e-6, abs=1e-7)
    assert a["loss_value"] == pytest.approx(b["loss_value"], rel=1e-6, abs=1e-7)
    trained = [plain.policy] + ([plain.head] if value_head else [plain.value])
    trained_fused = [fused.policy] + ([fused.head] if value_head else [fused.value])
    for m, n in zip(trained, trained_fused):
        for (name, p), q in zip(m.named_parameters(), n.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    changed = any(not torch.equal(p, q) for p, q in zip(plain.policy.parameters(), plain.ref.parameters()))
    assert changed  # the step did train


def test_value_head_trains_with_the_policy():
    floor = _floor(value_head=True, fused=True)
    assert floor.value is None and floor.opt_v is None
    head = floor.head.weight.detach().clone()
    assert torch.count_nonzero(head) == 0  # V = 0 at the start
    _step(floor)
    assert not torch.equal(floor.head.weight, head)  # one optimizer moved the head too
