"""Evaluation runs on tiny random models: label probabilities, KL / perplexity, evaluate(), the commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from ppolm.cli import main
from ppolm.errors import ConfigError, DataError
from ppolm.eval.labels import label_logprobs, label_logprobs_reference, spellings
from ppolm.eval.run import (
    complete,
    eval_command,
    evaluate,
    format_table,
    generate_command,
    parse_options,
    sequence_kl_and_nll,
    spread,
)
from ppolm.models import load_model, load_tokenizer
from ppolm.models.policy import score_tokens
from ppolm.tasks import build_task
from ppolm.tasks.base import Decoding


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPOLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny():
    model = load_model("tiny-random-llama")
    model.eval()
    return model, load_tokenizer("tiny-random-llama")


def _ids(tok, texts: list[str]) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_spellings() -> None:
    assert spellings("Sci/Tech") == ["Sci/Tech", "sci/tech"]
    assert spellings("positive") == ["positive", "Positive"]


@torch.no_grad()
def test_cached_label_logprobs_equal_score_tokens_rows(tiny) -> None:
    model, tok = tiny
    prompts = _ids(tok, ["Is it good?", "A much longer prompt about a film", "x"])
    labels = ["World", "Sports", "Sci/Tech"]  # multi-token labels of different lengths
    fast = label_logprobs(model, tok, prompts, labels, batch_size=2)
    slow = label_logprobs_reference(model, tok, prompts, labels, batch_size=5)
    assert fast.shape == (3, 3)
    assert torch.allclose(fast, slow, atol=1e-4)
    # A single spelling is exactly one score_tokens row: log p(label) = sum of its token log-probs.
    one = label_logprobs(model, tok, prompts[:1], ["ab"], case_variants=False)
    p, r = torch.tensor([prompts[0]]), torch.tensor([_ids(tok, ["ab"])[0]])
    direct = score_tokens(model, torch.cat([p, r], 1), torch.ones(1, p.shape[1] + r.shape[1]), r).logprobs.sum()
    assert float(one[0, 0]) == pytest.approx(float(direct), abs=1e-4)


@torch.no_grad()
def test_sequence_kl_and_nll_against_full_forward(tiny) -> None:
    model, tok = tiny
    reference = load_model("tiny-random-llama", seed=1)
    ids = _ids(tok, ["hello there", "hi"])
    from ppolm.data.collate import left_pad_collate

    x, m = left_pad_collate(ids, tok.pad_token_id)
    from ppolm.rollout import generate

    out = generate(model, tok, x, m, torch.rand(2, 5), max_new_tokens=5, temperature=1.0)
    kl, nll, n = sequence_kl_and_nll(model, reference, out, None)
    kl_self, nll_self, _ = sequence_kl_and_nll(model, None, out, None)
    assert torch.equal(kl_self, torch.zeros(2)) and (kl > 0).all()
    assert torch.equal(n, out.response_mask.sum(-1))
    # Row 0 by hand from the models' full logits (row 0 is the longer prompt: no left padding).
    full = out.input_ids[:1]
    P, R = out.prompt_ids.shape[1], out.response_ids.shape[1]
    lp = torch.log_softmax(model(full).logits[0, P - 1: P + R - 1].float(), -1)
    lq = torch.log_softmax(reference(full).logits[0, P - 1: P + R - 1].float(), -1)
    mask = out.response_mask[0]
    want_kl = ((lp.exp() * (lp - lq)).sum(-1) * mask).sum()
    want_nll = -(lq.gather(-1, out.response_ids[0].unsqueeze(-1)).squeeze(-1) * mask).sum()
    assert float(kl[0]) == pytest.approx(float(want_kl), rel=1e-4, abs=1e-5)
    assert float(nll[0]) == pytest.approx(float(want_nll), rel=1e-4)
    want_self = -(lp.gather(-1, out.response_ids[0].unsqueeze(-1)).squeeze(-1) * mask).sum()
    assert float(nll_self[0]) == pytest.approx(float(want_self), rel=1e-4)


def test_completions_do_not_depend_on_batch_size(tiny) -> None:
    model, tok = tiny
    prompts = _ids(tok, ["a", "bb cc", "ddd", "e f g h", "ii"])
    for dec in (Decoding(max_new_tokens=6, temperature=0.0), Decoding(max_new_tokens=6, temperature=1.0)):
        one = complete(model, tok, prompts, dec, batch_size=1)
        five = complete(model, tok, prompts, dec, batch_size=5)
        assert one.texts == five.texts and one.lengths == five.lengths


def test_evaluate_classification_on_demo(tiny) -> None:
    model, tok = tiny
    task = build_task("classification", {})
    examples = spread(task.load(None), 6)
    res = evaluate(task, model, tok, examples, batch_size=4)
    m = res.metrics
    assert m["n"] == 6 and len(res.predictions) == 6
    assert 0.0 <= m["accuracy"] <= 1.0 and m["roc_auc"] is not None and 0.0 <= m["prob_accuracy"] <= 1.0
    row = res.predictions[0]
    assert set(row) == {"prompt", "completion", "reference", "reward", "scores", "source", "line"}
    assert row["prompt"] == examples[0].prompt and row["reference"] == examples[0].reference
    assert sum(row["scores"]["label_probs"].values()) == pytest.approx(1.0, abs=1e-5)
    # The reward in each prediction is the task's reward of that completion.
    fn = task.reward_functions()[0][0]
    assert [p["reward"] for p in res.predictions] == fn([""] * 6, [p["completion"] for p in res.predictions],
                                                        **task.row_fields(examples))


def test_evaluate_generation_self_reference_has_zero_kl(tiny) -> None:
    model, tok = tiny
    task = build_task("generation", {})
    examples = task.load(None)[:3]
    res = evaluate(task, model, tok, examples, decoding=Decoding(max_new_tokens=4))
    assert res.metrics["kl_mean"] == 0.0 and res.metrics["perplexity"] > 1.0
    other = load_model("tiny-random-llama", seed=1)
    res2 = evaluate(task, model, tok, examples, decoding=Decoding(max_new_tokens=4), reference_model=other)
    assert res2.metrics["kl_mean"] > 0.0
    assert [p["completion"] for p in res2.predictions] == [p["completion"] for p in res.predictions]


def test_spread_and_parse_options() -> None:
    assert spread(list(range(10)), 3) == [0, 3, 6] and spread([1, 2], 5) == [1, 2] and spread([1, 2], None) == [1, 2]
    assert parse_options(["label_names={1: World, 2: Sports}", "max_words=50", "instruction=", "a=yes"]) == {
        "label_names": {1: "World", 2: "Sports"}, "max_words": 50, "instruction": None, "a": "yes"}
    assert parse_options(["instruction=Entities: {text}", "x=[a, b]"]) == {"instruction": "Entities: {text}",
                                                                          "x": ["a", "b"]}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_options(["oops"])


def test_format_table_shows_scalars_classes_and_confusion() -> None:
    text = format_table({"accuracy": 0.5, "labels": ["a", "b"], "per_class": {
        "a": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2},
        "b": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}}, "confusion_matrix": [[1, 1], [0, 0]]})
    assert "accuracy                 0.5000" in text and "a                1.000   0.500   0.667        2" in text
    assert text.splitlines()[-2].split() == ["a", "1", "1"]


def _eval_args(**kw) -> argparse.Namespace:
    base = dict(task="ner", model="tiny-random-llama", data=None, limit=4, output_dir=None, batch_size=4, option=[])
    return argparse.Namespace(**{**base, **kw})


def test_eval_command_writes_metrics_and_predictions(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert eval_command(_eval_args(option=["instruction=Entities ({types}): {text}"])) == 0
    out = tmp_path / "runs" / "eval-ner"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["run"]["options"] == {"instruction": "Entities ({types}): {text}"}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["prompt"].startswith("Entities (LOC, ORG, PER): ")
    assert "entity_f1" in rows[0]["scores"] and "f1" in capsys.readouterr().out


def test_generate_command_txt_and_csv(tmp_path: Path) -> None:
    src = tmp_path / "p.txt"
    src.write_text("Hello\nThe film was\n", encoding="utf-8")
    args = argparse.Namespace(model="tiny-random-llama", input=str(src), output=None, task="generation",
                              max_new_tokens=3, temperature=None, batch_size=8)
    assert generate_command(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.completions.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2] and rows[1]["prompt"] == "Continue this movie review:\n\nThe film was"
    csv = tmp_path / "q.csv"
    csv.write_text("prompt\nSay hi\n", encoding="utf-8")
    args.input, args.output, args.task = str(csv), str(tmp_path / "o" / "out.jsonl"), None
    assert generate_command(args) == 0
    assert json.loads((tmp_path / "o" / "out.jsonl").read_text())["prompt"] == "Say hi"


def test_cli_data_errors_exit_2(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n', encoding="utf-8")
    assert main(["generate", "--model", "tiny-random-llama", "--input", str(bad)]) == 2
    assert "bad.jsonl:1: field 'prompt': missing required field" in capsys.readouterr().err
    assert main(["eval", "--task", "classification", "--model", "tiny-random-llama", "--data", str(bad)]) == 2
    assert "bad.jsonl:1: field 'label': missing required field" in capsys.readouterr().err
    assert main(["eval", "--task", "ner", "--model", "tiny-random-llama", "--option", "colour=red"]) == 2
    assert "task.options.colour" in capsys.readouterr().err
    with pytest.raises(DataError):
        generate_command(argparse.Namespace(model="tiny-random-llama", input=str(bad), output=None, task=None,
                                            max_new_tokens=None, temperature=None, batch_size=1))


def test_docs_python_task_example_runs(tmp_path: Path, monkeypatch) -> None:
    """The one-file task of docs/tasks.md, as written, evaluates end to end."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "tasks.md").read_text(encoding="utf-8")
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_tasks.py").write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "Capital of France?", "answer": "Paris"}\n', encoding="utf-8")
    task = build_task("my_tasks:QATask", {})
    assert task.reward_functions()[0][0]([""], [" paris. "], answer=["Paris"]) == [1.0]
    out = tmp_path / "out"
    assert eval_command(_eval_args(task="my_tasks:QATask", data=str(data), output_dir=str(out))) == 0
    assert json.loads((out / "metrics.json").read_text())["exact_match"] in (0.0, 1.0)
    with pytest.raises(ConfigError, match="no demo data"):
        task.load(None)
