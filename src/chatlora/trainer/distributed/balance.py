"""Each optimizer step's samples split over the processes by tokens, not by count.

Why: under DDP every process waits at the gradient all-reduce for the one that finishes last, and a
process's time is about proportional to its tokens. accelerate's sharding gives each process the
same number of samples (process r takes the batches r, r + N, ... of one sampler), so with chat
samples of very different lengths one process draws more tokens than the others at every step, and
they all wait for it.

What changes is only which process takes which of the step's samples: the step still takes the
same samples_per_step samples, drawn by the same sampler (seed, epoch) as one process would draw
them, so the step's loss (the mean over all its trained tokens, whatever process holds them) and the
trained adapter do not change. With one process nothing here is used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial

from torch.utils.data import DataLoader, Sampler

from chatlora.data.groups import split


class BalancedSteps(Sampler[list[int]]):
    """A batch sampler that yields, for each optimizer step, this process's batches of that step.

    The step's samples are the next `samples_per_step` of `sampler`'s order: the samples one process
    would take for that step. They are split over the processes by `split` and this process's share
    comes in `micro_batches` batches (equal counts), or, with `uneven`, in one batch whose size may
    differ from the other processes' (for a collator that splits it into passes by a token budget).

    The last step of an epoch, when the samples do not fill it, is completed with samples from the
    start of the epoch (as accelerate does), so every process takes the same number of batches; with
    drop_last it is dropped.
    """

    def __init__(self, sampler: Sampler[int], lengths: Sequence[int], samples_per_step: int, processes: int, rank: int,
                 micro_batches: int = 1, uneven: bool = False, drop_last: bool = False):
        if samples_per_step % (processes * (1 if uneven else micro_batches)):
            raise ValueError(f"{samples_per_step} samples per step do not split into {processes} processes x {micro_batches} batches")
        if uneven and micro_batches != 1:
            raise ValueError("uneven shares come as one batch per step")
        self.sampler = sampler  # the name accelerate looks for: it swaps in its seeded sampler, as for one process
        self.lengths = lengths
        self.samples_per_step, self.processes, self.rank = samples_per_step, processes, rank
        self.micro_batches, self.uneven, self.drop_last = micro_batches, uneven, drop_last

    def steps(self) -> int:
        whole, rest = divmod(len(self.sampler), self.samples_per_step)
        return whole + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        return self.steps() * self.micro_batches

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        for step in range(self.steps()):
            indices = order[step * self.samples_per_step:(step + 1) * self.samples_per_step]
            while len(indices) < self.samples_per_step:  # the epoch's last step, completed from its start
                indices += order[:self.samples_per_step - len(indices)]
            mine = split(indices, self.lengths, self.processes, equal_counts=not self.uneven)[self.rank]
            size = len(mine) // self.micro_batches
            for b in range(self.micro_batches):
                yield mine[b * size:(b + 1) * size]


def train_dataloader(trainer, lengths: Sequence[int] | None, uneven: bool):
    """Trainer's training DataLoader on several processes, with each step's samples split by tokens:
    the same sampler, collator and loader settings as Trainer.get_train_dataloader, prepared by
    accelerate for device placement, seeding (its seeded sampler replaces ours as it would Trainer's)
    and resuming (skip_first_batches), but not re-sharded: BalancedSteps already yields only this
    process's batches. `lengths`: tokens of each sample of trainer.train_dataset (None: counted from
    its input_ids). Returns None where Trainer's own loader must stay: its sampler is not one of
    single indices (an iterable dataset; train_sampling_strategy=batch_rebalance, which balances by
    itself)."""
    from transformers.trainer_pt_utils import BatchRebalanceSampler
    from transformers.trainer_utils import seed_worker

    args, accelerator = trainer.args, trainer.accelerator
    sampler = trainer.train_sampler()
    if sampler is None or isinstance(sampler, BatchRebalanceSampler):
        return None
    if lengths is None:
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    if len(lengths) != len(trainer.train_dataset):
        raise ValueError(f"{len(lengths)} sample lengths for {len(trainer.train_dataset)} training samples")
    steps = BalancedSteps(sampler, lengths, trainer.micro_batch_size() * args.gradient_accumulation_steps * accelerator.num_processes,
                          accelerator.num_processes, accelerator.process_index, args.gradient_accumulation_steps, uneven,
                          args.dataloader_drop_last)
    loader = DataLoader(trainer.train_dataset, batch_sampler=steps, collate_fn=trainer.data_collator,
                        num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                        persistent_workers=args.dataloader_persistent_workers,
                        multiprocessing_context=args.dataloader_multiprocessing_context,
                        prefetch_factor=args.dataloader_prefetch_factor, in_order=args.dataloader_in_order,
                        worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index))
    return not_resharded(accelerator.prepare(loader), steps)


def not_resharded(loader, steps: BalancedSteps):
    """`loader` as accelerate prepared it, with all of `steps`' batches passed through.

    accelerate wraps every batch sampler in a BatchSamplerShard that would give this process only
    every N-th of its batches; told there is one process, it passes them all (Trainer does the same
    for its own rank-aware BatchRebalanceSampler). Raises RuntimeError if accelerate wrapped the
    batches otherwise."""
    shard = loader.batch_sampler
    if getattr(shard, "batch_sampler", None) is not steps:
        raise RuntimeError(f"accelerate prepared the training batches unexpectedly ({type(shard).__name__})")
    shard.num_processes, shard.process_index = 1, 0
    return loader
