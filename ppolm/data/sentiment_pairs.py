"""Preference pairs and prompts for the RLHF flow, built from real labelled sentences (the shipped CC BY
Sentiment Labelled Sentences: ``sentence<TAB>0/1`` per line, one file per domain).

Every sentence is cut into an opening (its first ``prompt_words`` words: the prompt) and the rest (a real
continuation). A pair puts a sentence's own continuation against the continuation of a random sentence of the
other label from the same domain and the same split, the positive one chosen:

    prompt   = instruction(opening of s)
    chosen   = rest of s      if s is positive, else rest of a positive sentence t of s's domain
    rejected = rest of a negative sentence t    if s is positive, else rest of s

Half the pairs therefore have the prompt's own (coherent) continuation as chosen and half as rejected, so
coherence with the opening carries no preference: only sentiment does. Nothing here is generated text.

Sentences (duplicates dropped) are split once, by seed, into train / validation / test: the test openings are the
held-out prompts every method is evaluated on; no stage ever trains on a test sentence (partners come from the
same split), and a held-out opening that also opens a training sentence is dropped.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ppolm.data.preferences import PreferencePair, write_preferences
from ppolm.data.readers import read_records
from ppolm.errors import DataError


@dataclass(frozen=True)
class Sentence:
    """One labelled sentence: text, label (1 positive, 0 negative), domain (its file's stem), where it was read."""

    text: str
    label: int
    domain: str
    source: str = ""
    line: int = 0


@dataclass(frozen=True)
class Prompt:
    """A prompt of the flow: the user message, the opening it was made from and the sentence it came from."""

    prompt: str
    opening: str
    rest: str
    label: int
    domain: str
    source: str = ""
    line: int = 0


@dataclass
class RLHFData:
    """The three disjoint splits: pairs (train, validation), and prompts (train, validation, test)."""

    train_pairs: list[PreferencePair]
    val_pairs: list[PreferencePair]
    train_prompts: list[Prompt]
    val_prompts: list[Prompt]
    test_prompts: list[Prompt]

    def write(self, out: str | Path) -> dict[str, Path]:
        """Write train_pairs.jsonl, val_pairs.jsonl and {train,val,test}_prompts.jsonl under `out`."""
        out = Path(out)
        paths = {"train_pairs": write_preferences(self.train_pairs, out / "train_pairs.jsonl"),
                 "val_pairs": write_preferences(self.val_pairs, out / "val_pairs.jsonl")}
        for name, prompts in (("train", self.train_prompts), ("val", self.val_prompts), ("test", self.test_prompts)):
            path = out / f"{name}_prompts.jsonl"
            with path.open("w", encoding="utf-8") as f:
                for p in prompts:
                    f.write(json.dumps({"prompt": p.prompt, "opening": p.opening, "reference": p.rest,
                                        "label": p.label, "domain": p.domain, "source": p.source, "line": p.line},
                                       ensure_ascii=False) + "\n")
            paths[f"{name}_prompts"] = path
        return paths


def read_labelled_sentences(paths: list[str | Path]) -> list[Sentence]:
    """Read ``sentence<TAB>label`` files (label 0 or 1); the domain of a sentence is its file's stem.
    A label other than 0/1 is a DataError naming file, line and field."""
    out = []
    for path in paths:
        domain = Path(path).stem.replace("_labelled", "")
        for rec in read_records(path, columns=["text", "label"], required=["text", "label"]):
            raw = str(rec["label"]).strip()
            if raw not in ("0", "1"):
                raise DataError(rec.source, rec.line, "label", f"expected 0 or 1, got {raw!r}")
            out.append(Sentence(" ".join(str(rec["text"]).split()), int(raw), domain, rec.source, rec.line))
    return out


def cut(text: str, prompt_words: int, min_rest_words: int) -> tuple[str, str] | None:
    """(opening, rest): the first prompt_words words and the others; None when the rest is shorter than
    min_rest_words words (no real continuation to prefer or to imitate)."""
    words = text.split()
    if len(words) < prompt_words + min_rest_words:
        return None
    return " ".join(words[:prompt_words]), " ".join(words[prompt_words:])


def split_sentences(sentences: list[Sentence], n_test: int, n_val: int, seed: int
                    ) -> tuple[list[Sentence], list[Sentence], list[Sentence]]:
    """(train, validation, test) after one seeded shuffle; each keeps the file order. Disjoint by construction."""
    if n_test + n_val >= len(sentences):
        raise ValueError(f"{n_test} test + {n_val} validation sentences leave none of {len(sentences)} to train on")
    order = list(range(len(sentences)))
    random.Random(seed * 7919 + 11).shuffle(order)
    test, val, train = order[:n_test], order[n_test: n_test + n_val], order[n_test + n_val:]
    return tuple([sentences[i] for i in sorted(part)] for part in (train, val, test))  # type: ignore[return-value]


def make_prompts(sentences: list[Sentence], instruction: str, prompt_words: int, min_rest_words: int) -> list[Prompt]:
    """A Prompt per sentence long enough to cut (see `cut`); instruction has {text} for the opening."""
    out = []
    for s in sentences:
        parts = cut(s.text, prompt_words, min_rest_words)
        if parts is not None:
            out.append(Prompt(instruction.replace("{text}", parts[0]), parts[0], parts[1], s.label, s.domain,
                              s.source, s.line))
    return out


def make_pairs(prompts: list[Prompt], seed: int) -> list[PreferencePair]:
    """A pair per prompt whose domain has a sentence of the other label: the positive continuation chosen (see
    the module docstring). Partners are drawn with a seeded generator from the same list, so the same split."""
    rng = random.Random(seed * 104729 + 5)
    pools: dict[tuple[str, int], list[Prompt]] = {}
    for p in prompts:
        pools.setdefault((p.domain, p.label), []).append(p)
    pairs = []
    for p in prompts:
        others = pools.get((p.domain, 1 - p.label))
        if not others:
            continue
        partner = others[rng.randrange(len(others))]
        chosen, rejected = (p.rest, partner.rest) if p.label == 1 else (partner.rest, p.rest)
        if chosen != rejected:
            pairs.append(PreferencePair(p.prompt, chosen, rejected, p.source, p.line))
    return pairs


def build_rlhf_data(paths: list[str | Path], *, instruction: str, prompt_words: int, min_rest_words: int,
                    n_test: int, n_val: int, seed: int) -> RLHFData:
    """Read, split by seed, cut into prompts and pair up: see the module docstring."""
    if "{text}" not in instruction:
        raise ValueError(f"instruction must contain {{text}}, got {instruction!r}")
    unique = list({s.text: s for s in reversed(read_labelled_sentences(paths))}.values())[::-1]  # first copy kept
    train, val, test = split_sentences(unique, n_test, n_val, seed)
    prompts = [make_prompts(part, instruction, prompt_words, min_rest_words) for part in (train, val, test)]
    # a common opening ("The food was") of two sentences in different splits would be a held-out prompt seen in
    # training: held-out prompts keep only openings no earlier split has
    seen = {p.opening for p in prompts[0]}
    for part in (1, 2):
        prompts[part] = [p for p in prompts[part] if p.opening not in seen]
        seen |= {p.opening for p in prompts[part]}
    train_pairs, val_pairs = make_pairs(prompts[0], seed), make_pairs(prompts[1], seed + 1)
    if not train_pairs or not prompts[2]:
        raise DataError(", ".join(map(str, paths)), None, None,
                        f"no pair or no test prompt: too few sentences of {prompt_words + min_rest_words}+ words")
    return RLHFData(train_pairs, val_pairs, *prompts)
