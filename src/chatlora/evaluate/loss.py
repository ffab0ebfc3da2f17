"""The held-out loss: one definition, one function, for every number chatlora reports under that name
(training's evaluation and its `held-out loss: before -> after` line, `chatlora eval`, merge's parity).

It is the mean cross-entropy, in nats, over every trained token of the held-out samples: each reply's
tokens up to and including its end-of-turn token, masked and truncated as in training. Each token
counts once: the sum over all tokens of all samples, on all processes, divided by their number. So
it does not change with how the samples are batched, packed or padded, or over how many processes
they are split. Perplexity is its exponential.

Trainer's own evaluation averages the batches' mean losses instead, so a batch of short replies
weighs as much as one of long replies, and the number moves with the evaluation batch size.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from chatlora.data.truncate import fit
from chatlora.model.loss import trained_token_loss


@dataclass(frozen=True)
class HeldOutLoss:
    total: float
    """Sum over the trained tokens of -log p(token | the tokens before it), in nats."""
    tokens: int
    """Trained tokens counted."""

    @property
    def loss(self) -> float:
        """Mean cross-entropy per trained token; NaN when no token is trained."""
        return self.total / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        loss = self.loss
        return math.exp(loss) if loss < 700 else math.inf if loss == loss else math.nan  # exp overflows past ~709


def held_out_samples(conversations: list[list[dict]], renderer, max_length: int, overlong: str) -> list[dict]:
    """Conversations (lists of messages) as samples (input_ids, labels) tokenized, masked and fitted
    into max_length as training does (data/truncate.py). A reply alone too long is truncated when
    training truncated, else left out, as under overlong=drop (training refuses it under
    overlong=error, so such a run's own held-out data has none)."""
    policy = "truncate" if overlong == "truncate" else "drop"
    fitted = (fit(messages, renderer, max_length, policy, Counter()) for messages in conversations)
    return [{"input_ids": s.input_ids, "labels": s.labels} for samples in fitted for s, _cut in samples]


def held_out_batches(samples: Sequence[dict], collate: Callable[[list[dict]], dict], batch_size: int,
                     rank: int = 0, processes: int = 1) -> torch.utils.data.DataLoader:
    """This process's share of `samples` (each a dict with input_ids and labels), collated in batches
    of `batch_size`: samples rank, rank + processes, ... so each sample is on exactly one process.
    (Trainer's evaluation sharding repeats samples to give every process full batches.)"""
    from torch.utils.data import DataLoader

    return DataLoader(samples, batch_size=batch_size, sampler=range(rank, len(samples), processes), collate_fn=collate)


def _on(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _most(count: int, device) -> int:
    import torch.distributed as dist

    most = torch.tensor(count, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most)


@torch.no_grad()
def held_out_loss(model, batches: Iterable[dict], device=None, distributed: bool = False, lockstep: bool = False,
                  spare: dict | None = None) -> HeldOutLoss:
    """The held-out loss of `model`, in evaluation mode (no dropout), on `batches` (PadCollator or
    PackCollator batches, token-budget chunks included).

    `distributed`: the batches are this process's share of the samples (held_out_batches); the sums
    are added over all processes of torch.distributed's default group, and every process returns the
    whole set's loss. `lockstep`, for a model sharded with FSDP (each forward pass gathers weights
    from every process): every process makes as many forward passes as the one with the most,
    repeating its last batch, or `spare` when it has none, and counting nothing of the repeats;
    `batches` must then have a length.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)

    def run(batch: dict, counted: bool) -> None:
        nonlocal total, count
        parts = batch.get("chunks", [batch])
        for i in range(_most(len(parts), device) if lockstep else len(parts)):
            part_total, part_count = trained_token_loss(model, _on(parts[min(i, len(parts) - 1)], device))
            if counted and i < len(parts):
                total, count = total + part_total.double(), count + part_count

    # Under lockstep the number of batches is agreed on first: every process's collectives must come
    # in the same order, so none may ask "how many?" while another is still in a forward pass.
    extra = _most(len(batches), device) - len(batches) if lockstep else 0
    last = spare
    for batch in batches:
        run(batch, counted=True)
        last = batch
    for _ in range(extra):
        run(last, counted=False)
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(total)
        dist.all_reduce(count)
    model.train(was_training)
    return HeldOutLoss(float(total), int(count))
