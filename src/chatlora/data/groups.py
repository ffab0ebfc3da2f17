"""Samples grouped by tokens: a step's samples over processes (trainer/balance.py), a process's share
over forward passes (PackCollator's token budget)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence


def split(indices: Sequence[int], lengths: Sequence[int], parts: int, equal_counts: bool = False) -> list[list[int]]:
    """`indices` (one step's samples) in `parts` groups whose token totals (`lengths[i]` per index)
    are as equal as a greedy split makes them: longest first, each onto the group with the fewest
    tokens so far (ties: the lower group). The token totals of any two groups then differ by at most
    the longest sample. Each group keeps its samples in their order in `indices`; the result depends
    on nothing but the arguments.

    equal_counts: every group takes len(indices) / parts samples (for steps that come in micro-batches
    of a fixed number of samples): the samples are dealt in rounds of `parts`, longest to the group
    with the fewest tokens; the same bound holds.

    Raises ValueError when there are fewer samples than groups (a group would be empty), or with
    equal_counts when they do not divide evenly.
    """
    if len(indices) < parts or (equal_counts and len(indices) % parts):
        raise ValueError(f"cannot split {len(indices)} samples into {parts} {'equal ' if equal_counts else ''}non-empty groups")
    longest_first = sorted(range(len(indices)), key=lambda k: (-lengths[indices[k]], k))
    groups: list[list[int]] = [[] for _ in range(parts)]
    if equal_counts:
        loads = [0] * parts
        for start in range(0, len(longest_first), parts):
            lightest = sorted(range(parts), key=lambda g: (loads[g], g))
            for g, k in zip(lightest, longest_first[start:start + parts]):
                groups[g].append(k)
                loads[g] += lengths[indices[k]]
    else:
        heap = [(0, g) for g in range(parts)]  # (tokens, group): the lightest group on top
        for k in longest_first:
            load, g = heapq.heappop(heap)
            groups[g].append(k)
            heapq.heappush(heap, (load + lengths[indices[k]], g))
    return [[indices[k] for k in sorted(group)] for group in groups]


def fill(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Positions in `lengths` in order, a new group whenever the next would take the group over
    `budget` tokens (a sample longer than the budget gets a group of its own)."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if groups[-1] and used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def passes(lengths: Sequence[int], budget: int | None) -> list[list[int]]:
    """Positions in `lengths` (one step's samples on one process) grouped into forward passes of at
    most `budget` tokens each: as few passes as filling them in order takes (or fewer), with their
    tokens evened out, each pass keeping its samples in order.

    Why evened out: filled in order, 128 chat samples of 8,466 tokens under a budget of 8,192 make a
    pass of 8,192 tokens and one of 274. Every pass costs the CPU the same launches of the whole
    model's kernels whatever its tokens (a fixed cost per pass: docs/benchmarks.md), and a pass of
    274 tokens gives the GPU almost no arithmetic to do meanwhile. Two passes of about
    4,233 tokens each do the same work with no such idle pass. The step's loss and gradients are sums over
    its tokens whatever pass holds them.
    """
    indices, total = list(range(len(lengths))), sum(lengths)
    if not budget or total <= budget:
        return [indices]
    ordered = fill(lengths, budget)
    for count in range(math.ceil(total / budget), len(ordered) + 1):
        groups = split(indices, lengths, count)
        if max(sum(lengths[i] for i in g) for g in groups) <= budget:
            return sorted(groups)  # the pass with the first sample first
    return ordered
