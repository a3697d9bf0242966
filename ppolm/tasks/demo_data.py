"""Shipped demo data: small datasets written by ppolm itself, deterministically, from templates in code.

Each built-in task runs with no data file (``task.data: null``): the task then reads a file that
``demo_path`` writes once into ``<ppolm cache>/demo/`` (the same cache root as the models) and reads it
back through the ordinary readers, so the demo exercises the same code as user data and a user can open
the file to see the expected format. Everything here is templated text written for this project (no
third-party data): the sets are easy on purpose and only show that a pipeline works end to end.

| task | file | rows | format |
| --- | --- | --- | --- |
| classification | sentiment_reviews.jsonl | 400 | JSONL: text, label (negative/positive) |
| ner | entities.conll | 300 | CoNLL IOB2, PER/LOC/ORG (60 sentences without entities) |
| translation | phrases.en + phrases.de | 300 | line-aligned English -> German |
| generation | review_openings.jsonl | 300 | JSONL: text (a short review), label |
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

# Bump when a generator changes, so cached files from an older version are never read.
VERSION = 2
FILES = {
    "classification": "sentiment_reviews.jsonl",
    "ner": "entities.conll",
    "translation": "phrases.en",
    "generation": "review_openings.jsonl",
}

TITLES = ["The Silent Harbor", "Northern Lights", "A Year in Lisbon", "The Last Orchard", "Paper Moons",
          "Iron Valley", "The Glass Garden", "Midnight Ferry", "Saltwater Kings", "The Quiet Engineer"]
ASPECTS = ["acting", "script", "soundtrack", "story", "direction", "camera work", "dialogue", "ending",
           "cast", "pacing"]
ADJECTIVES = {
    "positive": ["wonderful", "brilliant", "moving", "delightful", "gripping", "charming", "superb",
                 "beautiful", "clever", "funny"],
    "negative": ["dull", "tedious", "clumsy", "awful", "boring", "predictable", "weak", "messy",
                 "lifeless", "painful"],
}
VERDICTS = {
    "positive": ["I would happily watch it again.", "Highly recommended.", "It left me smiling.",
                 "One of the best films I have seen this year.", "Worth every minute."],
    "negative": ["I would not recommend it.", "A waste of an evening.", "I nearly walked out.",
                 "Skip this one.", "Two hours I will not get back."],
}
WHEN = ["on Monday", "on Friday", "on Saturday", "on Sunday", "last weekend", "last night"]
COMPANY = ["my sister", "a friend", "my parents", "my kids", "a colleague", "my neighbour"]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def sentiment_reviews(n: int = 400, seed: int = 0) -> list[dict[str, str]]:
    """``n`` short templated movie reviews, half positive and half negative in shuffled order: {"text", "label"}.

    One template in three mentions a contrary aspect first ("Although the pacing was dull, ..."), so a
    keyword count of the first adjective is not enough to get every label right.
    """
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = ("positive", "negative")[len(rows) % 2]
        other = "negative" if label == "positive" else "positive"
        adj = rng.sample(ADJECTIVES[label], 3)
        asp = rng.sample(ASPECTS, 3)
        title, verdict = rng.choice(TITLES), rng.choice(VERDICTS[label])
        kind = rng.randrange(3)
        if kind == 0:
            text = (f"{title} is {_a(adj[0])} film. The {asp[0]} is {adj[1]} and the {asp[1]} is {adj[2]}. "
                    f"{verdict}")
        elif kind == 1:
            text = (f"I watched {title} {rng.choice(WHEN)}. The {asp[0]} felt {adj[0]}, and the {asp[1]} "
                    f"was {adj[1]}. {verdict}")
        else:
            text = (f"Although the {asp[0]} was {rng.choice(ADJECTIVES[other])}, the {asp[1]} of {title} was "
                    f"{adj[0]} and the {asp[2]} was {adj[1]}. {verdict}")
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    # Shuffled, not alternating: an evenly spaced subset (eval --limit) of an alternating list is one class.
    rng.shuffle(rows)
    return rows


def review_openings(n: int = 300, seed: int = 1) -> list[dict[str, str]]:
    """``n`` short reviews that open with who watched what and when: {"text", "label"}.

    The generation task prompts with the first words ("I went to see Paper Moons with my sister")
    and keeps the rest as the reference continuation.
    """
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = ("positive", "negative")[len(rows) % 2]
        adj = rng.sample(ADJECTIVES[label], 2)
        asp = rng.sample(ASPECTS, 2)
        text = (f"I went to see {rng.choice(TITLES)} with {rng.choice(COMPANY)} {rng.choice(WHEN)}, and "
                f"the {asp[0]} was {adj[0]}. The {asp[1]} was {adj[1]} too. {rng.choice(VERDICTS[label])}")
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


PEOPLE = ["Ada Lovelace", "Alan Turing", "Marie Curie", "Grace Hopper", "Nikola Tesla", "Rosalind Franklin",
          "Emmy Noether", "Niels Bohr", "Lise Meitner", "Hedy Lamarr", "Charles Babbage", "Mary Somerville"]
PLACES = ["London", "Paris", "Berlin", "Vienna", "Lisbon", "Oslo", "Cairo", "Lima", "Kyoto", "Toronto",
          "New York", "Buenos Aires"]
ORGS = ["Royal Society", "United Nations", "Red Cross", "Bank of England", "Siemens", "Oxford University",
        "World Health Organization", "European Space Agency", "Acme Corporation", "Nordic Rail"]
TOPICS = ["prime numbers", "radio waves", "steam engines", "crystal structures", "weather models"]
# Slots: {PER}, {PER2}, {LOC}, {LOC2}, {ORG}, {TOPIC}, {YEAR}.
NER_TEMPLATES = [
    "{PER} moved to {LOC} in {YEAR} .", "{PER} joined the {ORG} after leaving {LOC} .",
    "The {ORG} opened a new office in {LOC} .", "{PER} met {PER2} at a conference in {LOC} .",
    "{PER} gave a talk about {TOPIC} at the {ORG} .", "The {ORG} announced a new director on Monday .",
    "Flights from {LOC} to {LOC2} were cancelled because of fog .", "{PER} wrote to {PER2} from {LOC} .",
    "A spokesperson for the {ORG} said the talks in {LOC} went well .", "{PER} was born in {LOC} .",
]
NO_ENTITY = [
    "The weather was mild that morning .", "Prices rose again last week .", "The meeting ended early .",
    "Nobody expected the bridge to close .", "The train was twenty minutes late .",
    "Most shops stay open until eight .", "The committee will vote next month .",
    "It rained for three days in a row .", "The report was shorter than promised .",
    "Tickets sold out within an hour .", "The garden needs more water in summer .",
    "Sales of bicycles doubled this year .",
]


def ner_sentences(n: int = 300, seed: int = 2) -> list[tuple[list[str], list[str]]]:
    """``n`` templated sentences as (tokens, IOB2 tags) over PER, LOC and ORG; one in five has no entity."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        if len(out) % 5 == 4:
            template = rng.choice(NO_ENTITY) + (" " + rng.choice(NO_ENTITY) if rng.random() < 0.5 else "")
        else:
            template = rng.choice(NER_TEMPLATES)
        people, places = rng.sample(PEOPLE, 2), rng.sample(PLACES, 2)
        fill = {"{PER}": ("PER", people[0]), "{PER2}": ("PER", people[1]), "{LOC}": ("LOC", places[0]),
                "{LOC2}": ("LOC", places[1]), "{ORG}": ("ORG", rng.choice(ORGS)),
                "{TOPIC}": (None, rng.choice(TOPICS)), "{YEAR}": (None, str(rng.randint(1840, 1990)))}
        tokens, tags = [], []
        for word in template.split():
            etype, text = fill.get(word, (None, word))
            for k, tok in enumerate(text.split()):
                tokens.append(tok)
                tags.append("O" if etype is None else ("B-" if k == 0 else "I-") + etype)
        key = " ".join(tokens)
        if key not in seen:
            seen.add(key)
            out.append((tokens, tags))
    return out


