"""What the forward passes of a run will hold: the collators' own rules replayed on the data's sample
lengths, over the run's optimizer steps, in a random order as the Trainer's sampler draws them.

Peak memory follows the largest forward pass, and a step's time its number of passes, so both come
from here. The order is not the Trainer's exact order (that depends on the RNG state at the time),
so the largest pass is the largest of a run like this one: over a long run it settles; over a few
steps it is within the spread of what a real run meets.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from chatlora.data.groups import passes


@dataclass(frozen=True)
class Samples:
    """Token counts of the tokenized training samples."""

    lengths: list[int]
    trained: list[int]
    """Trained (labelled) tokens of each sample."""
    measured: bool = True
    """False when the data could not be read and every sample is assumed max_length long."""


@dataclass(frozen=True)
class Batching:
    """How the run batches its samples (from the config and TrainingArguments)."""

    samples_per_step: int
    """Samples per optimizer step on one device: its share of the global batch (distributed.samples_per_step,
    or per_device_train_batch_size x gradient_accumulation_steps)."""
    per_pass: int
    """Samples per forward pass without a token budget (the process's micro-batch)."""
    packing: bool
    budget: int | None
    """data.batch_tokens: the most tokens one forward pass holds, or None (per_pass samples a pass)."""
    steps: int
    """Optimizer steps in the run."""
    processes: int = 1
    """Processes the global batch is split over (WORLD_SIZE)."""


@dataclass(frozen=True)
class Pass:
    tokens: int
    """Positions in the pass (padding included)."""
    trained: int


@dataclass(frozen=True)
class PassStats:
    largest: Pass
    """The pass with the most positions."""
    most_trained: Pass
    """The pass with the most trained tokens (the output layer's chunks)."""
    passes_per_step: float
    real_tokens_per_step: float
    """Non-padding tokens per optimizer step, on average."""
    trained_tokens_per_step: float
    positions_per_step: float
    """Positions computed per optimizer step (padding included)."""
    attention_per_step: float
    """Sum over samples of length squared, per step (attention work grows with it)."""


def pack(group: list[int], lengths: list[int], budget: int | None) -> list[list[int]]:
    """PackCollator's rule on sample indices: the step's samples in passes of at most `budget`
    tokens, evened out (data/groups.py)."""
    return [[group[k] for k in g] for g in passes([lengths[i] for i in group], budget)]


def simulate(samples: Samples, batching: Batching, seed: int = 42, max_steps: int = 2000) -> PassStats:
    """Replay the run's batching (at most `max_steps` steps: enough to meet its largest passes)."""
    n = len(samples.lengths)
    rng = random.Random(seed)
    order: list[int] = []
    steps = min(batching.steps, max_steps)
    passes: list[Pass] = []
    count = real = trained = positions = attention = 0
    for _ in range(steps):
        if len(order) < batching.samples_per_step:
            epoch = list(range(n))
            rng.shuffle(epoch)
            order += epoch
        step, order = order[: batching.samples_per_step], order[batching.samples_per_step :]
        if batching.budget:
            groups = pack(step, samples.lengths, batching.budget)
        else:
            groups = [step[i : i + batching.per_pass] for i in range(0, len(step), batching.per_pass)]
        for g in groups:
            lengths = [samples.lengths[i] for i in g]
            size = sum(lengths) if batching.packing else len(g) * max(lengths)
            passes.append(Pass(size, sum(samples.trained[i] for i in g)))
            positions += size
            attention += sum(x * x for x in lengths)
        count += len(groups)
        real += sum(samples.lengths[i] for i in step)
        trained += sum(samples.trained[i] for i in step)
    steps = max(steps, 1)
    return PassStats(
        largest=max(passes, key=lambda p: (p.tokens, p.trained)),
        most_trained=max(passes, key=lambda p: (p.trained, p.tokens)),
        passes_per_step=count / steps,
        real_tokens_per_step=real / steps,
        trained_tokens_per_step=trained / steps,
        positions_per_step=positions / steps,
        attention_per_step=attention / steps,
    )


def run_steps(n_samples: int, samples_per_step: int, epochs: float, max_steps: int) -> int:
    """Optimizer steps of a run, as Trainer counts them (max_steps wins when set)."""
    if max_steps and max_steps > 0:
        return max_steps
    return max(1, math.ceil(math.ceil(n_samples / samples_per_step) * epochs))
