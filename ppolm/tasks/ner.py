"""Named-entity recognition as generation: the model lists the entities as ``TYPE: entity; TYPE: entity``.

Data: CoNLL files (token first column, tag last column, IOB1 or IOB2: IOB1 is converted), or JSONL/parquet
rows with ``tokens`` and ``tags`` lists (integer tags named by the ``tag_names`` option, as Hugging Face
datasets store them). The reference completion lists the gold entities in sentence order
(``PER: Ada Lovelace; LOC: London``) or says ``none``. Reward: sentence entity F1 of the parsed completion
(``ner_reward``); metrics: entity precision/recall/F1 micro and per type, matched as (type, normalized text)
multisets per sentence, since a generated answer has no token positions.

Type names: the dataset's own (``PER``/``LOC``/``ORG``/``MISC`` for CoNLL-2003, ``person``/``location``/...
for WNUT-17); a completion may use long forms ("Person:", "organisation:") through the type map that fits
the data (``types: auto``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from ppolm.data.readers import iob1_to_iob2, read_records
from ppolm.errors import DataError
from ppolm.eval.ner_metrics import (
    CONLL_TYPE_MAP,
    WNUT17_TYPE_MAP,
    entity_prf,
    parse_entities,
    tags_to_entities,
)
from ppolm.rewards.task_rewards import ner_reward
from ppolm.tasks.base import Decoding, Example, RewardFn, Task, TaskOptions
from ppolm.tasks.demo_data import demo_path

DEFAULT_INSTRUCTION = (
    "List the named entities in the text. Write each as TYPE: entity, separate them with semicolons, "
    "and use only these types: {types}. If there are none, write none.\n\nText: {text}"
)
_STRUCTURED = (".jsonl", ".json", ".parquet")


def format_entities(entities: Sequence[tuple[str, str]]) -> str:
    """The reference answer: ``"PER: Ada Lovelace; LOC: London"``, or ``"none"`` for no entities."""
    return "; ".join(f"{etype}: {text}" for etype, text in entities) if entities else "none"


class NEROptions(TaskOptions):
    types: Literal["auto", "conll", "wnut17"] | dict[str, str] = "auto"
    """How answer type names map to dataset types: 'conll' (PER/LOC/ORG/MISC and long forms), 'wnut17', a
    dict {name: type}, or 'auto' (the map whose types cover the data). The data's own names always work."""
    tag_names: list[str] | None = None
    """Names of integer tags (index -> tag such as B-PER) for JSONL/parquet rows that store numbers."""
    instruction: str = DEFAULT_INSTRUCTION
    """Prompt template with {types} (the entity types of the data) and {text} (the tokens joined by spaces)."""


class NERTask(Task):
    name = "ner"
    primary_metric = "f1"
    Options = NEROptions
    decoding = Decoding(max_new_tokens=64, temperature=0.0)

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.entity_types: list[str] = []
        self.type_map: dict[str, str] = self._type_map([])

    def load(self, path: str | None) -> list[Example]:
        """Examples with reference = the formatted gold entities and fields entities ([[type, text], ...])."""
        path = Path(path) if path is not None else demo_path("ner")
        structured = path.is_dir() or path.suffix.lower() in _STRUCTURED
        records = read_records(path, format=None if structured else "conll", required=["tokens", "tags"],
                               field_types={"tokens": list, "tags": list})
        sentences = []
        for rec in records:
            tokens, tags = [str(t) for t in rec["tokens"]], self._tags(rec)
            if len(tokens) != len(tags):
                raise DataError(rec.source, rec.line, "tags", f"{len(tags)} tags for {len(tokens)} tokens")
            try:
                entities = tags_to_entities(tokens, iob1_to_iob2(tags))
            except ValueError as exc:
                raise DataError(rec.source, rec.line, "tags", str(exc)) from None
            sentences.append((rec, tokens, entities))
        self.entity_types = sorted({etype for _, _, ents in sentences for etype, _ in ents})
        self.type_map = self._type_map(self.entity_types)
        return [
            Example(prompt=self.format_prompt(" ".join(tokens)), reference=format_entities(entities),
                    fields={"entities": [list(e) for e in entities]}, source=rec.source, line=rec.line)
            for rec, tokens, entities in sentences
        ]

    def _tags(self, rec) -> list[str]:
        tags = rec["tags"]
        if all(isinstance(t, str) for t in tags):
            return list(tags)
        names = self.options.tag_names
        if names is None or not all(isinstance(t, int) and 0 <= t < len(names) for t in tags):
            bad = next((t for t in tags if not isinstance(t, str)), None)
            raise DataError(rec.source, rec.line, "tags",
                            f"tag {bad!r} is not a string; name integer tags with task.options.tag_names"
                            if names is None else f"tag {bad!r} is not an index into tag_names ({len(names)} names)")
        return [names[t] for t in tags]

    def _type_map(self, types: list[str]) -> dict[str, str]:
        """Answer type name -> dataset type: the chosen base map plus every data type mapped to itself."""
        opt = self.options.types
        if isinstance(opt, dict):
            base = dict(opt)
        elif opt == "wnut17" or (opt == "auto" and types and set(types) <= set(WNUT17_TYPE_MAP.values())):
            base = dict(WNUT17_TYPE_MAP)
        elif opt == "conll" or (opt == "auto" and (not types or set(types) <= set(CONLL_TYPE_MAP.values()))):
            base = dict(CONLL_TYPE_MAP)
        else:
            base = {}
        # Keep only entries that point at a type of the data (when known), then make each type name itself.
        if types:
            base = {k: v for k, v in base.items() if v in types}
        return {**base, **{t: t for t in types}}

    def format_prompt(self, text: str) -> str:
        """The user message for a sentence ``text`` (types: those of the loaded data, else PER, LOC, ORG)."""
        types = ", ".join(self.entity_types or ["PER", "LOC", "ORG"])
        return self.options.instruction.replace("{types}", types).replace("{text}", text)

    def reward_functions(self) -> list[tuple[RewardFn, float]]:
        type_map = self.type_map

        def reward(prompts, completions, **fields):
            return ner_reward(prompts, completions, type_map=type_map, **fields)

        return [(reward, 1.0)]

    def _parsed(self, completions: Sequence[str]) -> list[list[tuple[str, str]]]:
        return [parse_entities(c, self.type_map) for c in completions]

    def metrics(self, examples: Sequence[Example], completions: Sequence[str], **extra: Any) -> dict[str, Any]:
        """Entity precision, recall, f1 (micro), f1_macro, per_type; reward_mean = mean sentence F1;
        none_rate = fraction of completions with no parsed entity."""
        gold = [[tuple(e) for e in ex.fields["entities"]] for ex in examples]
        pred = self._parsed(completions)
        out = entity_prf(gold, pred)
        rewards = self.reward_functions()[0][0]([ex.prompt for ex in examples], list(completions),
                                                entities=[ex.fields["entities"] for ex in examples])
        out["n"] = len(examples)
        out["reward_mean"] = sum(rewards) / len(rewards) if rewards else None
        out["none_rate"] = sum(not p for p in pred) / len(pred) if pred else None
        return out

    def example_scores(self, examples: Sequence[Example], completions: Sequence[str], **extra: Any) -> list[dict]:
        """Per example: the parsed entities and the sentence entity F1."""
        rewards = self.reward_functions()[0][0]([ex.prompt for ex in examples], list(completions),
                                                entities=[ex.fields["entities"] for ex in examples])
        return [{"entities": [list(e) for e in pred], "entity_f1": r}
                for pred, r in zip(self._parsed(completions), rewards)]