# English noun -> (German noun, grammatical gender m/f/n). Articles and adjective endings follow the gender.
NOUNS = {"dog": ("Hund", "m"), "cat": ("Katze", "f"), "house": ("Haus", "n"), "car": ("Auto", "n"),
         "book": ("Buch", "n"), "table": ("Tisch", "m"), "lamp": ("Lampe", "f"), "chair": ("Stuhl", "m"),
         "door": ("Tür", "f"), "window": ("Fenster", "n"), "bird": ("Vogel", "m"), "flower": ("Blume", "f"),
         "apple": ("Apfel", "m"), "child": ("Kind", "n")}
ADJ_DE = {"red": "rot", "blue": "blau", "big": "groß", "small": "klein", "old": "alt", "new": "neu",
          "green": "grün", "beautiful": "schön"}
# place -> German dative phrase ("in the garden" -> "im Garten").
PLACES_DE = {"garden": "im Garten", "house": "im Haus", "kitchen": "in der Küche", "city": "in der Stadt",
             "park": "im Park"}
_NOM = {"m": "der", "f": "die", "n": "das"}
_ACC = {"m": "den", "f": "die", "n": "das"}
_INDEF_ACC = {"m": "einen", "f": "eine", "n": "ein"}
_MY = {"m": "Mein", "f": "Meine", "n": "Mein"}
_WEAK_ACC_ENDING = {"m": "en", "f": "e", "n": "e"}  # after den/die/das: den roten Hund, die rote Katze


