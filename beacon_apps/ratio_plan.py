"""Question-aware compression: condense the windows that matter to the question the least.

A beacon model normally condenses every window of a document at one ratio R, chosen so the
whole document fits the model's reach (or a memory budget). When the question is known before
the document is read, that is wasteful: the answer usually sits in a few windows, and the rest
could be condensed much harder. This module decides a per-window ratio schedule with the same
budget as uniform R (never more beacon entries in all, so the positional reach and the memory
budget that R satisfied still hold):

1. cut the prompt into the windows the memory will condense (`window_spans`, the memory's own
   boundaries: window k starts at token k * stride and holds `window` tokens; a last partial
   window is never condensed, so it gets no entry);
2. score each window's text against the question with BM25 (`bm25_scores`), a lexical score that
   needs no model and favours rare question words (a pass key's "pass key", a name, a number);
3. start every window at the hardest allowed ratio and spend the saved entries on the relevant
   windows first, best first, each at the lowest ratio the remaining budget allows; spread what
   is left evenly over the other windows (`plan_ratios`).

`question_plan` does all three for token ids; `BeaconMemory.set_ratio_schedule` applies the result
(window k uses schedule[k]).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .beacon.config import BeaconConfig

__all__ = [
    "allowed_ratios",
    "beacon_entries",
    "bm25_scores",
    "plan_ratios",
    "question_plan",
    "question_schedule",
    "tokenize",
    "window_spans",
]

# Letters and digits only: code punctuation and markup carry no meaning for matching words.
_WORD = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased runs of letters/digits (`"The pass-key: 123"` -> `the pass key 123`)."""
    return _WORD.findall(text.lower())


def bm25_scores(
    documents: Sequence[str], query: str, *, k1: float = 1.2, b: float = 0.75
) -> list[float]:
    """Okapi BM25 score of every document (here: window text) for `query`.

    Each distinct query word counts once; its idf is `log(1 + (N - n + 0.5) / (n + 0.5))`
    (never negative, so a word found in most windows adds little but never penalises).
    Windows are scored against each other only, so the idf sees exactly how rare a question
    word is inside this document, which is what decides where its answer is.
    """
    tokenized = [tokenize(d) for d in documents]
    count = len(tokenized)
    if count == 0:
        return []
    terms = list(dict.fromkeys(tokenize(query)))
    lengths = [len(t) for t in tokenized]
    average = sum(lengths) / count or 1.0
    frequencies = [Counter(t) for t in tokenized]
    idf = {}
    for term in terms:
        having = sum(1 for f in frequencies if term in f)
        idf[term] = math.log(1 + (count - having + 0.5) / (having + 0.5))
    scores = []
    for frequency, length in zip(frequencies, lengths, strict=True):
        norm = k1 * (1 - b + b * length / average)
        score = 0.0
        for term in terms:
            tf = frequency.get(term, 0)
            if tf:
                score += idf[term] * tf * (k1 + 1) / (tf + norm)
        scores.append(score)
    return scores


