"""A process's share of a step in forward passes of at most data.batch_tokens tokens (data/groups.py)."""

from __future__ import annotations

import random

from chatlora.data.collate import PackCollator
from chatlora.data.groups import fill, passes


def loads(groups: list[list[int]], lengths: list[int]) -> list[int]:
    return [sum(lengths[i] for i in g) for g in groups]


def test_a_step_within_the_budget_is_one_pass_in_order():
    assert passes([5, 3, 9], None) == [[0, 1, 2]]
    assert passes([5, 3, 9], 17) == [[0, 1, 2]]


def test_passes_are_evened_out_instead_of_leaving_a_small_last_one():
    rng = random.Random(0)
    lengths = [rng.randint(20, 120) for _ in range(128)]
    budget = sum(lengths) - 200  # filled in order: one full pass and one of about 200 tokens
    assert len(fill(lengths, budget)) == 2 and min(loads(fill(lengths, budget), lengths)) < 400
    groups = passes(lengths, budget)
    assert len(groups) == 2
    assert max(loads(groups, lengths)) <= budget
    assert abs(loads(groups, lengths)[0] - loads(groups, lengths)[1]) <= max(lengths)
    assert sorted(i for g in groups for i in g) == list(range(128))
    assert all(g == sorted(g) for g in groups)  # each pass keeps the samples' order


def test_never_more_passes_than_filling_in_order_and_never_over_the_budget():
    rng = random.Random(1)
    for _ in range(300):
        lengths = [rng.randint(1, 400) for _ in range(rng.randint(1, 64))]
        budget = rng.randint(400, 3000)
        groups = passes(lengths, budget)
        assert len(groups) <= len(fill(lengths, budget))
        assert max(loads(groups, lengths)) <= budget
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))


def test_a_sample_longer_than_the_budget_gets_a_pass_of_its_own():
    assert passes([3, 50, 4], 10) == [[0], [1], [2]]


def test_the_collator_packs_the_evened_out_passes():
    features = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (6, 2, 5, 3, 4)]
    batch = PackCollator(max_tokens=12)(features)
    rows = [r["input_ids"].shape[1] for r in batch["chunks"]]
    assert sorted(rows) == [9, 11]  # filled in order: 8 and 12; evened out (longest first onto the lighter): 11 and 9
    assert batch["input_ids"].shape[1] == 20 and batch["labels"].shape[1] == 20