def phrase_pairs(n: int = 300, seed: int = 3) -> list[tuple[str, str]]:
    """``n`` distinct short English -> German sentence pairs from six grammatical templates."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        en_noun = rng.choice(sorted(NOUNS))
        de_noun, g = NOUNS[en_noun]
        en_adj = rng.choice(sorted(ADJ_DE))
        de_adj = ADJ_DE[en_adj]
        place = rng.choice(sorted(PLACES_DE))
        kind = rng.randrange(6)
        if kind == 4 and place == en_noun:
            continue  # "The house is in the house."
        if kind == 0:
            pair = (f"The {en_noun} is {en_adj}.", f"{_NOM[g].capitalize()} {de_noun} ist {de_adj}.")
        elif kind == 1:
            pair = (f"I see the {en_adj} {en_noun}.", f"Ich sehe {_ACC[g]} {de_adj}{_WEAK_ACC_ENDING[g]} {de_noun}.")
        elif kind == 2:
            pair = (f"We have a {en_noun}.", f"Wir haben {_INDEF_ACC[g]} {de_noun}.")
        elif kind == 3:
            pair = (f"Where is the {en_noun}?", f"Wo ist {_NOM[g]} {de_noun}?")
        elif kind == 4:
            pair = (f"The {en_noun} is in the {place}.", f"{_NOM[g].capitalize()} {de_noun} ist {PLACES_DE[place]}.")
        else:
            pair = (f"My {en_noun} is {en_adj}.", f"{_MY[g]} {de_noun} ist {de_adj}.")
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def _write_atomic(path: Path, text: str) -> None:
    # Several processes (torchrun) may create the same demo file: write aside, then rename.
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def demo_dir() -> Path:
    """``<ppolm cache>/demo/v<VERSION>``: $PPOLM_CACHE, else $XDG_CACHE_HOME/ppolm, else ~/.cache/ppolm."""
    from ppolm.models.load import (
        cache_dir,  # deferred: keeps importing a task free of torch/transformers
    )

    return cache_dir() / "demo" / f"v{VERSION}"


def demo_path(task: str) -> Path:
    """The demo data file of ``task`` (written on first use); for translation, the English side."""
    if task not in FILES:
        raise ValueError(f"no demo data for task {task!r}; known: {', '.join(FILES)}")
    folder = demo_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILES[task]
    if task == "translation" and not (path.is_file() and path.with_suffix(".de").is_file()):
        pairs = phrase_pairs()
        _write_atomic(path.with_suffix(".de"), "".join(de + "\n" for _, de in pairs))
        _write_atomic(path, "".join(en + "\n" for en, _ in pairs))
    elif not path.is_file():
        if task == "ner":
            text = "\n".join("".join(f"{t}\t{g}\n" for t, g in zip(tokens, tags)) for tokens, tags in ner_sentences())
        else:
            rows = sentiment_reviews() if task == "classification" else review_openings()
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        _write_atomic(path, text)
    return path
