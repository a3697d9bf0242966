"""Reward models on tiny models: preference data, learning a synthetic preference, accumulation, the last-token
pooling, LoRA export, and the exported model as PPO's reward.model."""

import json
from pathlib import Path

import pytest
import torch

from ppolm.cli import main as cli_main
from ppolm.config import CriticConfig, PPORunConfig, load_config
from ppolm.data.collate import right_pad_collate
from ppolm.data.preferences import demo_preferences, read_preferences, write_preferences
from ppolm.errors import DataError
from ppolm.models import load_model, load_tokenizer
from ppolm.rewards.compose import reward_model_scores
from ppolm.trainers.actor_critic import build_actor_critic
from ppolm.trainers.ppo import train_ppo
from ppolm.trainers.rm import LastTokenReward, RMRunConfig, RMTrainer, pair_batch, scored_text, tokenize_pairs

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": {"progress": False, "tensorboard": False}}



def _cfg(tmp_path, **kw):
    base = dict(model="tiny-random-llama", output_dir=str(tmp_path), precision="fp32", max_steps=20,
                demo_pairs=128, batch_size=16, optim={"lr": 3e-3}, **QUIET)
    return RMRunConfig.model_validate({**base, **kw})


def test_preference_file_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    cases = [({"prompt": "p", "chosen": "a"}, "field 'rejected': missing required field"),
             ({**good, "chosen": 3}, "field 'chosen': expected str"),
             ({**good, "rejected": "a"}, "field 'rejected': identical to 'chosen'"),
             ({**good, "chosen": "  "}, "field 'chosen': empty completion")]
    for row, message in cases:
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataError, match=f"prefs.jsonl:2:{message}".replace(":f", ": f")):
            read_preferences(path)
    with pytest.raises(DataError, match="JSON lines"):
        read_preferences(tmp_path / "prefs.csv")
    pairs = demo_preferences(50, seed=3)
    assert pairs == demo_preferences(50, seed=3) and pairs != demo_preferences(50, seed=4)
    assert all(p.chosen.count("a") / len(p.chosen) > p.rejected.count("a") / len(p.rejected) for p in pairs)
    back = read_preferences(write_preferences(pairs, tmp_path / "demo.jsonl"))
    assert [(p.prompt, p.chosen, p.rejected) for p in back] == [(p.prompt, p.chosen, p.rejected) for p in pairs]


def test_last_real_token_pooling_ignores_padding_even_when_pad_is_eos():
    tok = load_tokenizer("tiny-random-llama")
    scorer = LastTokenReward(load_model("tiny-random-llama", kind="seqcls")).eval()
    texts = ["hello there<|im_end|>", "a much longer text that forces padding<|im_end|>"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.no_grad():
        alone = [float(scorer(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))) for r in rows]
        for pad in (tok.pad_token_id, tok.eos_token_id):  # pad == EOS as in SmolLM2: the mask decides
            ids, mask = right_pad_collate(rows, pad)
            assert torch.allclose(scorer(ids, mask), torch.tensor(alone), atol=1e-5)


