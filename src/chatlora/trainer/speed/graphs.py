"""CUDA graphs over the training pass (`model.cuda_graphs=true`): each packed forward and backward
pass recorded once per shape and replayed.

Why: the recipe's step (16 short samples, about 1,060 tokens) gives a 7B model's GPU little work,
and the CPU takes longer than that to issue it: a launch per kernel of every decoder layer call and
direction, plus torch.compile's guards. A CUDA graph holds every kernel of the pass and launches them
all at once, so the CPU's cost no longer depends on how many there are (the step times, with and
without graphs: docs/benchmarks.md). Graphs need fixed shapes and fixed addresses, so:

- rows are padded to a multiple of GRAPH_PAD tokens by a sample of their own that trains nothing,
  and the trained positions to a multiple of a quarter of the row by a position with no target
  (PackCollator's `pad_to`): one graph per (row length, samples in it, trained positions), 23 in
  700 steps of the recipe;
- each graph reads its batch from tensors of its own, which every step's batch is copied into;
- the gradients accumulate into tensors kept for the whole run, attached to the parameters before
  each pass, so every graph adds into the same ones and clipping, the optimizer and the non-finite
  guard see ordinary gradients (Trainer's zero_grad may drop them: they are zeroed and attached
  again at the next step's first pass);
- the graphs share one memory pool: they never run at the same time, so one pass's memory serves
  them all.

The first `warmup` passes run eagerly: torch.compile compiles, kernels are tuned and libraries set
up, none of which may happen while recording. After that a new shape is recorded when it first comes
and replayed from then on. LoRA dropout draws from the CUDA generator, which gives each replay new
random numbers. One process only: DDP's gradient hooks would run inside the recording.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Pass = Callable[[dict, torch.Tensor], torch.Tensor]
# Rows are padded to a multiple of this many tokens (PackCollator's pad_to): about 3% more tokens on
# the recipe's steps of about 1,060, and about 15 row lengths to record.
GRAPH_PAD = 64


class _Recorded:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict, num_items: torch.Tensor, loss: torch.Tensor):
        self.graph, self.inputs, self.num_items, self.loss = graph, inputs, num_items, loss

    def replay(self, inputs: dict, num_items: torch.Tensor) -> torch.Tensor:
        for name, static in self.inputs.items():
            if torch.is_tensor(static):
                static.copy_(inputs[name], non_blocking=True)
        self.num_items.copy_(num_items, non_blocking=True)
        self.graph.replay()
        return self.loss.clone()  # the next replay overwrites the recorded loss


def shape_key(inputs: dict) -> tuple:
    """What a recorded pass is fixed to: every tensor's shape and dtype, every other value."""
    return tuple(sorted((name, (tuple(v.shape), v.dtype) if torch.is_tensor(v) else v) for name, v in inputs.items()))


class PassGraphs:
    WARMUP = 3

    def __init__(self, params: list[torch.nn.Parameter], warmup: int = WARMUP):
        self.params = params
        self.warmup = warmup
        self.eager_passes = 0
        self.replays = 0
        self.recorded_shapes = 0
        self.graphs: dict[tuple, _Recorded] = {}
        self.pool = None
        self.grads: list[torch.Tensor] | None = None
        self.failure: str | None = None
        """Why recording failed, if it did (the run then went on eagerly)."""

    def run(self, inputs: dict, num_items, forward_backward: Pass) -> torch.Tensor:
        """One pass (forward, loss, backward into the parameters' gradients); returns the loss."""
        self._attach_grads()
        num_items = torch.as_tensor(num_items, device=inputs["input_ids"].device)
        if self.eager_passes >= self.warmup and self.failure is None:
            recorded = self._recorded(inputs, num_items, forward_backward)
            if recorded is not None:
                self.replays += 1
                return recorded.replay(inputs, num_items)
        self.eager_passes += 1
        return forward_backward(inputs, num_items)

    def _recorded(self, inputs: dict, num_items: torch.Tensor, forward_backward: Pass) -> _Recorded | None:
        """The recording of this shape, made now if it is new; None when recording fails."""
        key = shape_key(inputs)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._record(inputs, num_items, forward_backward)
            except Exception as e:  # noqa: BLE001 - a pass that cannot be recorded still trains, eagerly
                # Recording ran no kernel, so nothing was computed twice; every later pass runs eagerly.
                self.failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.release()
                self._attach_grads()
                return None
            self.recorded_shapes += 1
        return self.graphs[key]

    def release(self) -> None:
        """Free the recordings and their memory (the counts stay for summary())."""
        self.graphs.clear()
        self.pool = self.grads = None

    def summary(self) -> str:
        text = (f"cuda graphs: {self.replays} passes replayed from {self.recorded_shapes} recorded shapes, "
                f"{self.eager_passes} eager")
        return text if self.failure is None else f"{text}; recording failed, so the rest ran eagerly: {self.failure}"

    def _attach_grads(self) -> None:
        """The run's gradient tensors on the parameters: zeroed when the step starts (every gradient
        dropped), kept when a pass of the same step came before; another tensor put there (a
        callback's) is copied in."""
        if self.grads is None:
            self.grads = [torch.zeros_like(p) for p in self.params]
        current = [p.grad for p in self.params]
        if all(g is None for g in current):
            torch._foreach_zero_(self.grads)
        elif any(g is not mine for g, mine in zip(current, self.grads)):
            for g, mine in zip(current, self.grads):
                if g is None:
                    mine.zero_()
                elif g is not mine:
                    mine.copy_(g)
        else:
            return
        for p, mine in zip(self.params, self.grads):
            p.grad = mine

    def _record(self, inputs: dict, num_items: torch.Tensor, forward_backward: Pass) -> _Recorded:
        static = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
        static_items = num_items.clone()
        # Recording runs nothing: the gradients stay as they are until the replay.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = forward_backward(static, static_items)
        if self.pool is None:
            self.pool = graph.pool()
        return _Recorded(graph, static, static_items, loss)
