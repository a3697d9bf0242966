"""FSDP2 helpers that need no process group: which modules become units, the norm, the launcher's request."""

import pytest
import torch

from ppolm.errors import ConfigError
from ppolm.fsdp import _outermost_hf_models, block_classes, fsdp_requested, total_norm
from ppolm.models.policy import ValueHead
from ppolm.models.tiny import tiny_model
from ppolm.trainers.actor_critic import ActorCritic


def test_units_are_blocks_and_the_hf_models_below_the_root():
    policy, _ = tiny_model("tiny-random-llama")
    actor = ActorCritic(policy, ValueHead(policy.config.hidden_size, "zero"), None)
    assert {c.__name__ for c in block_classes(actor)} == {"LlamaDecoderLayer"}
    assert _outermost_hf_models(actor) == [policy]  # not its inner LlamaModel, which shares the tied head
    assert _outermost_hf_models(policy) == []  # a root HF model (the reference) is one unit with its blocks


def test_total_norm_of_plain_gradients_is_the_l2_norm_of_all_entries():
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    assert float(total_norm(grads)) == pytest.approx(5.0)


def test_fsdp_request_from_the_launcher(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_requested()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_requested()
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        fsdp_requested()
