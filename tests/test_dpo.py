"""DPO / IPO: the losses against hand numbers, the starting policy as its own reference, a short run that raises
the held-out margin, LoRA and precomputed reference log-probs, exact resume, and the command line."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppolm.algo.dpo import dpo_loss, sequence_logprobs
from ppolm.cli import main as cli_main
from ppolm.models import load_model, load_tokenizer
from ppolm.trainers.dpo import DPORunConfig, DPOTrainer, train_dpo

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": {"progress": False, "tensorboard": False}}


def _cfg(tmp_path, **kw):
    base = dict(model="tiny-random-llama", output_dir=str(tmp_path), precision="fp32", max_steps=4,
                demo_pairs=64, batch_size=8, optim={"lr": 1e-3}, **QUIET)
    return DPORunConfig.model_validate({**base, **kw})


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_losses_against_hand_numbers():
    # pair 1: h = (-1 - -1.5) - (-2 - -1.5) = 1;  pair 2: h = (-3 - -2) - (-1 - -1) = -1
    pc = torch.tensor([-1.0, -3.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -1.0])
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # -log sigmoid(0.5) = log(1 + e^-0.5) = 0.4740770; -log sigmoid(-0.5) = 0.5 + 0.4740770
    assert losses.shape == chosen.shape == rejected.shape == (2,)
    assert torch.allclose(losses, torch.tensor([0.4740770, 0.9740770]), atol=1e-6)
    assert torch.allclose(chosen, torch.tensor([0.25, -0.5])) and torch.allclose(rejected, torch.tensor([-0.25, 0.0]))
    assert not chosen.requires_grad and not rejected.requires_grad
    losses[0].backward()  # d/d pc of -log sigmoid(beta h) = -beta sigmoid(-beta h) = -0.5 x 0.3775407
    assert torch.allclose(pc.grad, torch.tensor([-0.1887703, 0.0]), atol=1e-6)
    # conservative DPO, eps = 0.2: 0.8 x 0.4740770 + 0.2 x 0.9740770, and the mirror image for pair 2
    smoothed = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)[0]
    assert torch.allclose(smoothed, torch.tensor([0.5740770, 0.8740770]), atol=1e-6)
    # IPO with beta = 0.25: target 1 / (2 x 0.25) = 2; (1 - 2)^2 = 1, (-1 - 2)^2 = 9
    ipo, chosen_ipo, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")
    assert torch.allclose(ipo, torch.tensor([1.0, 9.0])) and torch.allclose(chosen_ipo, torch.tensor([0.125, -0.25]))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    # sequence log-probs: sums (DPO) or per-token means (IPO) over completion tokens; masked entries never count
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, float("nan")]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    assert torch.equal(sequence_logprobs(logprobs.nan_to_num(9.0), mask), torch.tensor([-5.0, -1.0]))
    assert torch.equal(sequence_logprobs(logprobs.nan_to_num(9.0), mask, average=True), torch.tensor([-2.5, -0.5]))


def test_sequence_logprobs_count_the_completion_and_eos_only_and_ignore_padding():
    from ppolm.data.preferences import PreferencePair
    from ppolm.trainers.dpo import collate_pairs, tokenize_pairs
    from ppolm.trainers.sft import CompletionLogprobs

    tok = load_tokenizer("tiny-random-llama")
    pairs = [PreferencePair("sun tree", "aaa", "bcd"), PreferencePair("a much longer prompt here", "a a", "xyz q")]
    rows, dropped = tokenize_pairs(pairs, tok, use_chat_template=True, system_prompt=None, max_length=512)
    assert dropped == 0 and tokenize_pairs(pairs, tok, use_chat_template=True, system_prompt=None,
                                           max_length=20)[1] == 2
    for row, pair in zip(rows, pairs):
        for seq, text in ((row.chosen, pair.chosen), (row.rejected, pair.rejected)):
            n = len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS
            assert seq.completion_mask[-n:] == [1] * n and sum(seq.completion_mask) == n
            assert seq.input_ids[-1] == tok.eos_token_id
    scorer = CompletionLogprobs(load_model("tiny-random-llama")).eval()
    with torch.no_grad():
        def logps(batch_rows):
            batch = collate_pairs(batch_rows, tok.pad_token_id)
            return sequence_logprobs(scorer(batch), batch.loss_mask)

        together = logps(rows)  # the short pair is padded to the long one's length
        alone = torch.cat([logps(rows[:1]), logps(rows[1:])])[[0, 2, 1, 3]]  # -> chosen, chosen, rejected, rejected
    assert torch.allclose(together, alone, atol=1e-5), (together, alone)


def test_training_raises_the_held_out_margin_and_exports_a_plain_model(tmp_path):
    trainer = DPOTrainer(_cfg(tmp_path, max_steps=10, eval_every=5, batch_size=16, demo_pairs=96))
    start = trainer.evaluate()  # the policy is its own reference: every implicit reward is 0, the loss log 2
    assert start["eval/margin"] == 0.0 and start["eval/reward_accuracy"] == 0.0  # ties count as wrong
    assert start["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    result = trainer.train()
    rows = _metrics(tmp_path)
    margins = [r["eval/margin"] for r in rows if "eval/margin" in r]
    assert [r["step"] for r in rows if "eval/margin" in r] == [5, 10]
    assert 0 < margins[0] < margins[1] and result["eval/reward_accuracy"] >= 0.9, (margins, result)
    assert result["eval/loss"] < 0.5 * math.log(2) and rows[0]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    for r in rows:
        assert r["rewards/margin"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"])
        assert r["optim/grad_norm"] > 0 and r["logps/chosen"] < 0 and 0 <= r["rewards/accuracy"] <= 1
    assert rows[-1]["rewards/accuracy"] > 0.9
    final = tmp_path / "final"
    assert json.loads((final / "ppolm_decoding.json").read_text())["stage"] == "dpo"
    exported = load_model(str(final))
    for name, p in trainer.scorer.lm.state_dict().items():
        assert torch.equal(p, exported.state_dict()[name]), name
    assert load_tokenizer(str(final)).eos_token == trainer.tokenizer.eos_token


def test_lora_reference_is_the_base_and_precomputed_reference_matches(tmp_path):
    lora = DPOTrainer(_cfg(tmp_path / "lora", max_steps=2, lora={"enabled": True, "r": 4}, optim={"lr": 1e-2}))
    assert lora.reference is None  # no second copy: adapters off
    assert lora.evaluate()["eval/margin"] == 0.0
    lora.train()
    merged = load_model(str(tmp_path / "lora/final"))
    ids = torch.tensor([lora.train_pairs[0].chosen.input_ids])
    with torch.no_grad():
        assert torch.allclose(lora.scorer.lm(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
    # reference log-probs once for every pair before training = once per batch, and no copy is held
    per_batch = DPOTrainer(_cfg(tmp_path / "batch", max_steps=2, batch_size=4, grad_accum_steps=2))
    pre = DPOTrainer(_cfg(tmp_path / "pre", max_steps=2, batch_size=4, grad_accum_steps=2,
                          precompute_ref_logprobs=True))
    assert pre.reference is None and pre.ref_train.shape == (len(pre.train_pairs), 2)
    for step in range(2):
        a, b = per_batch.step(step), pre.step(step)
        for key in ("loss/dpo", "rewards/chosen", "rewards/rejected"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (step, key)
    # a resumed run scores the reference before it loads the trained weights: the same table
    pre.checkpointer.save(2)
    resumed = DPOTrainer(_cfg(tmp_path / "pre", max_steps=2, batch_size=4, grad_accum_steps=2,
                              precompute_ref_logprobs=True, resume=True))
    assert resumed.start_step == 2 and torch.equal(resumed.ref_train, pre.ref_train)
    assert all(torch.equal(a, b) for a, b in zip(resumed.eval_refs, pre.eval_refs))


def test_accumulation_8x1_equals_1x8(tmp_path):
    # a small lr and eps = 1e-6 keep the weight check about the gradients (see tests/test_rm.py)
    weights, grads = [], []
    for accum in (1, 8):
        trainer = DPOTrainer(_cfg(tmp_path / str(accum), batch_size=8, grad_accum_steps=accum,
                                  optim={"lr": 1e-3, "eps": 1e-6}))
        trainer.step(0)
        trainer.step(1)  # the first step has zero margins everywhere: the second one checks the general case
        params = list(trainer.scorer.lm.named_parameters())
        weights.append({n: p.detach().clone() for n, p in params})
        grads.append({n: p.grad.clone() for n, p in params})
    scale = max(float(g.abs().max()) for g in grads[0].values())
    worst_grad = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])
    assert worst_grad < 1e-6 * scale, (worst_grad, scale)  # rounding only: a wrong normalization is off by %
    worst = max(float((weights[0][n] - weights[1][n]).abs().max()) for n in weights[0])
    assert worst < 1e-6, worst


def test_resume_is_exact(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = dict(max_steps=6, batch_size=4, grad_accum_steps=2, eval_every=3, checkpoint={"every": 3, "keep": None},
                  optim={"lr": 1e-3, "schedule": "linear", "warmup_steps": 2})
    train_dpo(_cfg(full, **common))
    part.mkdir()
    shutil.copytree(full / "checkpoint-3", part / "checkpoint-3")
    (part / "LATEST").write_text("checkpoint-3\n")
    train_dpo(_cfg(part, resume=True, **common))
    a, b = load_file(str(full / "final/model.safetensors")), load_file(str(part / "final/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def exact(rows):  # everything but wall-clock times
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]

    assert exact(_metrics(full))[3:] == exact(_metrics(part)) and "eval/margin" in _metrics(part)[-1]
    with pytest.raises(Exception, match="config changed: beta"):
        DPOTrainer(_cfg(part, resume=True, **{**common, "beta": 0.2}))


def test_cli_runs_the_tiny_config_and_rejects_bad_config_before_any_model_loads(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    assert cli_main(["dpo", str(ROOT / "configs/dpo-tiny.yaml"), f"output_dir={out}", "max_steps=2",
                     "log.progress=false", "log.tensorboard=false", "demo_pairs=40"]) == 0
    assert (out / "final/model.safetensors").is_file() and (out / "demo_preferences.jsonl").is_file()
    assert "eval/reward_accuracy" in capsys.readouterr().out
    assert cli_main(["dpo", "--describe"]) == 0
    described = capsys.readouterr().out
    assert "loss_type" in described and "precompute_ref_logprobs" in described

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("ppolm.trainers.dpo.load_model", no_model)
    monkeypatch.setattr("ppolm.trainers.dpo.load_tokenizer", no_model)
    for override, message in [("loss_type=hinge", "key 'loss_type'"), ("betta=0.2", "unknown key 'betta'"),
                              ("beta=0", "key 'beta'"), ("label_smoothing=0.1", "sigmoid' only"),
                              ("grad_accum_steps=3", "must divide batch_size")]:
        extra = ["loss_type=ipo"] if override.startswith("label_smoothing") else []
        assert cli_main(["dpo", str(ROOT / "configs/dpo-tiny.yaml"), override, *extra]) == 2, override
        assert message in capsys.readouterr().err, override
