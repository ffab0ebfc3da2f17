"""Several training sources → one epoch's conversations: duplicates across sources dropped, then each
source drawn to its `weight` or `samples` with the seed, and what happened counted per source.

Neither `datasets.interleave_datasets` nor `concatenate_datasets` does this: interleaving draws by
probability until a source runs out (so shares are met only in expectation and the epoch's size is not
known ahead, which the plan and exact resume need), and neither drops duplicates across sources. Here
the counts are exact (largest remainder), and the draw is a pure function of the rows and the seed,
so the same config gives the same mix, and a resume the same samples.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from chatlora.config.sources import SourceConfig
from chatlora.data.formats import Conversation


@dataclass
class SourceCount:
    """What one source gave: rows read, duplicates of an earlier source's dropped, rows held out for
    validation, and the samples it contributes to each epoch after mixing."""

    name: str
    rows: int
    duplicates: int = 0
    held_out: int = 0
    samples: int = 0


def dedup(groups: list[tuple[SourceConfig, list[Conversation]]]) -> tuple[list[tuple[SourceConfig, list[Conversation]]], list[int]]:
    """Each source without the conversations an earlier source already holds (identical messages,
    system prompt included). Repeats inside one source are kept: those are the user's own choice."""
    seen: set[str] = set()
    out, dropped = [], []
    for source, conversations in groups:
        mine: set[str] = set()
        kept = []
        for conv in conversations:
            key = json.dumps(conv.messages, ensure_ascii=False, sort_keys=True)
            if key not in seen:
                kept.append(conv)
                mine.add(key)
        seen |= mine
        dropped.append(len(conversations) - len(kept))
        out.append((source, kept))
    return out, dropped


def targets(sizes: list[int], sources: list[SourceConfig]) -> list[int]:
    """Samples per source for one epoch. `samples` is taken as is; a source without weight or samples
    gives its rows; weights are shares of the whole (summing below 1) when some source has none, and
    relative shares of the weighted sources' rows when all have one (config/sources.py says which)."""
    fixed = [s.samples if s.samples is not None else n if s.weight is None else None for s, n in zip(sources, sizes)]
    weighted = [i for i, f in enumerate(fixed) if f is None]
    if not weighted:
        return [int(f) for f in fixed]
    weights = [sources[i].weight for i in weighted]
    if len(weighted) == len(sources):
        total = sum(sizes)
    else:  # the others' samples are the share 1 - sum(weights) of the whole epoch
        rest = sum(f for f in fixed if f is not None)
        total = round(rest / (1 - sum(weights)) * sum(weights))
    shares = [w / sum(weights) for w in weights]
    counts = _largest_remainder(total, shares)
    out = list(fixed)
    for i, n in zip(weighted, counts):
        out[i] = n
    return [int(n) for n in out]


def _largest_remainder(total: int, shares: list[float]) -> list[int]:
    """Whole counts summing to `total`, each as near its share as whole numbers allow."""
    exact = [total * s for s in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(conversations: list[Conversation], k: int, rng: random.Random) -> list[Conversation]:
    """k samples of the conversations: whole copies while k exceeds them, then a seeded subset, kept
    in the file's order (the trainer shuffles each epoch; a file order keeps the report readable)."""
    n = len(conversations)
    if n == 0 or k == n:
        return list(conversations)
    picked = sorted(rng.sample(range(n), k % n))
    return list(conversations) * (k // n) + [conversations[i] for i in picked]


def mix(groups: list[tuple[SourceConfig, list[Conversation]]], seed: int) -> tuple[list[Conversation], list[int]]:
    """The epoch's conversations from each source's (deduplicated, not held-out) rows, and the number
    drawn from each. Each source draws from its own generator, seeded by `seed` and its position, so
    changing one source's count leaves the others' draws as they were."""
    sizes = [len(c) for _, c in groups]
    counts = targets(sizes, [s for s, _ in groups])
    out = []
    for i, ((_, conversations), k) in enumerate(zip(groups, counts)):
        out += draw(conversations, k, random.Random(f"{seed}:{i}"))
    return out, counts
