"""Review debts of model handling (issue 15, items 4 and 8): several EOS ids, architecture-specific logit
transforms, a separate critic without an LM head. Each test failed before its fix."""

from __future__ import annotations

import pytest

from conftest import free_port, launches, run_launcher
import torch
from transformers import AutoModelForCausalLM

from ppolm.models import load_model, load_tokenizer
from ppolm.models.policy import score_tokens
from ppolm.rollout import eos_token_ids_of, generate
from ppolm.sampling import row_uniforms

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def test_every_eos_id_of_the_generation_config_stops_a_row():
    model, tok = load_model("tiny-random-llama"), load_tokenizer("tiny-random-llama")
    model.eval()
    other = [i for i in range(len(tok)) if i not in (tok.eos_token_id, tok.pad_token_id)]
    model.generation_config.eos_token_id = [tok.eos_token_id, *other]  # Llama-3 style list: every token ends
    assert eos_token_ids_of(model, tok)[:2] == [tok.eos_token_id, other[0]]
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = generate(model, tok, ids, torch.ones_like(ids), row_uniforms(0, 0, [0, 1], 8), max_new_tokens=8)
    assert bool(out.ended.all()) and out.response_mask.sum(-1).tolist() == [1.0, 1.0]


def _tiny(arch: str, **extra):
    import transformers

    cfg = getattr(transformers, f"{arch}Config")(**COMMON, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
    # large logits make softcapping and scaling matter
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model.eval()


@pytest.mark.parametrize("arch, extra", [
    ("Gemma2", {"final_logit_softcapping": 2.0, "head_dim": 8}),
    ("Cohere", {"logit_scale": 3.0}),
    ("Granite", {"logits_scaling": 0.25}),
    ("Llama", {}), ("Qwen2", {}), ("Mistral", {}), ("Gemma", {"head_dim": 8}), ("Phi3", {}), ("GPT2", {}),
    ("OPT", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
])
def test_scoring_matches_the_models_own_logits(arch, extra):
    """score_tokens reads the decoder stack's hidden states (policy.last_hidden: the CausalLM's own LM head is not
    run) and applies the head itself: the log-probs of the model's own forward, left padding included."""
    from ppolm.models.policy import decoder_of

    model = _tiny(arch, **extra)
    assert decoder_of(model) is not None  # the direct path is the one tested
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    resp = ids[:, -3:]
    with torch.no_grad():
        from ppolm.rollout import position_ids_from_mask

        kw = {} if arch in ("OPT",) else {"position_ids": position_ids_from_mask(mask)}
        logits = model(input_ids=ids, attention_mask=mask, **kw).logits[:, -4:-1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
        got = score_tokens(model, ids, mask, resp).logprobs
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())


@pytest.mark.slow
@launches
def test_separate_critic_with_untied_embeddings_on_two_processes(tmp_path):
    """The critic's backbone has no LM head, so DDP finds no unused parameter (untied embeddings)."""
    import os
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    base, tok = load_model("tiny-random-llama"), load_tokenizer("tiny-random-llama")
    cfg = base.config
    cfg.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untied = AutoModelForCausalLM.from_config(cfg)
    untied.save_pretrained(tmp_path / "untied")
    tok.save_pretrained(tmp_path / "untied")
    env = {**os.environ, "PYTHONPATH": str(root), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    run = run_launcher(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(root / "tests/scripts/ppo_tiny_run.py"), f"model={tmp_path / 'untied'}", "critic.kind=separate",
         f"output_dir={tmp_path / 'run'}", "max_steps=2", "rollout.batch_size=4", "ppo.minibatch_size=4",
         "ppo.epochs=2", "rollout.max_new_tokens=4"],
        cwd=root, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_lora_merged_generation_matches_the_adapters_and_restores_the_weights_exactly():
    """lora_merged_for_generation: the forward with W + scale*B@A and adapters off equals the LoRA forward (to
    rounding), and afterwards every base weight is the very tensor it was (bit-exact, no merge/unmerge drift)."""
    import torch

    from ppolm.models import load_model
    from ppolm.models.policy import apply_lora, lora_merged_for_generation

    torch.manual_seed(0)
    model = apply_lora(load_model("tiny-random-llama"), r=4, alpha=8.0, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # peft starts B at zero: make the adapters matter
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 250, (2, 7))
    with torch.no_grad():
        lora = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        with lora_merged_for_generation(model):
            merged = model(input_ids=ids).logits
    assert (lora - base).abs().max() > 1e-2  # the adapters change the output
    assert torch.allclose(merged, lora, atol=1e-5), (merged - lora).abs().max()
    with torch.no_grad(), lora_merged_for_generation(model, torch.bfloat16):  # cast once, adapters kept
        with torch.autocast("cpu", dtype=torch.bfloat16):
            merged16 = model(input_ids=ids).logits
        assert model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scored16 = model(input_ids=ids).logits  # what the scoring pass computes under bf16 autocast
    torch.testing.assert_close(merged16, scored16, atol=0, rtol=0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_bf16_rollout_keeps_an_adapter_change_below_bf16_resolution():
    """A young adapter's W + d rounds back to W in bf16: a merged bf16 rollout sampled from the base model while
    the update trained W + d (the LoRA PPO run that learned nothing, docs/results.md). Under bf16 the rollout's
    forward must be the scored policy's, so the adapters' change shows in what is sampled."""
    import torch

    from ppolm.models import load_model
    from ppolm.models.policy import apply_lora, lora_merged_for_generation

    torch.manual_seed(0)
    model = apply_lora(load_model("tiny-random-llama"), r=4, alpha=8.0, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-4)  # d ~ 1e-5: far below a bf16 ulp of W
    model.eval()
    ids = torch.randint(0, 250, (2, 7))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scored = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        with lora_merged_for_generation(model, torch.bfloat16):
            rollout = model(input_ids=ids).logits
    assert not torch.equal(scored, base)  # the adapters change the bf16 forward ...
    torch.testing.assert_close(rollout, scored, atol=0, rtol=0)  # ... and the rollout sees that change
