"""Trainer's per-step bookkeeping without walking the whole model each time.

Why: a LoRA model of 7B parameters (Qwen1.5-7B, r=8 on 7 projections) has 2,665 modules and 835
parameters, of which 448 train. At every optimizer step Trainer, accelerate and peft walk all of them,
several times: `model.train()` visits every module, the FLOP count sums every parameter, gradient
clipping, the non-finite guard and `zero_grad` go through every parameter to find the few with
gradients, and peft's `disable_input_dtype_casting` visits every module twice per pass. That is pure
Python, a large share of the CPU time of a small step, and a step that small is bound by the CPU
(bench/step_overhead.py measures it; figures in docs/benchmarks.md). What they look for does not
change during training, so it is found once per run here. `model.train` and `model.zero_grad` become
attributes of the model object itself while it trains (its class and every other model are
untouched: trainer/overrides.py, which holds every such replacement) and are removed when the run
ends, so the trained model copies, pickles and switches modes as any other.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    """peft's adapter layers (BaseTunerLayer): the modules whose input casting peft switches."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def no_input_casting(layers: list[nn.Module], active: bool = True):
    """peft.helpers.disable_input_dtype_casting over layers listed once (tuner_layers): the same
    flags switched off and restored, without its two walks of every module."""
    if not active:
        yield
        return
    before = [layer.cast_input_dtype_enabled for layer in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer.cast_input_dtype_enabled = value


def flops_per_token(model: nn.Module) -> int:
    """Trainer.floating_point_ops' factor (6 x the parameters outside the embeddings), once: it
    counts every parameter at every step otherwise."""
    counter = getattr(model, "num_parameters", None)
    return 6 * counter(exclude_embeddings=True) if counter is not None else 0

