"""Helpers of multi-process runs that need no process group: FSDP2 units, the norm, the launcher's request, the
conversion lock of the embedded model, the DeepSpeed engine's config and the launches refused."""

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


DS_ENV = ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
          "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
          "ACCELERATE_DEEPSPEED_ZERO3_INIT", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_MIXED_PRECISION"]


@pytest.fixture
def ds_env(monkeypatch):
    for name in DS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    return monkeypatch


def test_deepspeed_engine_config_from_the_launcher_and_the_users_file(ds_env, tmp_path):
    """The launcher's stage and offload settings, one micro-batch per engine step (ppolm accumulates), clipping
    at optim.max_grad_norm (None: 0 = off); a user's JSON keeps its ZeRO options and its stage wins."""
    from ppolm import zero

    assert zero.deepspeed_requested()
    ds_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    ds_env.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    cfg = zero.engine_config(1.0)
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert cfg["train_micro_batch_size_per_gpu"] == cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["zero_allow_untested_optimizer"] is True
    assert zero.engine_config(None)["gradient_clipping"] == 0.0
    # accelerate's buckets from the hidden size H where the file is silent: H^2, 0.9 H^2, 10 H
    assert zero.engine_config(1.0, hidden_size=8)["zero_optimization"] == {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": 64,
        "stage3_prefetch_bucket_size": 57, "stage3_param_persistence_threshold": 80}
    user = tmp_path / "ds.json"
    user.write_text('{"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}, "gradient_clipping": 9}')
    ds_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(user))
    cfg = zero.engine_config(0.5)
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000,
                                        "offload_optimizer": {"device": "cpu"}}
    assert cfg["gradient_clipping"] == 0.5  # the run config's, not the file's
    assert zero.engine_config(0.5, hidden_size=8)["zero_optimization"]["reduce_bucket_size"] == 1000  # the file's


@pytest.mark.parametrize("env, file, says", [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, None, "ZeRO stage 0 is not supported"),
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, None, "zero3_init_flag"),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, None, "gradient_accumulation_steps=4"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, None, "mixed_precision 'bf16'"),
    ({}, '{"scheduler": {"type": "WarmupLR"}}', "sets 'scheduler'"),
    ({}, '{"bf16": {"enabled": true}}', "enables bf16"),
    ({}, '{"zero_optimization": ', "cannot read the DeepSpeed config"),
])
def test_deepspeed_launches_ppolm_cannot_run_are_refused_in_one_line(ds_env, tmp_path, env, file, says):
    from ppolm import zero

    for k, v in env.items():
        ds_env.setenv(k, v)
    if file is not None:
        (tmp_path / "ds.json").write_text(file)
        ds_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    with pytest.raises(ConfigError) as info:
        zero.check_launch()
    assert says in str(info.value) and "\n" not in str(info.value)
    if file is not None:
        assert str(tmp_path / "ds.json") in str(info.value)
