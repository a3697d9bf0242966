"""Text classification as generation: the model answers with a label word.

Labels are verbalized as words (``label_names``: ``{1: World, 2: Sports, ...}`` or a list for the sorted raw
labels; a ``classes.txt`` next to an integer-labelled file names them by line, as AG News ships it; 0/1
without names become negative/positive as in IMDB and SST-2). The reward is 1 when the first label word of
the completion is the gold one (``partial_credit`` when the gold word comes later). Evaluation adds label-word
probabilities (each label scored as a continuation, softmax over labels) for ROC-AUC.

Formats: JSONL/JSON/parquet with text and label fields; CSV/TSV with a header (GLUE ``sentence\\tlabel``);
headerless CSV whose first cell is an integer class (AG News ``class,title,description``); headerless
``sentence<TAB>label`` files (UCI Sentiment Labelled Sentences). Field names
are detected (text, sentence, review, ...; label, class, ...) or set with ``text_field`` / ``label_field``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from ppolm.data.check import headerless_class_columns
from ppolm.data.clean import clean_text, load_stop_words, remove_stop_words
from ppolm.data.readers import (
    Record,
    check_fields,
    detect_format,
    missing_reason,
    read_records,
)
from ppolm.errors import ConfigError, DataError
from ppolm.eval.metrics import classification_metrics, label_from_completion, label_set
from ppolm.rewards.task_rewards import classification_reward
from ppolm.tasks.base import Decoding, Example, RewardFn, Task, TaskOptions
from ppolm.tasks.demo_data import demo_path

LABEL_FIELDS = ("label", "labels", "class", "class_index", "category")
TEXT_FIELDS = ("text", "sentence", "review", "content", "description", "document")
BINARY_DEFAULT = ["negative", "positive"]
DEFAULT_INSTRUCTION = ("Which of these labels fits the text best: {labels}? Answer with the label only.\n\n"
                       "Text: {text}")
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_input(text: str, max_words: int | None = None, stop_words: frozenset[str] | None = None) -> str:
    """HTML line breaks (IMDB's ``<br />``) and whitespace runs -> one space; optional stop-word removal;
    cut to ``max_words`` + " ..."."""
    text = clean_text(_HTML_BREAK.sub(" ", text))
    if stop_words:
        text = remove_stop_words(text, stop_words)
    if max_words is not None:
        words = text.split(" ")
        if len(words) > max_words:
            text = " ".join(words[:max_words]) + " ..."
    return text


def join_labels(words: Sequence[str]) -> str:
    """``"World, Sports, Business or Sci/Tech"``."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


class ClassificationOptions(TaskOptions):
    label_names: dict[int | str, str] | list[str] | None = None
    """Raw label -> word ({1: World, 2: Sports}); a list names the sorted distinct raw labels in order."""
    text_field: str | list[str] | None = None
    """Field(s) holding the text (several are joined by newlines); default: a title plus the first of text,
    sentence, review, content, description, document."""
    label_field: str | None = None
    """Field holding the label; default: the first of label, labels, class, class_index, category."""
    columns: list[str] | None = None
    """Column names of a headerless CSV/TSV (AG News style files are recognised without it)."""
    instruction: str = DEFAULT_INSTRUCTION
    """Prompt template with {labels} (the label words joined) and {text}."""
    partial_credit: float = Field(0.0, ge=0.0, le=1.0)
    """Reward when the gold label occurs in the completion but another label word comes first."""
    wrong_label_reward: float = Field(0.0, ge=-1.0, le=0.0)
    """Reward when the completion names a label and it is the wrong one (an answer naming no label gets 0).
    -1 makes the reward symmetric: answering one label to every input then earns 0 on balanced data, no more
    than answering nothing, so PPO from the base model is not pulled towards that collapse while it learns
    the format (docs/results.md)."""
    max_words: int | None = Field(200, ge=1)
    """Inputs longer than this many words are cut (IMDB reviews run to 2,000 words); null keeps them whole."""
    stop_words: str | None = None
    """Remove stop words from the inputs: 'english' (scikit-learn's list) or a word-list file, one word a line;
    null (default) keeps the text as written. Applied before max_words."""


class ClassificationTask(Task):
    name = "classification"
    primary_metric = "accuracy"
    Options = ClassificationOptions
    decoding = Decoding(max_new_tokens=12, temperature=0.0)

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.labels: list[str] | None = None  # label words of the last file loaded
        names = self.options.label_names
        words = list(names.values()) if isinstance(names, dict) else names
        if words is not None:
            _check_words(words)
        sw = self.options.stop_words
        self.stop_words = load_stop_words(sw) if sw else None  # a bad list fails here, before any model loads

    # ---- data ----------------------------------------------------------------------------------------------
    def load(self, path: str | None) -> list[Example]:
        """Examples with reference = the label word and fields label, labels_all (the label words in order)."""
        path = Path(path) if path is not None else demo_path("classification")
        records = self._read(path)
        label_field, text_fields = self._fields(path, records)
        records = check_fields(records, [label_field, *text_fields],
                               {label_field: int | str, **dict.fromkeys(text_fields, str)})
        raw = [_raw(rec[label_field]) for rec in records]
        mapping = self._verbalizer(path, raw)
        self.labels = list(dict.fromkeys(mapping.values()))
        examples = []
        for rec, key in zip(records, raw):
            if key not in mapping:
                known = ", ".join(mapping)
                raise DataError(rec.source, rec.line, label_field,
                                f"label {key!r} has no name in label_names (named: {known})")
            text = "\n".join(clean_input(rec[f], self.options.max_words, self.stop_words) for f in text_fields)
            word = mapping[key]
            examples.append(Example(prompt=self.format_prompt(text), reference=word,
                                    fields={"label": word, "labels_all": self.labels},
                                    source=rec.source, line=rec.line))
        return examples

    def _read(self, path: Path) -> list[Record]:
        columns, fmt = self.options.columns, detect_format(path) if path.exists() else None
        if columns is None and fmt is not None:
            found = headerless_class_columns(path, fmt)
            columns = found[0] if found else None
        return read_records(path, columns=columns)

    def _fields(self, path: Path, records: list[Record]) -> tuple[str, list[str]]:
        names = list(dict.fromkeys(k for rec in records[:50] for k in rec.fields))
        line = records[0].line

        def need(name: str) -> str:
            if name not in names:
                raise DataError(path, line, name, missing_reason(name, names))
            return name

        opt = self.options
        label = need(opt.label_field) if opt.label_field else next((n for n in LABEL_FIELDS if n in names), None)
        if label is None:
            need("label")
        if opt.text_field is not None:
            texts = [need(f) for f in ([opt.text_field] if isinstance(opt.text_field, str) else opt.text_field)]
        else:
            main = next((n for n in TEXT_FIELDS if n in names), None) or need("text")
            texts = (["title"] if "title" in names else []) + [main]
        return label, texts

    def _verbalizer(self, path: Path, raw: list[str]) -> dict[str, str]:
        """Raw label (as a string) -> label word, in the order the label words are listed."""
        names = self.options.label_names
        distinct = sorted(set(raw), key=lambda k: (not _is_int(k), int(k) if _is_int(k) else 0, k))
        if isinstance(names, dict):
            return {_raw(k): v for k, v in names.items()}
        if isinstance(names, list):
            if len(names) != len(distinct):
                raise ConfigError(f"task.options.label_names: {len(names)} names for {len(distinct)} distinct "
                                  f"labels in {path} ({', '.join(distinct)})")
            return dict(zip(distinct, names))
        ints = all(_is_int(k) for k in distinct)
        classes = path.parent / "classes.txt"
        if ints and classes.is_file():
            words = [w.strip() for w in classes.read_text(encoding="utf-8").splitlines() if w.strip()]
            base = 0 if "0" in distinct else 1  # AG News numbers its classes from 1
            _check_words(words)
            return {str(i + base): w for i, w in enumerate(words)}
        if ints and set(distinct) <= {"0", "1"}:
            return dict(zip(["0", "1"], BINARY_DEFAULT))
        if ints:
            raise ConfigError(f"labels of {path} are numbers ({', '.join(distinct[:8])}): name them with "
                              "task.options.label_names, e.g. {0: negative, 1: positive}")
        _check_words(distinct)
        return {k: k for k in distinct}

    def format_prompt(self, text: str) -> str:
        """The user message for ``text`` (replace, not str.format: inputs may contain braces)."""
        words = self.labels or _words(self.options.label_names) or BINARY_DEFAULT
        return self.options.instruction.replace("{labels}", join_labels(words)).replace("{text}", text)

    # ---- reward and metrics --------------------------------------------------------------------------------
    def reward_functions(self) -> list[tuple[RewardFn, float]]:
        credit, wrong = self.options.partial_credit, self.options.wrong_label_reward

        def reward(prompts, completions, *, label, labels_all=None, **fields):
            # Row fields hold one label list per row; classification_reward wants the label set once.
            return classification_reward(prompts, completions, label=label, labels_all=label_set(labels_all),
                                         partial_credit=credit, wrong_label_reward=wrong)

        return [(reward, 1.0)]

    def label_words(self, examples: Sequence[Example]) -> list[str] | None:
        """Label words in score order (evaluation scores each as a continuation for ROC-AUC)."""
        return list(examples[0].fields["labels_all"]) if examples else None

    def metrics(self, examples: Sequence[Example], completions: Sequence[str], **extra: Any) -> dict[str, Any]:
        """Accuracy, P/R/F1 macro/micro and per class, confusion matrix, invalid rate, reward mean; with
        ``label_probs`` (B, C) also ROC-AUC (one-vs-rest macro for C > 2) and ``prob_accuracy`` = accuracy
        of argmax_c label_probs."""
        labels = self.label_words(examples) or []
        gold = [ex.fields["label"] for ex in examples]
        pred = [label_from_completion(c, labels) for c in completions]
        probs = extra.get("label_probs")
        out = classification_metrics(gold, pred, labels, scores=probs)
        rewards = self.reward_functions()[0][0]([ex.prompt for ex in examples], list(completions),
                                                **self.row_fields(examples))
        out["reward_mean"] = sum(rewards) / len(rewards) if rewards else None
        if probs is not None and len(gold):
            best = [labels[max(range(len(labels)), key=row.__getitem__)] for row in probs]
            out["prob_accuracy"] = sum(b == g for b, g in zip(best, gold)) / len(gold)
        return out

    def example_scores(self, examples: Sequence[Example], completions: Sequence[str], **extra: Any) -> list[dict]:
        """Per example: predicted label (None when no label word), correct, and the label probabilities."""
        labels = self.label_words(examples) or []
        probs = extra.get("label_probs")
        out = []
        for i, (ex, c) in enumerate(zip(examples, completions)):
            pred = label_from_completion(c, labels)
            row: dict[str, Any] = {"predicted": pred, "correct": pred == ex.fields["label"]}
            if probs is not None:
                row["label_probs"] = {lab: round(float(p), 6) for lab, p in zip(labels, probs[i])}
            out.append(row)
        return out


def _raw(value: Any) -> str:
    return str(value).strip()


def _is_int(key: str) -> bool:
    return key.lstrip("-").isdigit()


def _words(names: dict | list | None) -> list[str] | None:
    return list(names.values()) if isinstance(names, dict) else names


def _check_words(words: Sequence[str]) -> None:
    lowered = [w.strip().lower() for w in words]
    if any(not w for w in lowered) or len(set(lowered)) != len(lowered):
        raise ConfigError(f"label words must be non-empty and distinct ignoring case, got {list(words)}")