def test_rm_learns_preference_and_exports_a_reward_model_ppo_accepts(tmp_path):
    trainer = RMTrainer(_cfg(tmp_path / "rm", eval_every=10))
    before = trainer.evaluate()["eval/pairwise_accuracy"]
    result = trainer.train()
    assert len(trainer.eval_pairs) == round(0.2 * 128)
    assert before < 0.8 and result["eval/pairwise_accuracy"] >= 0.9, (before, result)
    rows = [json.loads(x) for x in (tmp_path / "rm/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/pairwise_accuracy" in r] == [10, 20]
    assert rows[-1]["loss/rm"] < rows[0]["loss/rm"]
    final = tmp_path / "rm/final"
    rm, tok = load_model(str(final), kind="seqcls"), load_tokenizer(str(final))
    assert rm.config.num_labels == 1 and (final / "ppolm_reward.json").is_file()
    # PPO's scorer reads the same numbers the trainer optimized, on the same text
    pairs = demo_preferences(128)[:6]
    texts = [scored_text(tok, p.prompt, c, use_chat_template=True, system_prompt=None)
             for p in pairs for c in (p.chosen, p.rejected)]
    ids, mask = pair_batch(tokenize_pairs(pairs, tok, use_chat_template=True, system_prompt=None,
                                          max_length=512)[0], tok.pad_token_id)
    with torch.no_grad():
        trained = trainer.scorer(ids, mask)
    ppo_view = reward_model_scores(rm, tok, texts)
    order = [i for k in range(6) for i in (k, 6 + k)]  # pair_batch puts all chosen rows first
    assert torch.allclose(ppo_view, trained[order], atol=1e-4)
    assert bool((ppo_view[0::2] > ppo_view[1::2]).all())
    # ... and a 2-step PPO run uses it as its only reward
    ppo = load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [
        "log.progress=false", "log.tensorboard=false", f"output_dir={tmp_path / 'ppo'}", "max_steps=2",
        "rollout.batch_size=8", "ppo.epochs=1", "checkpoint.every=0", f"reward.model={final}"])
    metrics = train_ppo(ppo)
    assert torch.isfinite(torch.tensor(metrics["reward/mean"])) and metrics["reward/nonfinite_count"] == 0
    assert metrics["reward/std"] > 0  # scores come from the model, not a constant
    # a critic initialized from it starts with V(prefix) = the reward model's score of that prefix: the value of
    # the last response slot reads the hidden state before the last token, i.e. the score of the text without it
    actor, _ = build_actor_critic(ppo.model_copy(update={"critic": CriticConfig(kind="separate", init="reward"),
                                                        "gradient_checkpointing": False}), None)
    for row in ids[:, :9]:  # nine tokens of each pair row (no padding there)
        with torch.no_grad():
            v = actor.critic(row[None], torch.ones(1, 9, dtype=torch.long), 2, None)[0, -1]
            want = trainer.scorer(row[None, :8], torch.ones(1, 8, dtype=torch.long))[0]
        assert abs(float(v) - float(want)) < 1e-4, (float(v), float(want))


def test_accumulation_8x1_equals_1x8(tmp_path):
    # Adam's first step is lr * g / (|g| + eps), about lr * sign(g): on weights whose gradient is ~1e-7 the
    # float rounding of g (~1e-9, from summing in another order) moves the weight by ~lr * 1e-3. A small lr and
    # eps = 1e-6 keep the weight check about the gradients, which are checked directly as well.
    weights, grads = [], []
    for accum in (1, 8):
        trainer = RMTrainer(_cfg(tmp_path / str(accum), batch_size=8, grad_accum_steps=accum,
                                 optim={"lr": 1e-3, "eps": 1e-6}))
        trainer.step(0)
        params = list(trainer.scorer.rm.named_parameters())
        weights.append({n: p.detach().clone() for n, p in params})
        grads.append({n: p.grad.clone() for n, p in params})  # the optimizer step leaves .grad in place
    scale = max(float(g.abs().max()) for g in grads[0].values())
    worst_grad = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])
    assert worst_grad < 1e-6 * scale, (worst_grad, scale)  # rounding only: a wrong normalization is off by %
    worst = max(float((weights[0][n] - weights[1][n]).abs().max()) for n in weights[0])
    assert worst < 1e-6, worst


def test_lora_rm_trains_head_and_exports_merged(tmp_path):
    trainer = RMTrainer(_cfg(tmp_path, max_steps=3, lora={"enabled": True, "r": 4}, precision="bf16"))
    head_before = trainer.scorer.rm.score.modules_to_save["default"].weight.detach().clone()
    trainer.train()
    assert not torch.equal(head_before, trainer.scorer.rm.score.modules_to_save["default"].weight)
    merged = LastTokenReward(load_model(str(tmp_path / "final"), kind="seqcls")).eval()
    ids, mask = pair_batch(trainer.eval_pairs[:4], trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(trainer.scorer.eval()(ids, mask), merged(ids, mask), atol=1e-4)


def test_cli_rm_runs_tiny_config_and_rejects_bad_keys(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["rm", str(ROOT / "configs/rm-tiny.yaml"), f"output_dir={out}", "max_steps=2",
                     "log.progress=false", "log.tensorboard=false", "demo_pairs=40"]) == 0
    assert (out / "final/model.safetensors").is_file() and (out / "demo_preferences.jsonl").is_file()
    assert "eval/pairwise_accuracy" in capsys.readouterr().out
    assert cli_main(["rm", str(ROOT / "configs/rm-tiny.yaml"), "batch_size=6", "grad_accum_steps=4"]) == 2
    assert cli_main(["rm", str(ROOT / "configs/rm-tiny.yaml"), "data=missing.jsonl", f"output_dir={out}"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
