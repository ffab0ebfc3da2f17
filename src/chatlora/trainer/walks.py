"""Trainer's per-step bookkeeping without walking the whole model each time.

Why: a LoRA model of 7B parameters (Qwen1.5-7B, r=8 on 7 projections) has 2,665 modules and 835
parameters, of which 448 train. At every optimizer step Trainer, accelerate and peft walk all of them,
several times: `model.train()` visits every module, the FLOP count sums every parameter, gradient
clipping, the non-finite guard and `zero_grad` go through every parameter to find the few with
gradients, and peft's `disable_input_dtype_casting` visits every module twice per pass. That is pure
Python: about a third of the CPU time of the recipe's step with compiled layers (py-spy, H200,
2026-11-28), and a step that small is bound by the CPU (bench/step_overhead.py: 19.5 ms of
bookkeeping per step against 1.8 ms, on this workplace's CPU; docs/benchmarks.md). What they look for
does not change during training, so it is found once per run here. `model.train` and
`model.zero_grad` become attributes of the model object itself while it trains (its class and every
other model are untouched) and are removed when the run ends (remove_shortcuts), so the trained model
copies, pickles and switches modes as any other.
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


def _idempotent_train(cls: type) -> bool:
    """Whether `cls.train(mode)` does nothing when every module is already in `mode`: nn.Module's
    own, and transformers' (which acts only when the mode changes). peft's DoRA layers, for one,
    clear a cache at every train(True): a model with those keeps the full walk."""
    from transformers import PreTrainedModel

    return cls.train in (nn.Module.train, PreTrainedModel.train)


def skip_unchanged_train(model: nn.Module) -> bool:
    """Make `model.train(mode)` return at once when every module of `model` is already in `mode`
    (Trainer calls it at every training step; the walk sets 2,665 flags to the value they have).
    Any module out of step (evaluation left it in eval mode, a callback switched one) and the full
    walk runs as before. Returns False, changing nothing, when a module's train() does more."""
    modules = list(model.modules())
    if not all(_idempotent_train(type(m)) for m in modules):
        return False
    walk = model.train

    def train(mode: bool = True):
        if all(m.training == mode for m in modules):
            return model
        return walk(mode)

    model.train = train  # an instance attribute: the class and every other model are untouched
    return True


def zero_trained_grads_only(model: nn.Module, params: list[nn.Parameter]) -> None:
    """Make `model.zero_grad()` (set_to_none, Trainer's call after every step) drop the gradients of
    `params`, the trained parameters, instead of visiting every parameter of the model for the few
    hundred that have one: a frozen parameter never gets a gradient. Under DDP Trainer calls the
    wrapper's zero_grad, which walks as before."""
    walk = model.zero_grad

    def zero_grad(set_to_none: bool = True) -> None:
        if not set_to_none:
            return walk(set_to_none)
        for p in params:
            p.grad = None

    model.zero_grad = zero_grad


def remove_shortcuts(model: nn.Module) -> None:
    """Give `model` back its class's train() and zero_grad()."""
    for name in ("train", "zero_grad"):
        vars(model).pop(name, None)


def flops_per_token(model: nn.Module) -> int:
    """Trainer.floating_point_ops' factor (6 x the parameters outside the embeddings), once: it
    counts every parameter at every step otherwise."""
    counter = getattr(model, "num_parameters", None)
    return 6 * counter(exclude_embeddings=True) if counter is not None else 0

