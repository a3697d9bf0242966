"""SFT on tiny models: learning, accumulation invariance, completion-only loss, chat turns, exact resume, export."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppolm.config import load_config
from ppolm.errors import DataError
from ppolm.models import load_model, load_tokenizer
from ppolm.tasks.base import Decoding, Example, Task
from ppolm.trainers.sft import (
    SFTRunConfig, SFTTrainer, collate_sft, read_chat, tokenize_chat, tokenize_example, train_sft,
)

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": {"progress": False, "tensorboard": False}}



class CopyTask(Task):
    """Prompt 'copy: <words>', reference '<words>': a tiny random model learns it in a few dozen steps."""

    name = "copy"
    system_prompt = "Repeat the words."
    decoding = Decoding(max_new_tokens=12, stop=("\n",))

    def load(self, path):
        rng = random.Random(0)
        words = ["sun", "tree", "river", "stone", "cloud", "bird"]
        rows = [" ".join(rng.choice(words) for _ in range(2)) for _ in range(40)]
        return [Example(prompt=f"copy: {w}", reference=w, source="copy", line=i + 1) for i, w in enumerate(rows)]


def _cfg(tmp_path, **kw):
    base = dict(model="tiny-random-llama", output_dir=str(tmp_path), precision="fp32", max_steps=4,
                optim={"lr": 3e-3}, **QUIET)
    return SFTRunConfig.model_validate({**base, **kw})


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_final_model_is_exported(tmp_path):
    trainer = SFTTrainer(_cfg(tmp_path, max_steps=25, eval_every=25), task=CopyTask())
    before = trainer.evaluate()["eval/loss"]
    result = trainer.train()
    rows = _metrics(tmp_path)
    losses = [r["loss/sft"] for r in rows]
    assert len(rows) == 25 and sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert result["eval/loss"] < 0.5 * before, (before, result["eval/loss"])
    for key in ("optim/lr", "optim/grad_norm", "time/step_s", "throughput/tokens_per_s"):
        assert all(r[key] is not None and r[key] > 0 for r in rows), key
    final = tmp_path / "final"
    decoding = json.loads((final / "ppolm_decoding.json").read_text())
    assert decoding["max_new_tokens"] == 12 and decoding["stop"] == ["\n"] and decoding["task"] == "copy"
    assert decoding["system_prompt"] == "Repeat the words."
    exported = load_model(str(final))
    for name, p in trainer.scorer.lm.state_dict().items():
        assert torch.equal(p, exported.state_dict()[name]), name
    assert load_tokenizer(str(final)).eos_token == trainer.tokenizer.eos_token


def test_accumulation_8x1_equals_1x8(tmp_path):
    # Each micro-batch is collated apart (less padding), yet every micro-batch divides by the step's token count.
    # Adam's first step is lr * g / (|g| + eps), about lr * sign(g): on weights whose gradient is ~1e-7 the
    # float rounding of g (~1e-9, from summing in another order) moves the weight by ~lr * 1e-3. A small lr and
    # eps = 1e-6 keep the weight check about the gradients, which are checked directly as well.
    weights, grads = [], []
    for accum in (1, 8):
        trainer = SFTTrainer(_cfg(tmp_path / str(accum), batch_size=8, grad_accum_steps=accum,
                                  optim={"lr": 1e-3, "eps": 1e-6}), task=CopyTask())
        metrics = trainer.step(0)
        params = list(trainer.scorer.lm.named_parameters())
        weights.append({n: p.detach().clone() for n, p in params})
        grads.append({n: p.grad.clone() for n, p in params})  # the optimizer step leaves .grad in place
        assert metrics["optim/grad_norm"] > 0
    scale = max(float(g.abs().max()) for g in grads[0].values())
    worst_grad = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])
    assert worst_grad < 1e-6 * scale, (worst_grad, scale)  # rounding only: a wrong normalization is off by %
    worst = max(float((weights[0][n] - weights[1][n]).abs().max()) for n in weights[0])
    assert worst < 1e-6, worst


def test_loss_counts_completion_tokens_only():
    tok = load_tokenizer("tiny-random-llama")
    model = load_model("tiny-random-llama")
    seq = tokenize_example(tok, "<|im_start|>user\ncopy: sun<|im_end|>\n<|im_start|>assistant\n", "sun")
    n_completion = len(tok("sun", add_special_tokens=False)["input_ids"]) + 1
    assert sum(seq.completion_mask) == n_completion
    assert seq.completion_mask[-n_completion:] == [1] * n_completion and seq.input_ids[-1] == tok.eos_token_id
    short = tokenize_example(tok, "hi", "sun tree")
    batch = collate_sft([seq, short], tok.pad_token_id)
    from ppolm.algo.losses import sft_loss
    from ppolm.trainers.sft import CompletionLogprobs

    scorer = CompletionLogprobs(model)
    with torch.no_grad():
        loss = sft_loss(scorer(batch), batch.loss_mask)
        # reference: the model's own logits, HF-style labels with -100 on every position that is not trained
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        labels = batch.labels.masked_fill(batch.loss_mask == 0, -100)
        ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        assert torch.allclose(loss, ref, atol=1e-5), (loss, ref)
        # prompt and padding targets do not matter: scramble them, the loss is the same number
        gen = torch.Generator().manual_seed(0)
        noise = torch.randint(0, len(tok), batch.labels.shape, generator=gen)
        scrambled = type(batch)(batch.input_ids, batch.attention_mask,
                                torch.where(batch.loss_mask > 0, batch.labels, noise), batch.loss_mask)
        assert torch.equal(sft_loss(scorer(scrambled), scrambled.loss_mask), loss)
        # ... while a completion target does
        flipped = batch.labels.clone()
        pos = batch.loss_mask.nonzero()[0]
        flipped[pos[0], pos[1]] = (flipped[pos[0], pos[1]] + 1) % len(tok)
        changed = type(batch)(batch.input_ids, batch.attention_mask, flipped, batch.loss_mask)
        assert not torch.equal(sft_loss(scorer(changed), changed.loss_mask), loss)


def test_chat_turns_train_assistant_tokens_through_eos(tmp_path):
    tok = load_tokenizer("tiny-random-llama")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "ignored"}]
    seq = tokenize_chat(tok, messages, ("x", 1))
    full = tok.apply_chat_template(messages[:5], tokenize=False)
    assert tok.decode(seq.input_ids) == full
    trained = [t for t, m in zip(seq.input_ids, seq.completion_mask) if m]
    assert tok.decode(trained) == "yo<|im_end|>ok<|im_end|>"
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2: field 'messages\[0\]'"):
        read_chat(str(path))
    path.write_text(json.dumps({"messages": messages}) + "\n")
    assert read_chat(str(path))[0].fields["messages"] == messages
    result = train_sft(_cfg(tmp_path / "run", chat_data=str(path), max_steps=2, batch_size=2,
                            task={"name": "toy", "eval_fraction": 0.0}))
    assert result["loss/sft"] > 0 and "eval/loss" not in result


def test_example_without_reference_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="reference"):
        SFTTrainer(_cfg(tmp_path, task={"name": "toy"}))


def test_resume_is_exact(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = dict(max_steps=6, batch_size=4, grad_accum_steps=2, checkpoint={"every": 3, "keep": None},
                  optim={"lr": 3e-3, "schedule": "linear", "warmup_steps": 2})
    train_sft(_cfg(full, **common), task=CopyTask())
    part.mkdir()
    shutil.copytree(full / "checkpoint-3", part / "checkpoint-3")
    (part / "LATEST").write_text("checkpoint-3\n")
    train_sft(_cfg(part, resume=True, **common), task=CopyTask())
    a, b = load_file(str(full / "final/model.safetensors")), load_file(str(part / "final/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss/sft"] for m in _metrics(full)][3:] == [m["loss/sft"] for m in _metrics(part)]
    with pytest.raises(Exception, match="config changed: batch_size"):
        SFTTrainer(_cfg(part, resume=True, **{**common, "batch_size": 2}), task=CopyTask())


def test_lora_run_exports_merged_weights(tmp_path):
    trainer = SFTTrainer(_cfg(tmp_path, max_steps=3, precision="bf16", lora={"enabled": True, "r": 4}),
                         task=CopyTask())
    trainer.train()
    lm = trainer.scorer.lm
    assert any("lora_" in n for n, p in lm.named_parameters() if p.requires_grad)
    merged = load_model(str(tmp_path / "final"))
    ids = torch.tensor([trainer.train_rows[0].input_ids])
    with torch.no_grad():
        assert torch.allclose(lm(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)


def test_tiny_config_validates_and_rejects_bad_keys():
    cfg = load_config(SFTRunConfig, ROOT / "configs/sft-tiny.yaml")
    assert cfg.model == "tiny-random-llama"
    with pytest.raises(Exception, match="grad_accum_steps"):
        load_config(SFTRunConfig, ROOT / "configs/sft-tiny.yaml", ["batch_size=6", "grad_accum_steps=4"])
    with pytest.raises(Exception, match="unknown key 'epoch'"):
        load_config(SFTRunConfig, ROOT / "configs/sft-tiny.yaml", ["epoch=2"])
