"""The non-finite guard: a NaN or inf loss or gradient never reaches the weights.

Checked just before each optimizer step, once the step's gradients are complete (and, under DDP,
averaged across ranks). `stop` raises NonFiniteError naming the step, before the optimizer runs, so
the weights and every checkpoint saved so far are good; `skip` drops the step's gradients (an
optimizer skips parameters without one: no update, no moment change) and counts it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import TrainerCallback

from chatlora.errors import NonFiniteError
from chatlora.trainer.grads import all_finite, local_grads
from chatlora.trainer.stop import any_rank


class NonFiniteGuard(TrainerCallback):
    def __init__(self, trainer, policy: str, write: Callable[[str], None]):
        self.trainer, self.policy, self.write = trainer, policy, write
        self.skipped: list[int] = []
        self._skipped_now = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        params = [p for p in trainer.trainable() if p.grad is not None]
        losses_finite, trainer.losses_finite = trainer.losses_finite, None
        norm, trainer.step_grad_norm = trainer.step_grad_norm, None
        if torch.is_tensor(norm):
            # The norm Trainer took of the step's gradients (to clip or to log) is NaN or inf exactly
            # when one of them is: no second pass over them.
            flags = [norm.isfinite()]
        else:
            # This process's gradients (its shards under FSDP2: any_rank below covers the others).
            flags = [all_finite(local_grads(params))] if params else []
        if losses_finite is not None:
            flags.append(losses_finite)
        # One device-to-host sync per optimizer step.
        bad = bool(flags) and not torch.stack([f.to(flags[0].device) for f in flags]).all().item()
        if not any_rank(bad, args.device):  # every rank stops or skips together
            return
        step = state.global_step + 1
        what = "the loss" if losses_finite is not None and not bool(losses_finite) else "the gradient norm"
        if self.policy == "stop":
            raise NonFiniteError(
                f"training stopped at step {step} of {state.max_steps}: {what} was NaN or inf. The weights were not "
                "updated with it. Lower training.learning_rate (or set training.max_grad_norm), or set "
                "on_nonfinite=skip to skip such steps."
            )
        for p in params:
            p.grad = None
        self.skipped.append(step)
        self._skipped_now = True

    def on_step_end(self, args, state, control, **kwargs):
        if self._skipped_now:
            self._skipped_now = False
            if state.is_world_process_zero:
                self.write(f"step {state.global_step}: NaN or inf loss or gradient; step skipped "
                           f"({len(self.skipped)} skipped so far, on_nonfinite=skip)")
            self.trainer.log({"nonfinite_skipped_steps": len(self.skipped)})
