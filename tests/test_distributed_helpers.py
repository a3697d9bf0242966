"""Helpers of multi-process runs that need no process group: FSDP2 units, the norm, the launcher's request, the
conversion lock of the embedded model."""

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


def test_processes_starting_on_a_fresh_cache_convert_the_embedded_model_once(tmp_path, monkeypatch):
    """Every process of a launch calls ensure_embedded; the file lock lets one convert while the others wait
    and then find the finished directory (each used to rmtree + rename the other's work)."""
    import threading
    import time

    from ppolm.models import load

    monkeypatch.setenv("PPOLM_CACHE", str(tmp_path))
    calls = []

    def slow_convert(target):
        calls.append(target)
        time.sleep(0.3)  # long enough for the other caller to arrive while this one converts
        target.mkdir(parents=True)
        (target / load.CONVERTED_MARKER).write_text("{}\n")

    monkeypatch.setattr(load, "_convert_embedded", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(load.ensure_embedded())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0] / load.CONVERTED_MARKER).is_file()
