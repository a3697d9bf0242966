"""Machine translation as generation: the model answers with the translation only.

Data: line-aligned parallel files (pass the source file, e.g. ``val.en``; the target is its sibling with
another language suffix, ``val.de``, or the ``target`` option), a TSV of pairs (Tatoeba ``cmn.txt``:
English, Chinese, attribution, no header; or a header naming ``source``/``target``), or JSONL/CSV rows with
source and target fields. Language names for the prompt come from the options, else from the file names
(``.en``/``.de`` suffixes; a Tatoeba export named by the ISO 639-3 code of its second column, ``cmn.txt`` =
English -> Chinese). Reward: sentence chrF (default) or BLEU / 100; metrics: corpus BLEU, chrF and TER,
with sacrebleu's Chinese tokenizer when the target is Chinese.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from ppolm.data.readers import (
    EXTENSIONS,
    check_fields,
    detect_format,
    missing_reason,
    read_parallel,
    read_records,
)
from ppolm.errors import DataError
from ppolm.eval.mt_metrics import mt_metrics, sentence_bleu, sentence_chrf
from ppolm.rewards.task_rewards import translation_reward
from ppolm.tasks.base import Decoding, Example, RewardFn, Task, TaskOptions
from ppolm.tasks.demo_data import demo_path

LANGUAGES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
             "nl": "Dutch", "cs": "Czech", "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "ko": "Korean",
             "ar": "Arabic", "tr": "Turkish", "pl": "Polish", "sv": "Swedish", "fi": "Finnish", "uk": "Ukrainian"}
ISO3 = {"eng": "en", "deu": "de", "ger": "de", "fra": "fr", "fre": "fr", "spa": "es", "ita": "it", "por": "pt",
        "nld": "nl", "ces": "cs", "rus": "ru", "cmn": "zh", "zho": "zh", "chi": "zh", "jpn": "ja", "kor": "ko",
        "ara": "ar", "tur": "tr", "pol": "pl", "swe": "sv", "fin": "fi", "ukr": "uk"}
ALIASES = {"mandarin": "zh", "simplified chinese": "zh", "traditional chinese": "zh"}
DEFAULT_INSTRUCTION = "Translate this {src} text into {tgt}. Reply with the translation only.\n\n{text}"
_LANG_SUFFIX = re.compile(r"\.[a-z]{2,3}(?:[-_][a-z]{2,4})?")


def language(value: str) -> tuple[str, str | None]:
    """(display name, ISO 639-1 code or None) of a language name or code: 'de' -> ('German', 'de'),
    'cmn' -> ('Chinese', 'zh'), 'Mandarin' -> ('Mandarin', 'zh'), 'Klingon' -> ('Klingon', None)."""
    key = value.strip().lower().replace("_", "-")
    code = ISO3.get(key, key.split("-")[0] if key.split("-")[0] in LANGUAGES else None)
    if code is not None:
        return LANGUAGES[code], code
    by_name = {name.lower(): c for c, name in LANGUAGES.items()}
    if key in by_name:
        return LANGUAGES[by_name[key]], by_name[key]
    return value.strip(), ALIASES.get(key)


class TranslationOptions(TaskOptions):
    src_lang: str | None = None
    """Source language, a name or code (default: from the file names, else English)."""
    tgt_lang: str | None = None
    """Target language, a name or code (default: from the file names)."""
    target: str | None = None
    """Target-side file of a line-aligned pair (default: the source file's sibling, val.en -> val.de)."""
    source_field: str = "source"
    """Field (or TSV header column) of the source text in JSONL/CSV/TSV files."""
    target_field: str = "target"
    """Field (or TSV header column) of the reference translation."""
    metric: Literal["chrf", "chrf1", "bleu"] = "chrf"
    """Sentence metric used as the reward: chrF (beta 2, recall weighted: RL learns to pay for it with longer,
    repeating outputs), chrF with beta 1 (precision and recall alike) or BLEU (sparse for weak models)."""
    instruction: str = DEFAULT_INSTRUCTION
    """Prompt template with {src}, {tgt} (language names) and {text}."""


class TranslationTask(Task):
    name = "translation"
    primary_metric = "chrf"
    Options = TranslationOptions
    # A one-sentence translation never holds a newline: stop there, before any commentary after it.
    # 96 tokens: Multi30k targets run to ~60.
    decoding = Decoding(max_new_tokens=96, temperature=0.0, stop=("\n",))

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.src_name, self.src_code = language(self.options.src_lang or "English")
        self.tgt_name, self.tgt_code = language(self.options.tgt_lang) if self.options.tgt_lang else ("German", "de")

    def load(self, path: str | None) -> list[Example]:
        """Examples with reference = the target sentence; fields reference and source (the source sentence)."""
        path = Path(path) if path is not None else demo_path("translation")
        opt = self.options
        if opt.target is not None or _is_language_file(path):
            target = Path(opt.target) if opt.target is not None else _sibling(path)
            self._set_languages(path.suffix[1:], target.suffix[1:])
            pairs = [(r, r["source"], r["target"]) for r in read_parallel(path, target)]
        else:
            records = self._read_pairs(path)
            if path.stem.lower() in ISO3:  # manythings.org Tatoeba exports: <iso3>.txt holds English -> <iso3>
                self._set_languages("en", path.stem.lower())
            pairs = [(r, r[opt.source_field], r[opt.target_field]) for r in records]
        prompts = self.format_prompts([src for _, src, _ in pairs])
        return [
            Example(prompt=prompt, reference=tgt.strip(), fields={"reference": tgt.strip(), "source": src},
                    source=rec.source, line=rec.line)
            for (rec, src, tgt), prompt in zip(pairs, prompts)
        ]

    def _set_languages(self, src: str, tgt: str) -> None:
        # Explicit options win over what the file names say.
        if self.options.src_lang is None:
            self.src_name, self.src_code = language(src)
        if self.options.tgt_lang is None:
            self.tgt_name, self.tgt_code = language(tgt)

    def _read_pairs(self, path: Path):
        opt = self.options
        fmt = detect_format(path) if path.exists() else None
        if fmt == "tsv":
            first = _first_line(path).split("\t")
            header = {opt.source_field, opt.target_field} <= {c.strip() for c in first}
            if not header:  # positional: source, target, then anything (Tatoeba's attribution)
                cols = [opt.source_field, opt.target_field] + [f"col{i}" for i in range(3, len(first) + 1)]
                return check_fields(read_records(path, format="tsv", columns=cols, header=False),
                                    [opt.source_field, opt.target_field], {opt.source_field: str, opt.target_field: str})
        records = read_records(path)
        names = list(records[0].fields)
        for name in (opt.source_field, opt.target_field):
            if name not in names:
                raise DataError(path, records[0].line, name, missing_reason(name, names))
        return check_fields(records, [opt.source_field, opt.target_field], {opt.source_field: str, opt.target_field: str})

    def format_prompts(self, texts: Sequence[str]) -> list[str]:
        ins = self.options.instruction.replace("{src}", self.src_name).replace("{tgt}", self.tgt_name)
        return [ins.replace("{text}", t.strip()) for t in texts]

    def format_prompt(self, text: str) -> str:
        """The user message asking to translate ``text``."""
        return self.format_prompts([text])[0]

    def reward_functions(self) -> list[tuple[RewardFn, float]]:
        metric, code = self.options.metric, self.tgt_code

        def reward(prompts, completions, **fields):
            return translation_reward(prompts, completions, metric=metric, target_lang=code, **fields)

        return [(reward, 1.0)]

    def metrics(self, examples: Sequence[Example], completions: Sequence[str], **extra: Any) -> dict[str, Any]:
        """Corpus bleu, chrf, ter (sacrebleu, 0..100), bleu_brevity_penalty, bleu_tokenize; reward_mean = mean
        sentence chrF (or BLEU) / 100; empty_rate = fraction of empty completions."""
        hyps = [c.strip() for c in completions]
        refs = [ex.fields["reference"] for ex in examples]
        out = mt_metrics(hyps, refs, target_lang=self.tgt_code)
        rewards = self.reward_functions()[0][0]([ex.prompt for ex in examples], list(completions), reference=refs)
        out["reward_mean"] = sum(rewards) / len(rewards)
        out["empty_rate"] = sum(not h for h in hyps) / len(hyps)
        out["source_lang"], out["target_lang"] = self.src_code or self.src_name, self.tgt_code or self.tgt_name
        return out

    def example_scores(self, examples: Sequence[Example], completions: Sequence[str], **extra: Any) -> list[dict]:
        """Per example: sentence chrF and BLEU (0..100)."""
        return [{"chrf": sentence_chrf(c.strip(), ex.fields["reference"]),
                 "bleu": sentence_bleu(c.strip(), ex.fields["reference"], self.tgt_code)}
                for ex, c in zip(examples, completions)]


def _is_language_file(path: Path) -> bool:
    suffix = path.suffix.lower()
    return path.is_file() and suffix not in EXTENSIONS and bool(_LANG_SUFFIX.fullmatch(suffix))


def _sibling(path: Path) -> Path:
    found = sorted(p for p in path.parent.iterdir() if p != path and p.stem == path.stem and _is_language_file(p))
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(path, None, None, f"no target file: expected a sibling {path.stem}.<lang> next to it "
                        "(e.g. val.en + val.de), or set task.options.target")
    raise DataError(path, None, None, f"several possible target files ({', '.join(p.name for p in found)}); "
                    "set task.options.target")


def _first_line(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return head.decode("utf-8-sig", errors="replace").split("\n", 1)[0].rstrip("\r")
