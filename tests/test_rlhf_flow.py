"""The RLHF flow (`ppolm run` with `flow: rlhf`): its config, best-of-n selection, and a tiny end-to-end run that
writes the data files, trains every stage, evaluates every method on the same prompts and renders the report."""

import json
import math
from pathlib import Path

import pytest
import torch

from ppolm.cli import main
from ppolm.config import load_config
from ppolm.errors import ConfigError
from ppolm.rlhf.config import RLHFConfig, requested_flow
from ppolm.rlhf.evaluate import Samples, best_of_n, metrics_of

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs/pipeline-rlhf-tiny.yaml")


@pytest.mark.parametrize("override, message", [
    ("rm.data=x.jsonl", "rm.data is set by the flow"),
    ("ppo.rollout.temperature=0.7", "temperature must be 1"),
    ("eval.best_of=[1]", "n must be >= 2"),
    ("ppo.optim.lrr=1", "unknown key 'ppo.optim.lrr'"),
    ("data.instruction=Continue", "must contain {text}"),
    ("methods=[base, rlhf]", "methods"),
])
def test_config_rejections(override, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("[", r"\[")):
        load_config(RLHFConfig, TINY, [override])


def test_requested_flow(tmp_path):
    assert requested_flow(TINY, []) == "rlhf"
    assert requested_flow(str(ROOT / "configs/pipeline-tiny.yaml"), []) is None
    assert requested_flow(None, ["flow=rlhf"]) == "rlhf"
    with pytest.raises(ConfigError, match="unknown flow 'dpo'"):
        requested_flow(None, ["flow=dpo"])


def _samples() -> Samples:
    # 2 prompts x 4 samples; prompt 0's best of the first 2 is sample 1, of all 4 sample 3; prompt 1's is sample 0
    rm = torch.tensor([[0.0, 1.0, 0.5, 2.0], [3.0, 1.0, 2.0, 0.0]])
    texts = [[f"p{p} s{j}" for j in range(4)] for p in range(2)]
    judge = torch.tensor([[0.0, 0.5, 0.0, -0.5], [0.9, 0.0, 0.0, 0.0]])
    return Samples(texts, rm, judge, torch.zeros(2, 4), torch.ones(2, 4) * 2.0, torch.ones(2, 4) * 2.0)


def test_best_of_n_picks_by_reward_model_with_analytic_kl():
    picked, m = best_of_n(_samples(), 2)
    assert [t[0] for t in picked.texts] == ["p0 s1", "p1 s0"]
    assert m["rm_score"] == 2.0 and m["judge_positive_share"] == 1.0
    assert m["kl"] == pytest.approx(math.log(2) - 0.5) and m["kl_se"] is None
    picked, m = best_of_n(_samples(), 4)
    assert [t[0] for t in picked.texts] == ["p0 s3", "p1 s0"] and m["rm_score"] == 2.5
    assert m["judge_positive_share"] == 0.5  # the reward model's best is not the judge's: -0.5 is negative
    base = metrics_of(_samples())
    assert base["rm_score"] == 1.5 and base["kl"] == 0.0 and base["perplexity"] == pytest.approx(math.e)


@pytest.mark.slow
def test_tiny_flow_end_to_end(tmp_path):
    out = tmp_path / "rlhf"
    assert main(["run", TINY, f"output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    methods = summary["methods"]
    assert list(methods) == ["base", "best-of-4", "best-of-16", "sft", "dpo", "ppo", "sft_ppo"]
    rm = [methods[m]["metrics"]["rm_score"] for m in ("base", "best-of-4", "best-of-16")]
    assert rm[0] <= rm[1] <= rm[2]  # the best of 16 includes the best of the first 4, which includes sample 0
    assert methods["base"]["metrics"]["kl"] == 0.0 and methods["sft"]["metrics"]["kl"] > 0.0
    for m in methods.values():
        assert m["metrics"]["n"] == 8 and isinstance(m["flags"], list)
        assert m["metrics"]["perplexity"] > 1.0 and 0.0 <= m["metrics"]["judge_positive_share"] <= 1.0
    assert 0.0 <= summary["reward_model"]["pairwise_accuracy"] <= 1.0
    # the held-out checks of PPO measure KL against the base model (the frontier's curve)
    checks = [json.loads(line) for line in (out / "ppo/metrics.jsonl").read_text().splitlines()]
    kls = [r["eval/kl_mean"] for r in checks if "eval/kl_mean" in r]
    assert kls[0] == 0.0 and kls[-1] > 0.0
    # the held-out prompts never reach training
    test = {json.loads(line)["prompt"] for line in (out / "data/test_prompts.jsonl").read_text().splitlines()}
    train = {json.loads(line)["prompt"] for line in (out / "data/train_pairs.jsonl").read_text().splitlines()}
    assert test and not test & train
    assert (out / "report_files/frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "reward hacking" in html.lower()
    md = (out / "report.md").read_text()
    assert "| best-of-16 |" in md and md.count("  - ppo: ") == 3
    assert not list(out.glob("*/checkpoint-*"))


def test_seed_table_and_acceptance_checks():
    from ppolm.rlhf.seeds import acceptance, markdown, mean_std, seed_means

    def summary(seed, ppo_share):
        m = lambda rm, share, ppl, d2: {"metrics": {"rm_score": rm, "judge_positive_share": share, "perplexity": ppl,
                                                    "distinct_1": 0.5, "distinct_2": d2, "length_words": 9.0,
                                                    "kl": 1.0}}
        return {"seed": seed, "methods": {"base": m(0.0, 0.5, 10.0, 0.8), "best-of-16": m(2.0, 0.7, 10.0, 0.8),
                                          "sft": m(0.5, 0.6, 8.0, 0.7), "dpo": m(0.6, 0.65, 9.0, 0.7),
                                          "ppo": m(1.0, ppo_share, 11.0, 0.7)}}

    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    means = seed_means([summary(0, 0.7), summary(1, 0.8)])
    assert means["ppo"]["judge_positive_share"] == (pytest.approx(0.75), pytest.approx(math.sqrt(0.005)))
    checks = acceptance(means)
    # 0.75 >= 0.6 + 0.10, >= 0.65; 11 <= 1.5 x 8; 0.7 >= 0.8 x 0.8; PPO has half of best-of-16's gain
    assert [c[1] for c in checks] == [True, True, True, True, None] and checks[-1][2] == "0.50"
    assert acceptance(seed_means([summary(0, 0.65)]))[0][1] is False
    assert "| ppo | 1.000 ± 0.000 | 0.750 ± 0.071 |" in markdown([summary(0, 0.7), summary(1, 0.8)])


def test_checks_reuse_the_trainers_reference_when_it_is_the_same_model():
    """The PPO stage's held-out checks measure KL to the task's reference_model; when that is the run's own frozen
    reference they use it instead of loading a second copy (which OOM-killed the full flow's PPO stage)."""
    from types import SimpleNamespace

    from ppolm.trainers.actor_critic import shared_reference

    task = SimpleNamespace(options=SimpleNamespace(reference_model="tiny-random-llama"))
    ref = object()
    assert shared_reference(ref, "tiny-random-llama", task, 1) is ref
    assert shared_reference(ref, "tiny-random-llama", task, 2) is None  # sharded under 2 processes: load apart
    assert shared_reference(ref, "tiny-random-gpt2", task, 1) is None  # SFT->PPO: the reference is the SFT model
    assert shared_reference(None, "tiny-random-llama", task, 1) is None  # LoRA: no separate reference
    assert shared_reference(ref, "tiny-random-llama", SimpleNamespace(options=None), 1) is None
