"""FSDP2 (distributed.strategy=fsdp2): what changes when every process holds only a shard of each weight.

- The adapter is saved whole: each process holds a shard of every LoRA weight (a DTensor), so all of
  them gather the full tensors before rank 0 writes the file. Saving the local shards instead gives
  an adapter with 1/N of each weight, or an empty one: a known failure of FSDP/ZeRO LoRA runs.
- The packing check runs once the model is sharded (the first training step's set-up), on the GPUs,
  because the model is loaded on the CPU (it need not fit one GPU) where a GPU attention kernel
  cannot run.
- A unit that keeps its gathered weights from forward to backward (reshard_after_forward=false) also
  keeps them from one pass to the next within an optimizer step (kept_between_passes), so a step
  made of several passes gathers them once: they are already resident during each pass, so the peak
  memory does not grow.
- generate() must keep every rank stepping until all are done (each forward gathers weights from
  all): transformers does it for modules that fully_shard marks as FSDP-managed (synced_gpus), and
  generate() runs FSDP's gather hooks once registered as a forward method (register_generate).
The loss takes the model's own logits: a sharded output layer cannot be applied outside the forward
pass (model.loss.separable_head).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
import torch

from chatlora.errors import ConfigError
from chatlora.model.sharding import sharded


def full_adapter_state(model) -> dict[str, torch.Tensor] | None:
    """The trainable (LoRA) weights whole, on the CPU, for peft's save_pretrained(state_dict=...).

    Every process must call it (each gathers its shards from all the others). Returns None for a
    model that is not sharded: peft then reads the weights itself.
    """
    if not sharded(model):
        return None
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        # A forward pass (the last evaluation) may leave some units holding gathered weights in
        # place of their shards; back to shards, so every process walks the same DTensors.
        if isinstance(module, FSDPModule):
            module.reshard()
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():  # the same order on every process
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            state[name] = full.detach().to("cpu", copy=True)
    return state


def gathered_through_backward(model) -> list:
    """The FSDP2 units of `model` that keep their gathered weights from forward to backward
    (reshard_after_forward=False: set by the config, or torch's choice for the root unit)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    from chatlora.trainer.overrides import keeps_weights_through_backward

    return [m for m in model.modules() if isinstance(m, FSDPModule) and keeps_weights_through_backward(m)]


@contextmanager
def kept_between_passes(units: list) -> Iterator[None]:
    """Within the block (a pass of an optimizer step that more passes follow) `units` keep their
    gathered weights after backward, so the next pass need not gather them again; FSDP2 gathers
    them once per step instead of once per pass. Their gradients must not be reduced in the block
    either (Accelerator.no_sync): the units stay unsharded, and the last pass reduces them."""
    for unit in units:
        unit.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:  # torch's default, which the last pass's backward uses to shard them again
            unit.set_reshard_after_backward(True, recurse=False)


def register_generate(model) -> None:
    """Let generate() run FSDP's gather hooks like forward() does, once the model is sharded
    (Trainer registers it when training starts; an evaluation before training comes earlier). The
    trainer calls it before anything generates (trainer.py)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    if sharded(model) and not hasattr(model.generate, "__wrapped__"):  # once: Trainer may have done it
        register_fsdp_forward_method(model, "generate")


def check_packing(model, device) -> None:
    """model.loss.packing_is_exact on the sharded model before the first step (every rank runs it:
    each forward needs all of them). A model whose attention crosses packed samples stops the run:
    there is no falling back to padding once training has begun."""
    from torch.distributed.fsdp import FSDPModule

    from chatlora.model.loss import packing_is_exact
    from chatlora.trainer.distributed.ranks import any_rank

    # A check that failed on one process only (kernel rounding) must stop them all, or the others
    # wait for it in a collective for ever.
    exact = not any_rank(not packing_is_exact(model), device)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # as Trainer leaves it before the first step
    if not exact:
        raise ConfigError("this model lets packed samples attend to each other; with distributed.strategy=fsdp2 "
                          "set data.packing=false (padded batches)")
