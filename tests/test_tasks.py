"""The four built-in tasks: demo data, readers (small files here, then the real files under shared/data),
prompts, references, rewards and metrics against hand-computed values."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from ppolm.errors import ConfigError, DataError
from ppolm.rewards.sentiment import sentiment_reward, sentiment_score
from ppolm.tasks import build_task
from ppolm.tasks.classification import ClassificationTask
from ppolm.tasks.demo_data import (
    NOUNS,
    demo_path,
    ner_sentences,
    phrase_pairs,
    review_openings,
    sentiment_reviews,
)
from ppolm.tasks.generation import GenerationTask
from ppolm.tasks.ner import NERTask
from ppolm.tasks.translation import TranslationTask, language

SHARED = Path(os.environ.get("PPOLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data folder {SHARED} is absent")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPOLM_CACHE", str(tmp_path / "cache"))  # demo files go to a fresh cache per test


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- demo data --------------------------------------------------------------------------------------------


def test_demo_generators_are_deterministic_and_balanced() -> None:
    assert sentiment_reviews() == sentiment_reviews()
    reviews = sentiment_reviews()
    assert len(reviews) == 400 and len({r["text"] for r in reviews}) == 400
    assert sum(r["label"] == "positive" for r in reviews) == 200
    assert phrase_pairs() == phrase_pairs() and len(set(phrase_pairs())) == 300
    assert len(review_openings()) == 300
    sentences = ner_sentences()
    assert len(sentences) == 300 and sum(not any(t != "O" for t in tags) for _, tags in sentences) == 60
    for tokens, tags in sentences:
        assert len(tokens) == len(tags)
        for prev, tag in zip(["O"] + tags, tags):  # IOB2: every I- continues a chunk of its own type
            assert not tag.startswith("I-") or prev[2:] == tag[2:]


def test_even_spread_of_demo_reviews_keeps_both_classes() -> None:
    from ppolm.eval.run import spread

    # eval --limit 200 takes every second row of 400: the demo order must not alternate the labels.
    for limit in (50, 100, 200):
        assert {r["label"] for r in spread(sentiment_reviews(), limit)} == {"negative", "positive"}
        assert {r["label"] for r in spread(review_openings(), limit)} == {"negative", "positive"}


def test_demo_german_articles_follow_gender() -> None:
    # "I see the <adj> <noun>." is accusative: den (m), die (f), das (n).
    article = {"m": "den", "f": "die", "n": "das"}
    checked = 0
    for en, de in phrase_pairs():
        if en.startswith("I see the "):
            noun = en.rstrip(".").split()[-1]
            german, gender = NOUNS[noun]
            assert de.startswith(f"Ich sehe {article[gender]} ") and de.endswith(f" {german}.")
            checked += 1
    assert checked > 20


def test_every_task_loads_its_demo_data() -> None:
    sizes = {"classification": 400, "ner": 300, "translation": 300, "generation": 300}
    for name, size in sizes.items():
        examples = build_task(name, {}).load(None)
        assert len(examples) == size
        assert all(ex.prompt for ex in examples)
        assert examples[0].source.startswith(str(demo_path(name).parent))
    assert demo_path("translation").with_suffix(".de").is_file()


# ---- classification ---------------------------------------------------------------------------------------


def test_classification_jsonl_prompt_reference_and_fields(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "Great <br />film", "label": 1}\n{"text": "Bad", "label": 0}\n')
    task = ClassificationTask()
    examples = task.load(path)
    assert task.labels == ["negative", "positive"]  # 0/1 default names, in label order
    assert examples[0].reference == "positive" and examples[0].fields == {"label": "positive",
                                                                          "labels_all": ["negative", "positive"]}
    assert examples[0].prompt.endswith("Text: Great film") and "negative or positive" in examples[0].prompt
    assert (examples[1].source, examples[1].line) == (path, 2)


def test_classification_glue_tsv_and_label_names_options(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.tsv", "sentence\tlabel\nfun ride\t1\ndull\t0\nok\t2\n")
    ex = ClassificationTask(label_names={0: "bad", 1: "good", 2: "meh"}).load(path)
    assert [e.reference for e in ex] == ["good", "bad", "meh"]
    ex = ClassificationTask(label_names=["bad", "good", "meh"]).load(path)  # list: sorted raw labels 0, 1, 2
    assert [e.reference for e in ex] == ["good", "bad", "meh"]
    with pytest.raises(ConfigError, match="name them with"):
        ClassificationTask().load(path)  # 0/1/2 without names: no guess
    with pytest.raises(DataError, match=r"train.tsv:4: field 'label': label '2' has no name"):
        ClassificationTask(label_names={0: "bad", 1: "good"}).load(path)
    with pytest.raises(ConfigError, match="distinct"):
        ClassificationTask(label_names={0: "Good", 1: "good"})


def test_classification_headerless_csv_uses_classes_txt(tmp_path: Path) -> None:
    _write(tmp_path / "classes.txt", "World\nSports\n")
    path = _write(tmp_path / "test.csv", '"2","Cup final","Team wins 2-1."\n"1","Summit","Leaders meet."\n')
    task = ClassificationTask()
    ex = task.load(path)
    assert task.labels == ["World", "Sports"]
    assert [e.reference for e in ex] == ["Sports", "World"]
    assert ex[0].prompt.endswith("Text: Cup final\nTeam wins 2-1.")  # title and description joined


def test_classification_missing_field_is_a_data_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"txt": "a", "label": 1}\n')
    with pytest.raises(DataError, match="field 'text': missing required field"):
        ClassificationTask().load(path)


def test_classification_reward_and_metrics_hand_computed(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in
                                                [("a", 1), ("b", 1), ("c", 0), ("d", 0)]))
    task = ClassificationTask(partial_credit=0.5)
    ex = task.load(path)
    completions = ["Positive.", "negative, no: positive", "The answer is negative", "unsure"]
    fn, weight = task.reward_functions()[0]
    rows = task.row_fields(ex)  # as PPO passes them: one labels_all list per row
    assert weight == 1.0 and fn([""] * 4, completions, **rows) == [1.0, 0.5, 1.0, 0.0]
    probs = [[0.2, 0.8], [0.6, 0.4], [0.7, 0.3], [0.1, 0.9]]
    m = task.metrics(ex, completions, label_probs=probs)
    assert m["accuracy"] == 0.5 and m["invalid_rate"] == 0.25
    assert m["confusion_matrix"] == [[1, 0], [1, 1]]  # rows true (neg, pos), columns predicted
    assert m["reward_mean"] == pytest.approx(2.5 / 4)
    # positive-class scores 0.8, 0.4 (positives) vs 0.3, 0.9 (negatives): 2 of 4 pairs ordered right.
    assert m["roc_auc"] == pytest.approx(0.5)
    assert m["prob_accuracy"] == pytest.approx(0.5)  # argmax: pos, neg, neg, pos
    scores = task.example_scores(ex, completions, label_probs=probs)
    assert scores[0] == {"predicted": "positive", "correct": True, "label_probs": {"negative": 0.2, "positive": 0.8}}


@needs_shared
def test_classification_reads_ag_news_and_imdb() -> None:
    task = ClassificationTask()
    ag = task.load(str(SHARED / "classification/ag_news/test.csv"))
    assert len(ag) == 7600 and task.labels == ["World", "Sports", "Business", "Sci/Tech"]
    assert [e.reference for e in ag[:3]] == ["Business", "Sci/Tech", "Sci/Tech"]
    assert "Text: Fears for T N pension after talks\nUnions representing" in ag[0].prompt
    imdb = ClassificationTask().load(str(SHARED / "classification/imdb/test_first500perclass.jsonl"))
    assert len(imdb) == 1000 and imdb[0].reference == "negative" and imdb[-1].reference == "positive"
    assert all("<br" not in e.prompt for e in imdb)
    assert max(len(e.prompt.split("Text: ", 1)[1].split()) for e in imdb) == 201  # 200 words + "..."


# ---- NER --------------------------------------------------------------------------------------------------


def test_ner_conll_iob1_reference_reward_and_metrics(tmp_path: Path) -> None:
    conll = "U.N.\tNNP\tI-ORG\nofficial\tNN\tO\nEkeus\tNNP\tI-PER\nheads\tVBZ\tO\nfor\tIN\tO\nBaghdad\tNNP\tI-LOC\n\n" \
            "Quiet\tJJ\tO\nday\tNN\tO\n"
    task = NERTask()
    ex = task.load(_write(tmp_path / "d.conll", conll))
    assert task.entity_types == ["LOC", "ORG", "PER"]
    assert ex[0].reference == "ORG: U.N.; PER: Ekeus; LOC: Baghdad" and ex[1].reference == "none"
    assert ex[0].prompt.endswith("types: LOC, ORG, PER. If there are none, write none.\n\nText: U.N. official "
                                 "Ekeus heads for Baghdad")
    completions = ["Organization: U.N.; person: Ekeus", "none"]
    fn = task.reward_functions()[0][0]
    r = fn(["", ""], completions, **task.row_fields(ex))
    assert r == pytest.approx([0.8, 1.0])  # P = 2/2, R = 2/3 -> F1 = 0.8; an empty "none" is right
    m = task.metrics(ex, completions)
    assert (m["precision"], m["recall"]) == (1.0, pytest.approx(2 / 3))
    assert m["per_type"]["LOC"]["recall"] == 0.0 and m["none_rate"] == 0.5
    assert task.example_scores(ex, completions)[0]["entities"] == [["ORG", "U.N"], ["PER", "Ekeus"]]  # parser strips the period


def test_ner_jsonl_integer_tags_need_names(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"tokens": ["Ada", "Lovelace", "wrote"], "tags": [1, 2, 0]}\n')
    ex = NERTask(tag_names=["O", "B-PER", "I-PER"]).load(path)
    assert ex[0].fields["entities"] == [["PER", "Ada Lovelace"]]
    with pytest.raises(DataError, match="tag_names"):
        NERTask().load(path)


def test_ner_bad_tag_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"d.conll:2: field 'tag'"):
        NERTask().load(_write(tmp_path / "d.conll", "a\tO\nb\tX-PER\n"))


@needs_shared
def test_ner_reads_wnut17_with_its_type_names() -> None:
    task = NERTask()
    ex = task.load(str(SHARED / "ner/wnut17/emerging.test.annotated"))
    assert len(ex) == 1287
    assert task.entity_types == ["corporation", "creative-work", "group", "location", "person", "product"]
    gold = next(e for e in ex if e.fields["entities"] and e.fields["entities"][0][0] == "person")
    name = gold.fields["entities"][0][1]
    # Long and capitalised type names of the answer map onto the WNUT types.
    assert task.metrics([gold], [f"Person: {name}"])["tp"] == 1


# ---- translation ------------------------------------------------------------------------------------------


def test_language_names_and_codes() -> None:
    assert language("de") == ("German", "de") and language("cmn") == ("Chinese", "zh")
    assert language("german") == ("German", "de") and language("Klingon") == ("Klingon", None)


def test_translation_parallel_siblings_and_metrics(tmp_path: Path) -> None:
    _write(tmp_path / "t.fr", "le chat noir dort sur le tapis\nbonjour\n")
    path = _write(tmp_path / "t.en", "the cat\nhello\n")
    task = TranslationTask()
    ex = task.load(path)
    assert (task.src_name, task.tgt_name, task.tgt_code) == ("English", "French", "fr")
    assert ex[0].prompt == "Translate this English text into French. Reply with the translation only.\n\nthe cat"
    assert ex[0].reference == "le chat noir dort sur le tapis" and ex[0].fields["source"] == "the cat"
    m = task.metrics(ex, [" le chat noir dort sur le tapis ", "bonjour"])
    assert m["bleu"] == pytest.approx(100.0) and m["chrf"] == pytest.approx(100.0) and m["ter"] == 0.0
    assert task.reward_functions()[0][0](["", ""], ["bonjour", ""], reference=["bonjour", "bonjour"]) == [1.0, 0.0]
    _write(tmp_path / "t.de", "die Katze\nhallo\n")
    with pytest.raises(DataError, match="several possible target files"):
        TranslationTask().load(path)
    assert TranslationTask(target=str(tmp_path / "t.de")).load(path)[1].reference == "hallo"


def test_translation_jsonl_fields_and_missing_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", '{"en": "hi", "de": "hallo"}\n')
    ex = TranslationTask(source_field="en", target_field="de", tgt_lang="German").load(path)
    assert ex[0].reference == "hallo" and ex[0].prompt.endswith("into German. Reply with the translation only.\n\nhi")
    with pytest.raises(DataError, match="field 'source'"):
        TranslationTask().load(path)


@needs_shared
def test_translation_reads_tatoeba_and_multi30k() -> None:
    task = TranslationTask()
    ex = task.load(str(SHARED / "translation/tatoeba_cmn_eng/cmn.txt"))
    assert len(ex) == 26388 and (task.tgt_name, task.tgt_code) == ("Chinese", "zh")
    assert ex[0].reference == "嗨。" and ex[0].prompt.endswith("into Chinese. Reply with the translation only.\n\nHi.")
    assert task.metrics(ex[:2], ["嗨。", "你好。"])["bleu_tokenize"] == "zh"
    task = TranslationTask()
    ex = task.load(str(SHARED / "translation/multi30k/val.en"))
    assert len(ex) == 1014 and task.tgt_code == "de"
    assert ex[0].reference == "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"


# ---- generation -------------------------------------------------------------------------------------------


def test_sentiment_lexicon_hand_computed() -> None:
    assert sentiment_score("A good film.") == pytest.approx(0.5)          # (1 - 0) / (1 + 0 + 1)
    assert sentiment_score("It was not good.") == pytest.approx(-0.5)     # negation flips
    assert sentiment_score("Not long, but good.") == pytest.approx(0.5)   # the comma stops the negation
    assert sentiment_score("good acting, bad plot") == 0.0                # (1 - 1) / 3
    assert sentiment_score("The film was released in May.") == 0.0
    assert sentiment_reward(["", ""], ["great and wonderful", "awful"], target="positive") == \
        pytest.approx([(1 + 2 / 3) / 2, (1 - 0.5) / 2])
    assert sentiment_reward([""], ["awful"], target="negative") == pytest.approx([0.75])
    with pytest.raises(ConfigError):
        sentiment_reward([""], ["x"], target="neutral")


def test_generation_openings_references_and_prompt_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.jsonl", '{"text": "one two three four five six", "label": 1}\n{"text": "x"}\n')
    ex = GenerationTask(prompt_words=3, reference_words=2, instruction="Go on: {text}").load(path)
    assert ex[0].prompt == "Go on: one two three" and ex[0].reference == "four five"
    assert ex[0].fields == {"label": 1} and ex[1].reference is None
    assert len(GenerationTask(min_chars=5).load(path)) == 1
    path = _write(tmp_path / "p.csv", "prompt,reference\nTell me a story about a cat that,it sat\n")
    ex = GenerationTask().load(path)
    assert ex[0].prompt.endswith("Tell me a story about a cat that") and ex[0].reference == "it sat"
    ex = GenerationTask(instruction="{text}").load(_write(tmp_path / "lines.txt", "Once upon a time\n"))
    assert ex[0].prompt == "Once upon a time"


def test_generation_metrics_hand_computed(tmp_path: Path) -> None:
    task = GenerationTask()
    ex = task.load(_write(tmp_path / "r.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n'))
    m = task.metrics(ex, ["good good", "bad film"], kls=[0.5, 1.5], ref_nll=[2.0, 4.0], ref_tokens=[2, 4])
    assert m["reward_mean"] == pytest.approx(((1 + 2 / 3) / 2 + (1 - 0.5) / 2) / 2)
    assert m["kl_mean"] == 1.0 and m["distinct_1"] == pytest.approx(3 / 4) and m["length_mean_words"] == 2.0
    assert m["perplexity"] == pytest.approx(math.exp(6.0 / 6))  # token-weighted, not a mean of perplexities
    assert m["positive_rate"] == 0.5
    s = task.example_scores(ex, ["good good", "bad film"], kls=[0.5, 1.5], ref_nll=[2.0, 4.0], ref_tokens=[2, 4])
    assert s[1] == {"sentiment": -0.5, "kl": 1.5, "perplexity": pytest.approx(math.e)}


@needs_shared
def test_generation_reads_imdb_prompts() -> None:
    ex = GenerationTask().load(str(SHARED / "generation/imdb_prompts/train_first500perclass.jsonl"))
    assert len(ex) == 1000
    bromwell = next(e for e in ex if "Bromwell" in e.prompt)
    assert bromwell.prompt == "Continue this movie review:\n\nBromwell High is a cartoon comedy. It ran"
    assert bromwell.reference.startswith("at the same time as some other programs about school life")
    assert len(bromwell.reference.split()) == 48


def test_unknown_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="task.options.lable_names"):
        build_task("classification", {"lable_names": {}})
