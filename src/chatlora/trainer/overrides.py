"""Every place chatlora overrides, reads or replaces a private member of transformers' Trainer, of
accelerate or of torch: this file and no other. They are not APIs and may change with any release;
tests/unit/trainer/test_private_members.py checks each against the installed versions and names the
one that is gone. What the rest of the trainer calls instead are the public-named methods and
functions below.

| member                                      | kind     | why                                                       |
|---------------------------------------------|----------|-----------------------------------------------------------|
| Trainer._clip_grad_norm                     | override | one norm of the trained parameters only, or of FSDP2's    |
|                                             |          | local shards (speed/grads.py); the guard reads it         |
| Trainer._get_grad_norm                      | override | the same norm when nothing is clipped                     |
| Trainer._track_num_input_tokens             | override | the token count read back a step late, not by .item()     |
|                                             |          | (speed/readback.py)                                       |
| Trainer._save_checkpoint                    | override | late values read first; the save staged, stamped and      |
|                                             |          | renamed into place (lifecycle/checkpoint.py)              |
| Trainer._get_output_dir                     | override | where Trainer's save goes while it is staged              |
| Trainer._run_epoch                          | override | a resume from the last step's checkpoint trains no step   |
|                                             |          | past max_steps                                            |
| Trainer._tr_loss, _globalstep_last_logged   | read     | the mean logged loss, to replace a non-finite loss on the |
|                                             |          | device (logging_nan_inf_filter without a host sync)       |
| Trainer._prepare_inputs                     | call     | a batch on the device before a CUDA graph copies it in    |
| Trainer._get_train_sampler,                 | call,    | the sampler and micro-batch Trainer's own loader would    |
| Trainer._train_batch_size                   | read     | use, split over processes by tokens (distributed/balance) |
| Trainer._wrap_model                         | call     | the evaluation model, as Trainer's evaluation_loop has it |
| TrainingArguments._n_gpu                    | write    | one process that sees several GPUs trains on one (no      |
|                                             |          | nn.DataParallel)                                          |
| Accelerator._models                         | read,    | whether evaluate() came before train(); undone so that    |
|                                             | write    | train() wraps the model in DDP                            |
| model._is_accelerate_prepared               | delete   | the same: accelerate's mark of a prepared model           |
| model.train, model.zero_grad                | replace  | per model object while it trains: no walk of every module |
|                                             |          | or parameter at every step (speed/walks.py)               |
| FSDPModule._get_fsdp_state()._fsdp_param_   | read     | which FSDP2 units keep their weights through backward     |
| groups[i].post_forward_mesh_info            |          | (distributed/fsdp.py)                                     |
| PretrainedConfig._attn_implementation       | read     | the attention kernel, for the `batches:` line             |
| OptimizedModule._orig_mod (torch.compile)   | read     | the model inside a compiled wrapper; read in model/loss.py |
|                                             |          | (causal_lm), which sits below the trainer                 |

PRIVATE_MEMBERS below lists them as data: the test reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from chatlora.trainer.lifecycle.checkpoint import save_atomically

# (owner, member, kind): owner is "module:Class", or "module:Class()" for a member that only an
# instance has (set in the class's code, so found in its source); the kinds as in the table above.
PRIVATE_MEMBERS: list[tuple[str, str, str]] = [
    ("transformers:Trainer", "_clip_grad_norm", "override"),
    ("transformers:Trainer", "_get_grad_norm", "override"),
    ("transformers:Trainer", "_track_num_input_tokens", "override"),
    ("transformers:Trainer", "_save_checkpoint", "override"),
    ("transformers:Trainer", "_get_output_dir", "override"),
    ("transformers:Trainer", "_run_epoch", "override"),
    ("transformers:Trainer()", "_tr_loss", "read"),
    ("transformers:Trainer()", "_globalstep_last_logged", "read"),
    ("transformers:Trainer", "_prepare_inputs", "call"),
    ("transformers:Trainer", "_wrap_model", "call"),
    ("transformers:Trainer", "_get_train_sampler", "call"),
    ("transformers:Trainer()", "_train_batch_size", "read"),
    ("transformers:TrainingArguments()", "_n_gpu", "write"),
    ("accelerate:Accelerator()", "_models", "read"),
    ("torch.distributed.fsdp:FSDPModule", "_get_fsdp_state", "read"),
    ("torch.distributed.fsdp._fully_shard._fsdp_state:FSDPState()", "_fsdp_param_groups", "read"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param_group:FSDPParamGroup()", "post_forward_mesh_info", "read"),
    ("transformers:PretrainedConfig()", "_attn_implementation", "read"),
    ("torch._dynamo.eval_frame:OptimizedModule()", "_orig_mod", "read"),
]


class TrainerOverrides(Trainer):
    """transformers' Trainer with its private methods routed to public-named ones, which ChatTrainer
    (trainer.py) defines: gradient_norm, count_tokens_late, before_checkpoint. The defaults here do
    what Trainer does."""

    def __init__(self, *args, stamp: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stamp = stamp
        """Written into every checkpoint (the config and data fingerprints resume compares)."""
        self.staging_root: Path | None = None
        """Set while a checkpoint is being written: where Trainer's save goes instead."""

    # -- what ChatTrainer defines ------------------------------------------------------------------

    def gradient_norm(self, model, max_norm: float | None):
        """The gradients' norm before clipping, the gradients clipped to `max_norm` (None: left as
        they are)."""
        return self.trainers_gradient_norm(model, max_norm)

    def count_tokens_late(self, inputs) -> bool:
        """Counts the batch's input tokens itself and returns True, or returns False for Trainer's count."""
        return False

    def before_checkpoint(self) -> None:
        """Runs before a checkpoint is written."""

    # -- Trainer's private methods -----------------------------------------------------------------

    def _clip_grad_norm(self, model):
        return self.gradient_norm(model, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:  # no clipping (max_grad_norm <= 0): the norm alone
            grad_norm = self.gradient_norm(model, None)
        return super()._get_grad_norm(model, grad_norm)

    def trainers_gradient_norm(self, model, max_norm: float | None):
        """Trainer's own norm (and clipping, with `max_norm`) over all of the model's parameters."""
        return super()._get_grad_norm(model) if max_norm is None else super()._clip_grad_norm(model)

    def _track_num_input_tokens(self, inputs):
        if not self.count_tokens_late(inputs):
            super()._track_num_input_tokens(inputs)

    def _get_output_dir(self, trial) -> str:
        if self.staging_root is not None:
            return str(self.staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        self.before_checkpoint()
        save_atomically(self, lambda: super(TrainerOverrides, self)._save_checkpoint(model, trial))

    def _run_epoch(self, *args, **kwargs):
        # Resumed from the checkpoint of the last step (a run killed after saving it, before its
        # adapter was written), Trainer starts the epoch that step falls in, skips the batches already
        # trained, then trains one step past max_steps before its end-of-step check stops it. Nothing is
        # left to train: the checkpoint's weights, which Trainer has loaded, are the run's.
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    # -- Trainer's private state and helpers -------------------------------------------------------

    def logged_loss_mean(self) -> torch.Tensor | None:
        """The mean of the losses added since the last log (Trainer's running sum over the steps),
        None outside a training loop."""
        total = getattr(self, "_tr_loss", None)
        if not torch.is_tensor(total):
            return None
        return total / (1 + self.state.global_step - self._globalstep_last_logged)

    def prepare_inputs(self, inputs: dict) -> dict:
        """A batch on the device, as Trainer's training_step prepares it."""
        return self._prepare_inputs(inputs)

    def train_sampler(self):
        """The sampler Trainer's training DataLoader would use (None for an iterable dataset)."""
        return self._get_train_sampler()

    def micro_batch_size(self) -> int:
        """Samples per forward pass on this process, as Trainer's training DataLoader batches them."""
        return self._train_batch_size

    def evaluation_model(self):
        """The model to evaluate, as Trainer.evaluation_loop prepares it."""
        model = self._wrap_model(self.model, training=False)
        if len(self.accelerator._models) == 0 and model is self.model:
            # evaluate() before train(): the model prepared as Trainer.evaluation_loop does it (FSDP
            # shards it; otherwise it is only placed, and undo_evaluation_prepare lets train() wrap
            # it in DDP afterwards).
            model = (self.accelerator.prepare(model) if self.is_fsdp_enabled and not self.args.torch_compile
                     else self.accelerator.prepare_model(model, evaluation_mode=True))
            if self.is_fsdp_enabled:
                self.model = model
            if model is not self.model:
                self.model_wrapped = model
        return model


def one_gpu(args) -> None:
    """Make TrainingArguments use one GPU of several this process sees."""
    _ = args.device  # Trainer's device setup counts the GPUs; the count is then set to one
    args._n_gpu = 1


def undo_evaluation_prepare(trainer) -> None:
    """Let the next train() wrap the model in DDP after an evaluate() that came first.

    Trainer.evaluate() before train() hands the model to accelerate's prepare_model in evaluation
    mode: no DDP wrapper, but the model is marked as prepared. train() then asks accelerate to
    prepare it again, accelerate returns it as it is, and every process trains alone on its own
    samples with no gradient averaging: the losses look plausible, the adapter is wrong
    (accelerate 1.15 with transformers 5.24; tests/e2e/test_distributed.py catches it). FSDP is not
    affected (evaluate() shards the model for real), nor is one process.
    """
    model = trainer.model
    accelerator = trainer.accelerator
    if accelerator.num_processes == 1 or trainer.is_fsdp_enabled or trainer.model_wrapped is not model:
        return
    if getattr(model, "_is_accelerate_prepared", False):
        del model._is_accelerate_prepared
        if model in accelerator._models:
            accelerator._models.remove(model)


def attention_implementation(model) -> str:
    """The attention kernel transformers chose for `model` (eager, sdpa, flash_attention_2, ...)."""
    return model.config._attn_implementation


def keeps_weights_through_backward(unit) -> bool:
    """Whether an FSDP2 unit keeps its gathered weights from forward to backward
    (reshard_after_forward=False: set by the config, or torch's choice for the root unit)."""
    groups = unit._get_fsdp_state()._fsdp_param_groups
    # torch's own record of the unit's setting (FSDPParamGroup._reshard_after_forward reads it);
    # a torch without it: the unit is left as it is.
    return bool(groups) and all(getattr(g, "post_forward_mesh_info", True) is None for g in groups)


# -- model.train and model.zero_grad, replaced per model object while it trains (speed/walks.py) ---


def _idempotent_train(cls: type) -> bool:
    """Whether `cls.train(mode)` does nothing when every module is already in `mode`: nn.Module's
    own, and transformers' (which acts only when the mode changes). peft's DoRA layers, for one,
    clear a cache at every train(True): a model with those keeps the full walk."""
    from transformers import PreTrainedModel

    return cls.train in (nn.Module.train, PreTrainedModel.train)


def skip_unchanged_train(model: nn.Module) -> bool:
    """Make `model.train(mode)` return at once when every module of `model` is already in `mode`
    (Trainer calls it at every training step; the walk sets every module's flag to the value it
    has). Any module out of step (evaluation left it in eval mode, a callback switched one) and the
    full walk runs as before. Returns False, changing nothing, when a module's train() does more."""
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
    walk: Callable = model.zero_grad

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
