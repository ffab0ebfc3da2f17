"""The token-balanced split of each optimizer step's samples over the processes (trainer/balance.py),
without processes: the partition itself, and the batches each rank's sampler yields."""

from __future__ import annotations

import random

import pytest

from chatlora.data.groups import split
from chatlora.trainer.balance import BalancedSteps


def totals(groups: list[list[int]], lengths: list[int]) -> list[int]:
    return [sum(lengths[i] for i in g) for g in groups]


@pytest.mark.parametrize("equal_counts", [False, True])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_split_is_a_partition_balanced_within_the_longest_sample(parts, equal_counts):
    rng = random.Random(parts)
    lengths = [rng.randint(30, 300) for _ in range(500)]  # huanhuan.json's range
    for trial in range(50):
        step = rng.sample(range(len(lengths)), parts * rng.randint(1, 16))
        groups = split(step, lengths, parts, equal_counts)
        assert len(groups) == parts and sorted(i for g in groups for i in g) == sorted(step), "every sample exactly once"
        loads = totals(groups, lengths)
        assert max(loads) - min(loads) <= max(lengths[i] for i in step)
        for g in groups:  # each group in the step's order
            assert g == sorted(g, key=step.index)
        if equal_counts:
            assert all(len(g) == len(step) // parts for g in groups)
        assert split(list(step), list(lengths), parts, equal_counts) == groups, "deterministic"


def test_split_evens_out_what_a_split_by_count_does_not():
    lengths = [300, 290, 280, 270, 40, 30, 35, 45]
    step = list(range(8))
    by_count = [step[:4], step[4:]]  # what each rank took by count: 1140 against 150 tokens
    assert totals(by_count, lengths) == [1140, 150]
    assert totals(split(step, lengths, 2, equal_counts=True), lengths) == [645, 645]
    free = split(step, lengths, 2)
    assert sorted(totals(free, lengths)) == [645, 645]


def test_split_with_free_counts_gives_few_long_or_many_short_samples():
    lengths = [600, 100, 100, 100, 100, 100, 100]
    groups = split(list(range(7)), lengths, 2)
    assert groups == [[0], [1, 2, 3, 4, 5, 6]]


def test_split_refuses_empty_or_uneven_groups():
    with pytest.raises(ValueError, match="cannot split 1 samples into 2"):
        split([0], [5], 2)
    with pytest.raises(ValueError, match="cannot split 3 samples into 2 equal"):
        split([0, 1, 2], [5, 5, 5], 2, equal_counts=True)


def ranks(order, lengths, samples_per_step, processes, micro_batches=1, uneven=False, drop_last=False) -> list[list[list[int]]]:
    """Every rank's batches of one epoch; `order` stands for the sampler every rank shares."""
    return [list(BalancedSteps(order, lengths, samples_per_step, processes, rank, micro_batches, uneven, drop_last))
            for rank in range(processes)]


@pytest.mark.parametrize("processes, micro_batches, uneven", [(2, 1, False), (2, 2, False), (4, 2, False), (2, 1, True), (4, 1, True)])
def test_each_step_takes_the_samples_one_process_would(processes, micro_batches, uneven):
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(64)]
    order = rng.sample(range(64), 64)
    samples_per_step = 16
    batches = ranks(order, lengths, samples_per_step, processes, micro_batches, uneven)
    assert len({len(b) for b in batches}) == 1, "every rank the same number of batches"
    assert len(batches[0]) == len(BalancedSteps(order, lengths, samples_per_step, processes, 0, micro_batches, uneven)) == 4 * micro_batches
    for step in range(4):
        mine = [[i for b in rank[step * micro_batches:(step + 1) * micro_batches] for i in b] for rank in batches]
        assert sorted(i for m in mine for i in m) == sorted(order[step * 16:(step + 1) * 16])
        loads = totals(mine, lengths)
        assert max(loads) - min(loads) <= max(lengths)
        if not uneven:
            assert all(len(b) == samples_per_step // processes // micro_batches for rank in batches for b in rank)


def test_the_last_step_of_an_epoch_is_completed_from_its_start_or_dropped():
    lengths, order = [10] * 10, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    batches = ranks(order, lengths, 4, 2)
    assert [len(b) for b in batches] == [3, 3]
    assert sorted(batches[0][2] + batches[1][2]) == sorted([1, 0, 9, 8]), "as accelerate completes it"
    dropped = ranks(order, lengths, 4, 2, drop_last=True)
    assert [len(b) for b in dropped] == [2, 2]
    tiny = ranks([1, 0], [10, 10], 4, 2)  # fewer samples than one step
    assert sorted(tiny[0][0] + tiny[1][0]) == [0, 0, 1, 1]


def test_shares_of_several_batches_cannot_be_uneven():
    with pytest.raises(ValueError, match="one batch per step"):
        BalancedSteps(list(range(8)), [1] * 8, 8, 2, 0, micro_batches=2, uneven=True)
    with pytest.raises(ValueError, match="do not split"):
        BalancedSteps(list(range(8)), [1] * 8, 6, 2, 0, micro_batches=2)


@pytest.mark.parametrize("micro_batches, uneven", [(1, False), (2, False), (1, True)])
def test_through_accelerate_each_rank_takes_its_part_of_the_one_process_steps(micro_batches, uneven):
    """accelerate's own preparation, for 2 ranks in this one process: its seeded sampler replaces
    ours exactly as for one process (same order, reshuffled per epoch), nothing is re-sharded, and
    skip_first_batches (resuming) skips whole steps of this rank's batches."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader, RandomSampler

    from chatlora.trainer.balance import not_resharded

    rng = random.Random(1)
    data, samples_per_step = list(range(24)), 8
    lengths = [rng.randint(5, 120) for _ in data]
    rows = lambda batch: batch  # noqa: E731  (the samples here are their own indices)
    seeded = dict(use_seedable_sampler=True, data_seed=7)
    one = prepare_data_loader(DataLoader(data, batch_size=samples_per_step, sampler=RandomSampler(data), collate_fn=rows),
                              num_processes=1, process_index=0, **seeded)
    loaders = []
    for rank in range(2):
        steps = BalancedSteps(RandomSampler(data), lengths, samples_per_step, 2, rank, micro_batches, uneven)
        loaders.append(not_resharded(prepare_data_loader(DataLoader(data, batch_sampler=steps, collate_fn=rows),
                                                         num_processes=2, process_index=rank, **seeded), steps))
    orders = []
    for epoch in range(2):
        for loader in (one, *loaders):
            loader.set_epoch(epoch)
        reference = list(one)
        orders.append([i for step in reference for i in step])
        batches = [list(loader) for loader in loaders]
        assert len(reference) == 3 and all(len(b) == 3 * micro_batches == len(loader) for b, loader in zip(batches, loaders))
        for k, step in enumerate(reference):
            mine = [[i for b in rank[k * micro_batches:(k + 1) * micro_batches] for i in b] for rank in batches]
            assert mine == split(step, lengths, 2, equal_counts=not uneven)
        resumed = skip_first_batches(loaders[1], micro_batches)  # as Trainer resumes after one step
        resumed.set_epoch(epoch)
        assert list(resumed) == batches[1][micro_batches:]
    assert orders[0] != orders[1], "reshuffled each epoch"
