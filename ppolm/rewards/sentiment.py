"""An offline, lexicon-based sentiment scorer: the default reward of the generation task.

This is deliberately simple and documented as such: a hand-written list of English opinion words
(written for ppolm, not copied from a published lexicon), a negation window, and a bounded score. It
needs no model download, so sentiment-controlled generation (the classic "make review continuations
positive" PPO demo, Ziegler et al. 2019) runs anywhere. It is far weaker than a trained classifier:
it misses sarcasm, domain words and anything not in the lists; a reward-model directory (generation
task option ``reward_model``) replaces it. Its accuracy on the IMDB test subset is in docs/results.md.

Score of a text with P positive and N negative hits (after negation flips):

    score = (P - N) / (P + N + 1)        in (-1, 1); 0 for a text with no opinion word
    reward(target="positive") = (1 + score) / 2,   reward(target="negative") = (1 - score) / 2

A hit is flipped when one of the ``NEGATION_WINDOW`` words before it is a negator ("not", "never",
"n't"...) and no clause break (punctuation or "but") lies between them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ppolm.errors import ConfigError

POSITIVE = frozenset("""
good great excellent wonderful brilliant superb outstanding amazing fantastic terrific marvelous marvellous
beautiful beautifully lovely charming delightful enjoyable enjoyed enjoy enjoying fun funny hilarious witty
clever smart intelligent moving touching heartfelt heartwarming powerful gripping compelling engaging
entertaining exciting thrilling riveting captivating fascinating interesting impressive memorable
masterpiece masterful perfect perfectly best better finest favorite favourite love loved loves lovable
liked recommend recommended recommendable worth worthwhile pleasant pleased pleasure happy
glad joy joyful refreshing fresh original inventive creative stunning gorgeous elegant graceful subtle
rich strong solid satisfying satisfied fine nice cool awesome incredible remarkable exceptional
splendid magnificent sublime classic gem treat tender sweet warm genuine authentic honest believable
convincing natural polished sharp tight brave bold hopeful inspiring inspired uplifting admire admired
praise praised wonderfully nicely superbly excellently greatly success successful win won winner
top highlight highlights beauty laugh laughed laughing smile smiling smiled thoughtful intense
""".split())

NEGATIVE = frozenset("""
bad worse worst awful terrible horrible horrid dreadful poor poorly weak lame dull boring bored bore
tedious tiresome slow sluggish predictable clumsy clunky messy mess sloppy lazy cheap stupid dumb silly
ridiculous absurd pointless senseless meaningless shallow flat lifeless bland forgettable mediocre
disappointing disappointed disappointment disaster waste wasted wasting annoying annoyed irritating
painful pain unpleasant ugly hate hated hates dislike disliked fail failed fails failure flawed flaw
flaws mistake problem problems confusing confused incoherent unwatchable unbearable unfunny overrated
overlong pretentious cliche cliched clichéd trite stale wooden awkward forced fake unconvincing
unbelievable implausible nonsense garbage trash junk rubbish crap sucks sucked horrendous atrocious
abysmal pathetic miserable sad sadly unfortunately regret avoid skip worthless useless inept
incompetent amateurish embarrassing offensive disgusting gross nasty cruel insulting irrelevant
laughable plodding dragged drags empty hollow lacking lacks lack missing worn tired tiring
""".split())

NEGATORS = frozenset(
    "not no never nothing nobody none neither nor cannot cant dont doesnt didnt isnt wasnt arent werent "
    "wont wouldnt shouldnt couldnt hardly barely without n't".split()
)
NEGATION_WINDOW = 3
# Words, contractions kept whole ("didn't"), and clause breaks that stop a negation from reaching further.
_TOKEN = re.compile(r"[a-zé]+(?:'[a-z]+)?|[.,;:!?]")
_BREAKS = frozenset(".,;:!?") | {"but", "however", "although", "though"}


def _polarities(text: str) -> list[int]:
    """+1 / -1 per opinion word of ``text`` in order, after negation flips."""
    tokens = _TOKEN.findall(text.lower())
    out: list[int] = []
    for i, tok in enumerate(tokens):
        polarity = 1 if tok in POSITIVE else -1 if tok in NEGATIVE else 0
        if not polarity:
            continue
        for prev in reversed(tokens[max(0, i - NEGATION_WINDOW):i]):
            if prev in _BREAKS:
                break
            if prev in NEGATORS or prev.endswith("n't"):
                polarity = -polarity
                break
        out.append(polarity)
    return out


def sentiment_score(text: str) -> float:
    """(P - N) / (P + N + 1) in (-1, 1): > 0 leans positive, 0 = no opinion word (or balanced)."""
    hits = _polarities(text)
    pos = sum(1 for h in hits if h > 0)
    neg = len(hits) - pos
    return (pos - neg) / (pos + neg + 1)


def sentiment_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    target: str = "positive",
    **_unused: Any,
) -> list[float]:
    """Reward in (0, 1) for completions that lean towards ``target`` ("positive" or "negative").

    r_i = (1 + s_i) / 2 for target positive, (1 - s_i) / 2 for negative, s_i = sentiment_score(c_i);
    a completion without opinion words gets 0.5.
    """
    if target not in ("positive", "negative"):
        raise ConfigError(f"sentiment target must be 'positive' or 'negative', got {target!r}")
    sign = 1.0 if target == "positive" else -1.0
    return [(1.0 + sign * sentiment_score(c)) / 2.0 for c in completions]
