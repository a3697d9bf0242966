"""Task rewards: hand-computed values, agreement with the eval metrics, and the registry."""

from __future__ import annotations

import pytest

from ppolm.errors import ConfigError
from ppolm.eval.mt_metrics import sentence_chrf
from ppolm.rewards.task_rewards import (
    REWARD_FUNCTIONS,
    classification_reward,
    contains_reward,
    get_reward_function,
    length_reward,
    ner_reward,
    translation_reward,
)

LABELS = ["negative", "neutral", "positive"]


def test_classification_reward() -> None:
    completions = [
        "Positive.",                        # first label = gold -> 1
        "negative, or maybe positive",      # gold appears but not first -> partial
        "I think it is neutral",            # wrong label -> 0
        "no idea",                          # no label -> 0
        "positively",                       # not a whole word -> 0
        "POSITIVE or negative",             # first = gold -> 1
    ]
    gold = ["positive"] * 6
    prompts = [""] * 6
    assert classification_reward(prompts, completions, label=gold, labels_all=LABELS, partial_credit=0.25) == [
        1.0, 0.25, 0.0, 0.0, 0.0, 1.0
    ]
    assert classification_reward(prompts, completions, label=gold, labels_all=LABELS)[1] == 0.0
    # the symmetric reward: a wrong label costs -1, an answer naming no label still earns 0
    assert classification_reward(prompts, completions, label=gold, labels_all=LABELS, partial_credit=0.25,
                                 wrong_label_reward=-1.0) == [1.0, 0.25, -1.0, 0.0, 0.0, 1.0]


def test_the_task_option_reaches_the_reward() -> None:
    from ppolm.tasks import build_task

    task = build_task("classification", {"wrong_label_reward": -1.0})
    rows = task.load(None)[:4]
    fn, weight = task.reward_functions()[0]
    gold = [ex.fields["label"] for ex in rows]
    wrong = [next(w for w in ex.fields["labels_all"] if w != g) for ex, g in zip(rows, gold)]
    assert fn([""] * 4, wrong, **task.row_fields(rows)) == [-1.0] * 4
    assert fn([""] * 4, gold, **task.row_fields(rows)) == [1.0] * 4


def test_classification_reward_without_label_set_uses_batch_labels() -> None:
    r = classification_reward(["", ""], ["negative", "positive"], label=["positive", "negative"], other=[1, 2])
    assert r == [0.0, 0.0]  # both labels are in the batch, so the wrong one is recognized


def test_ner_reward() -> None:
    entities = [
        [("PER", "Ada Lovelace"), ("LOC", "London")],
        [],
        [["ORG", "IBM"]],                     # JSON rows give lists, not tuples
        [{"type": "PER", "text": "Bob"}],
    ]
    completions = ["PER: Ada Lovelace; LOC: Paris", "none", "ORG: IBM.", "garbage ::"]
    r = ner_reward([""] * 4, completions, entities=entities)
    assert r == [pytest.approx(0.5), 1.0, 1.0, 0.0]


def test_translation_reward() -> None:
    refs = ["the cat sat on the mat", "hello world"]
    hyps = ["the cat sat on a mat", "hello world"]
    chrf = translation_reward(["", ""], hyps, reference=refs)
    assert chrf[0] == pytest.approx(sentence_chrf(hyps[0], refs[0]) / 100) and chrf[1] == 1.0
    # a hypothesis that says the reference twice: all recall, half the precision. beta 2 (recall weighted) still
    # pays it well, beta 1 does not
    doubled = ["the cat sat on the mat the cat sat on the mat"]
    chrf2 = translation_reward([""], doubled, reference=refs[:1])[0]
    chrf1 = translation_reward([""], doubled, reference=refs[:1], metric="chrf1")[0]
    assert chrf1 == pytest.approx(sentence_chrf(doubled[0], refs[0], beta=1) / 100)
    assert chrf2 > 0.75 and chrf1 < 0.7 and chrf1 < chrf2, (chrf1, chrf2)
    bleu = translation_reward(["", ""], [" " + h for h in hyps], reference=refs, metric="bleu")
    assert 0.0 < bleu[0] < 1.0 and bleu[1] == 1.0
    with pytest.raises(ConfigError):
        translation_reward([""], ["a"], reference=["a"], metric="meteor")
    with pytest.raises(ValueError, match="reference"):
        translation_reward([""], ["a"], reference=["a", "b"])


