"""The label_judge reward: hand-computed scores from label log-probs, a tiny judge end to end, settings
rejected before any model loads, and on the real embedded model the sampled answer decides the reward."""

import math

import pytest
import torch

from ppolm.errors import ConfigError
from ppolm.rewards.compose import resolve_reward_function
from ppolm.rewards.label_judge import judge_scores


def test_judge_scores_prob_and_margin_by_hand():
    lp = torch.tensor([[math.log(0.2), math.log(0.8)], [math.log(0.2), math.log(0.8)]])
    assert judge_scores(lp, [1, 0]) == pytest.approx([0.8, 0.2])
    lp3 = torch.tensor([[-1.0, -3.0, -2.0], [-1.0, -3.0, -2.0]])
    # gold 0: -1 - max(-3, -2) = 1; gold 1: -3 - max(-1, -2) = -2
    assert judge_scores(lp3, [0, 1], form="margin") == pytest.approx([1.0, -2.0])
    # unnormalised log-probs give the same probabilities (softmax over the label set)
    assert judge_scores(lp3, [2, 2]) == pytest.approx([math.exp(-2) / (math.exp(-1) + math.exp(-3) + math.exp(-2))] * 2)


def test_tiny_judge_reads_the_completion():
    fn = resolve_reward_function("label_judge", {"judge": "tiny-random-llama"})
    prompts = ["Review: fine.\nAnswer:"] * 3
    completions = ["positive", "negative", "positive"]
    r = fn(prompts, completions, label=["positive"] * 3, labels_all=[["negative", "positive"]] * 3)
    assert len(r) == 3 and all(0.0 <= x <= 1.0 for x in r)
    assert r[0] == pytest.approx(r[2])  # deterministic
    assert r[0] != pytest.approx(r[1])  # the completion changes what the judge reads
    # the two labels' probabilities add to one for each row
    other = fn(prompts, completions, label=["negative"] * 3, labels_all=[["negative", "positive"]] * 3)
    assert [a + b for a, b in zip(r, other)] == pytest.approx([1.0] * 3)


@pytest.mark.parametrize("kwargs, match", [
    ({"form": "logit"}, "form must be 'prob' or 'margin'"),
    ({"judge": "no-such-model"}, "not a known name"),
    ({"temperature": 1.0}, "has no setting"),
])
def test_bad_settings_rejected_before_any_load(kwargs, match):
    from ppolm.errors import ModelLoadError

    with pytest.raises((ConfigError, ModelLoadError), match=match):
        resolve_reward_function("label_judge", kwargs)


@pytest.mark.slow
def test_embedded_judge_rewards_the_right_answer():
    from ppolm.models import EMBEDDED, load_tokenizer
    from ppolm.tasks import build_task

    task = build_task("classification", {})
    tok = load_tokenizer(EMBEDDED)
    user = task.format_prompt("The battery died after two days and support never answered.")
    prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
    fn = resolve_reward_function("label_judge", {"judge": EMBEDDED})
    labels = task.labels or ["negative", "positive"]
    r = fn([prompt] * 2, ["Negative.", "Positive."], label=["negative"] * 2, labels_all=[labels] * 2)
    assert r[0] > 0.5 > r[1], r


def test_pipeline_rejects_bad_reward_settings_when_the_config_is_read(tmp_path):
    # the PPO stage runs after base evaluation and SFT: its reward settings must fail before any of them
    from ppolm.config_io import load_config
    from ppolm.pipeline import PipelineConfig

    with pytest.raises(ConfigError, match="ppo.reward.*form must be 'prob' or 'margin'"):
        load_config(PipelineConfig, None, [f"output_dir={tmp_path}/run",
                                           "ppo.reward.functions=[{name: label_judge, kwargs: {form: x}}]"])
    assert not (tmp_path / "run").exists()


def test_label_set_flattens_row_fields_once_in_order():
    from ppolm.eval.metrics import label_set

    assert label_set([["negative", "positive"], ["negative", "positive"]]) == ["negative", "positive"]
    assert label_set(("b", "a")) == ["b", "a"] and label_set([]) == [] and label_set(None) is None
