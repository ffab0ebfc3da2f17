"""Measures of generated replies: stop rate, length, repetition, and similarity to a reference.

Plain functions on plain values (token ids, strings, booleans), so each is tested on hand-made cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import mean


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of `a` and `b`.

    Bit-parallel (Allison & Dix 1986): one big-integer operation per item of `b` instead of a
    len(a) x len(b) table, so two 2,000-character replies take milliseconds, not seconds, in Python.
    """
    if not a or not b:
        return 0
    masks: dict = {}
    for i, item in enumerate(a):
        masks[item] = masks.get(item, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full  # bit i cleared <=> a[i] is matched in the LCS found so far
    for item in b:
        u = v & masks.get(item, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(candidate: Sequence, reference: Sequence) -> float:
    """ROUGE-L F1 of two sequences: 2PR / (P + R) with P = LCS/len(candidate), R = LCS/len(reference).
    1.0 for equal sequences, 0.0 when nothing is shared (or either is empty)."""
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def rouge_l_chars(candidate: str, reference: str) -> float:
    """Character-level ROUGE-L F1, whitespace ignored.

    Characters rather than words because Chinese (the tutorial's data) has no spaces between words;
    whitespace is dropped so that spacing and line breaks do not count as agreement.
    """
    strip = lambda s: [c for c in s if not c.isspace()]  # noqa: E731
    return rouge_l(strip(candidate), strip(reference))


def repetition(tokens: Sequence, n: int = 4) -> float:
    """Share of the n-grams of a sequence that repeat an earlier n-gram of the same sequence
    (seq-rep-n, Welleck et al. 2019): 0.0 when none repeats, close to 1.0 for a reply stuck in a loop.
    A sequence shorter than n has no n-grams and scores 0.0."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def stop_rate(stopped: Sequence[bool]) -> float:
    """Share of replies that ended on the end-of-turn token before the token limit (0.0 for none)."""
    return sum(map(bool, stopped)) / len(stopped) if stopped else 0.0


@dataclass
class ReplyStats:
    """Summary of a set of replies."""

    count: int
    stop_rate: float
    """Share of replies that ended on the end-of-turn token before the token limit."""
    mean_tokens: float
    """Mean reply length in tokens (the stop token not counted)."""
    repetition: float
    """Mean seq-rep-4 over the replies' tokens."""
    rouge_l: float | None = None
    """Mean character-level ROUGE-L F1 against the reference replies, when there are references."""

    def line(self) -> str:
        """A one-line summary for the console."""
        stopped = round(self.stop_rate * self.count)
        text = (f"stop rate {self.stop_rate:.0%} ({stopped}/{self.count}), mean length {self.mean_tokens:.1f} tokens, "
                f"repetition {self.repetition:.3f}")
        return text + (f", ROUGE-L {self.rouge_l:.3f}" if self.rouge_l is not None else "")


def reply_stats(token_ids: Sequence[Sequence[int]], stopped: Sequence[bool], texts: Sequence[str] = (),
                references: Sequence[str] = ()) -> ReplyStats:
    """Stop rate, mean length, repetition, and ROUGE-L when `references` (one per reply) are given."""
    if references and len(references) != len(texts):
        raise ValueError(f"{len(texts)} replies but {len(references)} references")
    return ReplyStats(
        count=len(stopped),
        stop_rate=stop_rate(stopped),
        mean_tokens=mean(len(t) for t in token_ids) if token_ids else 0.0,
        repetition=mean(repetition(t) for t in token_ids) if token_ids else 0.0,
        rouge_l=mean(rouge_l_chars(t, r) for t, r in zip(texts, references)) if references else None,
    )