def test_toy_rewards() -> None:
    assert length_reward(["", "", ""], ["a b c d", "a b", "a " * 20], target_words=4) == [1.0, 0.5, 0.0]
    r = contains_reward(["", "", ""], ["I love it, great!", "", "bad"], words={"love", "great"})
    assert r == [pytest.approx(2 / 4), 0.0, 0.0]


def test_registry() -> None:
    assert set(REWARD_FUNCTIONS) == {"classification", "ner", "translation", "length", "contains", "label_judge"}
    fn = get_reward_function("length", target_words=2)
    assert fn(["p"], ["a b"]) == [1.0]
    assert get_reward_function("ner") is REWARD_FUNCTIONS["ner"]
    with pytest.raises(ConfigError, match="allowed: classification, contains, label_judge, length, ner, translation"):
        get_reward_function("bleurt")
    with pytest.raises(ConfigError, match="target_words"):
        get_reward_function("length", target=3)
    with pytest.raises(ConfigError):
        length_reward([""], ["a"], target_words=0)


@pytest.mark.parametrize("name", sorted(REWARD_FUNCTIONS))
def test_rewards_are_in_unit_interval_and_per_example(name: str) -> None:
    completions = ["positive PER: Ada", "", "good good love", "LOC: x; negative"]
    fields = {
        "label": ["positive", "negative", "neutral", "negative"],
        "entities": [[("PER", "Ada")], [], [("LOC", "x")], [("LOC", "x")]],
        "reference": ["positive", "a", "good love", "x"],
    }
    fn = REWARD_FUNCTIONS[name]
    batch = fn([""] * 4, completions, **fields)
    assert len(batch) == 4 and all(0.0 <= r <= 1.0 for r in batch)
    # scoring one example at a time gives the same rewards as the whole batch (no batch coupling)
    if name not in ("classification", "label_judge"):  # without labels_all these use the batch's label set
        singles = [fn([""], [c], **{k: [v[i]] for k, v in fields.items()})[0] for i, c in enumerate(completions)]
        assert singles == pytest.approx(batch)


def test_classification_reward_through_the_config_a_user_writes(tmp_path) -> None:
    """`reward.functions: [{name: classification}]` on the classification task's own rows, whose `labels_all`
    field holds one label list per row: it crashed at the first batch (`list(labels_all)` kept the lists)."""
    from ppolm.config import PPORunConfig, load_config
    from ppolm.trainers.ppo import PPOTrainer

    cfg = load_config(PPORunConfig, None, [
        "model=tiny-random-llama", "precision=fp32", f"output_dir={tmp_path}", "max_steps=1",
        "log.progress=false", "log.tensorboard=false", "checkpoint.every=0", "task.name=classification",
        "reward.functions=[{name: classification, kwargs: {partial_credit: 0.5}}]",
        "rollout.batch_size=4", "ppo.minibatch_size=4", "rollout.max_new_tokens=4",
    ])
    trainer = PPOTrainer(cfg)
    examples = trainer.prompts.examples[:3]
    rows = trainer.task.row_fields(examples)
    assert isinstance(rows["labels_all"][0], list)  # the shape that crashed
    gold = rows["label"]
    other = [next(w for w in rows["labels_all"][0] if w != g) for g in gold]
    completions = [f"{gold[0]}.", f"{other[1]}, or maybe {gold[1]}", f"{other[2]}"]
    scores = trainer.scorer.raw_scores([ex.prompt for ex in examples], completions, rows)
    assert scores.tolist() == [1.0, 0.5, 0.0]
    last = trainer.train()  # and a whole step through the trainer's own scoring
    assert 0.0 <= last["reward/mean"] <= 1.0