def window_spans(num_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """`[start, end)` of every window the memory condenses when reading `num_tokens` tokens.

    The memory reads from token 0 in windows of `window` tokens starting every `stride` tokens
    and condenses a window once it is full; the last partial window stays raw, so it is left
    out (a schedule entry for it would be spent on nothing, or, in interleave mode, on the open
    window that decoding fills).
    """
    if window < 1 or stride < 1 or stride > window:
        raise ValueError(f"window/stride: need 1 <= stride <= window (got {window}, {stride})")
    return [(start, start + window) for start in range(0, num_tokens - window + 1, stride)]


def allowed_ratios(stride: int, lowest: int = 1, highest: int | None = None) -> list[int]:
    """The positive ratios a window can use: divisors of `stride` in `[lowest, highest]`.

    A ratio must divide the stride (every window then holds `stride // r` whole beacons); the
    hardest, `stride` itself, keeps one beacon per window.
    """
    highest = stride if highest is None else highest
    return [r for r in range(max(lowest, 1), min(highest, stride) + 1) if stride % r == 0]


def beacon_entries(ratios: Sequence[int], stride: int) -> int:
    """Condensed entries per layer the windows leave behind (ratio 0 keeps the stride raw)."""
    return sum(stride // r if r > 0 else stride for r in ratios)


def plan_ratios(
    scores: Sequence[float],
    ratios: Sequence[int],
    overall: int,
    stride: int,
    *,
    relevance: float = 0.5,
) -> list[int]:
    """One ratio per window: the best windows condensed least, never more entries than uniform.

    `scores[k]` rates window k; `ratios` are the allowed ratios (positive divisors of `stride`;
    others are ignored); `overall` is the uniform ratio whose entry count,
    `len(scores) * (stride // overall)`, must not be exceeded. Every window starts at the
    hardest allowed ratio. Then the relevant windows (score >= `relevance` x the best score,
    and above 0), best first (ties: earlier window first), each take the lowest allowed ratio
    whose extra entries still fit what is left. What is left after them is spread evenly over
    the other windows (the lowest ratio all of them can take; the remainder takes some of
    them, best first, one allowed ratio lower). Spreading the rest, instead of handing it out
    by tiny score differences (a window mentioning "the" once), keeps the background readable
    and its ratios near the trained ones. `relevance=0` makes every window relevant (pure
    best-first). Deterministic.
    If no allowed ratio is harder than `overall` there is nothing to move, and the plan is
    uniform (so is it for `overall == 0`, which keeps everything raw).
    """
    count = len(scores)
    if overall < 0 or (overall > 0 and stride % overall):
        raise ValueError(f"overall: {overall} must be 0 or divide the stride ({stride})")
    allowed = sorted({r for r in ratios if r > 0 and stride % r == 0})
    if overall == 0 or not allowed or allowed[-1] <= overall:
        return [overall] * count
    plan = [allowed[-1]] * count
    spare = count * (stride // overall) - beacon_entries(plan, stride)
    order = sorted(range(count), key=lambda k: (-scores[k], k))
    best = max(scores, default=0.0)
    relevant = [k for k in order if scores[k] > 0 and scores[k] >= relevance * best]
    rest = [k for k in order if not (scores[k] > 0 and scores[k] >= relevance * best)]

    def lower(windows: list[int], spare: int) -> int:
        """Best first: each window down to the lowest ratio the spare entries pay for."""
        for index in windows:
            for ratio in allowed:  # lowest first
                extra = stride // ratio - stride // plan[index]
                if ratio < plan[index] and extra <= spare:
                    plan[index] = ratio
                    spare -= extra
                    break
        return spare

    spare = lower(relevant, spare)
    for level, ratio in enumerate(allowed):  # the lowest ratio every other window can take
        extra = stride // ratio - stride // allowed[-1]
        if rest and extra * len(rest) <= spare:
            for index in rest:
                plan[index] = ratio
            spare -= extra * len(rest)
            if level:  # the remainder: one level lower for as many as it pays for, best first
                step = stride // allowed[level - 1] - stride // ratio
                for index in rest[: spare // step]:
                    plan[index] = allowed[level - 1]
            break
    return plan


def question_plan(
    ids: Sequence[int],
    question: str,
    decode: Callable[[list[int]], str],
    *,
    window: int,
    stride: int,
    overall: int,
    ratios: Sequence[int],
    text_end: int | None = None,
) -> tuple[list[int], list[float]]:
    """(ratio per condensed window, BM25 score per window) for the prompt `ids`.

    `decode` turns token ids into text (the tokenizer's `decode`). Only tokens before
    `text_end` are scored (the document; by default all): windows that hold the question
    itself would otherwise match it best and take the budget meant for the document.
    """
    spans = window_spans(len(ids), window, stride)
    end = len(ids) if text_end is None else text_end
    texts = [
        decode(list(ids[start : min(stop, end)])) if start < end else "" for start, stop in spans
    ]
    scores = bm25_scores(texts, question)
    return plan_ratios(scores, ratios, overall, stride), scores


def question_schedule(
    config: BeaconConfig,
    ids: Sequence[int],
    question: str,
    decode: Callable[[list[int]], str],
    overall: int,
    *,
    text_end: int | None = None,
    lowest: int | None = None,
    highest: int | None = None,
) -> list[int]:
    """`question_plan` with a model's beacon settings: what the engine and evaluation use.

    Relevant windows go down to `lowest` (default: the smallest trained ratio, so the windows
    that matter are read the way the beacon was trained); the others up to `highest` (default:
    the stride, one beacon per window). Ratios above the trained ones are allowed for those on
    purpose: a window that does not matter loses little by being condensed harder than trained.
    """
    stride = config.beacon_stride
    if lowest is None:
        lowest = min((r for r in config.beacon_ratio if r > 0), default=1)
    schedule, _ = question_plan(
        ids,
        question,
        decode,
        window=config.beacon_window,
        stride=stride,
        overall=overall,
        ratios=allowed_ratios(stride, lowest, highest),
        text_end=text_end,
    )
    return schedule
