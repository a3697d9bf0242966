"""Machine-translation metrics: BLEU, chrF and TER through sacrebleu, corpus- and sentence-level.

Corpus scores are what papers report (BLEU is *not* the mean of sentence BLEUs); the sentence-level
scores exist for per-example rewards. All scores are on sacrebleu's 0..100 scale (TER: lower is
better and may exceed 100). Tokenization: ``13a`` by default, ``zh`` for Chinese targets (BLEU only;
chrF works on characters, TER gets ``asian_support``).

This module is a leaf (no ppolm imports) so the translation reward can reuse it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF, TER

# Target languages whose BLEU needs a dedicated tokenizer available without extra packages
# (ja/ko would need MeCab, which is not a dependency).
_LANG_TOKENIZE = {"zh": "zh"}


def bleu_tokenize_for(target_lang: str | None) -> str:
    """sacrebleu BLEU tokenizer for a target language code: ``"zh"``/``"zh-CN"`` -> ``"zh"``, else ``"13a"``."""
    if not target_lang:
        return "13a"
    return _LANG_TOKENIZE.get(target_lang.lower().replace("_", "-").split("-")[0], "13a")


@functools.lru_cache(maxsize=8)
def _bleu(tokenize: str, sentence: bool) -> BLEU:
    # effective_order for sentences: without it a short hypothesis with no 4-gram match scores 0.
    return BLEU(tokenize=tokenize, effective_order=sentence)


@functools.lru_cache(maxsize=2)
def _chrf(beta: int = 2) -> CHRF:
    return CHRF(beta=beta)


@functools.lru_cache(maxsize=2)
def _ter(asian_support: bool) -> TER:
    return TER(asian_support=asian_support)


def mt_metrics(
    hyps: Sequence[str],
    refs: Sequence[str],
    target_lang: str | None = None,
    tokenize: str | None = None,
) -> dict:
    """Corpus BLEU, chrF and TER of (B,) hypotheses against (B,) single references.

    BLEU = BP * exp(sum_{n=1..4} 1/4 log p_n) with BP = min(1, exp(1 - r/c)) (Papineni et al. 2002);
    chrF = F_beta (beta=2) of character n-gram (n<=6) precision and recall (Popovic 2015);
    TER = edits / reference words (Snover et al. 2006).

    Args:
        target_lang: language code of the references; ``"zh"`` selects sacrebleu's Chinese tokenizer.
        tokenize: explicit sacrebleu BLEU tokenizer, overriding ``target_lang`` (e.g. ``"char"``).

    Returns:
        ``bleu``, ``chrf``, ``ter`` (0..100 floats), ``bleu_brevity_penalty``, ``bleu_tokenize``, ``n``.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("mt_metrics needs at least one hypothesis")
    tok = tokenize or bleu_tokenize_for(target_lang)
    refs_t = [list(refs)]  # sacrebleu takes a list of reference *streams*
    bleu = _bleu(tok, False).corpus_score(list(hyps), refs_t)
    return {
        "n": len(hyps),
        "bleu": float(bleu.score),
        "bleu_brevity_penalty": float(bleu.bp),
        "bleu_tokenize": tok,
        "chrf": float(_chrf().corpus_score(list(hyps), refs_t).score),
        "ter": float(_ter(tok == "zh").corpus_score(list(hyps), refs_t).score),
    }


def sentence_bleu(hyp: str, ref: str, target_lang: str | None = None) -> float:
    """Sentence BLEU with effective order (exp smoothing), clipped to 0..100."""
    score = _bleu(bleu_tokenize_for(target_lang), True).sentence_score(hyp, [ref]).score
    return min(100.0, max(0.0, float(score)))  # float error can give 100.00000000000004


def sentence_chrf(hyp: str, ref: str, beta: int = 2) -> float:
    """Sentence chrF (0..100), the smoother choice for per-example rewards. beta = 2 (chrF's standard) weighs
    character n-gram recall twice as much as precision; beta = 1 weighs them equally."""
    return min(100.0, max(0.0, float(_chrf(beta).sentence_score(hyp, [ref]).score)))
