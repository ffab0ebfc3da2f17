"""The non-finite guard: a NaN or inf loss or gradient never reaches the weights.

Checked just before each optimizer step, once the step's gradients are complete (and, under DDP,
averaged across ranks). `stop` raises NonFiniteError naming the step, before the optimizer has
changed the weights with it, so the weights and every checkpoint saved so far are good; `skip`
drops the step (no update, no moment change) and counts it.

On a GPU, reading the verdict at once would make the host wait for the GPU at every step (see
trainer/readback.py). There, when the optimizer is torch's fused Adam or AdamW, the verdict goes to
the optimizer on the device instead (`found_inf`: the step is skipped on the GPU when it is set, the
way GradScaler skips fp16 steps), and the host reads it a step later, or at once before anything is
logged or saved: a stop is then raised at the next step's optimizer step at the latest, and the bad
step never touched the weights. Elsewhere (CPU, other optimizers, fp16, FSDP2 shards) the verdict is
read at once and a skipped step's gradients are dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from chatlora.errors import NonFiniteError
from chatlora.trainer.grads import all_finite, local_grads
from chatlora.trainer.readback import Readback
from chatlora.trainer.stop import several_processes


def reads_late(args) -> bool:
    """Whether the guard reads its verdicts late where it can (on a GPU: see the module's doc)."""
    return args.device.type == "cuda"


class NonFiniteGuard(TrainerCallback):
    def __init__(self, trainer, policy: str, write: Callable[[str], None]):
        self.trainer, self.policy, self.write = trainer, policy, write
        self.skipped: list[int] = []
        self._logged = 0
        self.pending: list[tuple[int, Readback]] = []
        """(step, its verdict on the device) not read yet: [not finite, the loss was not]."""
        # ChatTrainer reads these before anything is logged or saved (an evaluation, a save at an
        # epoch's end, a signal's save included), so nothing is logged or saved past a bad step.
        getattr(trainer, "late_reads", []).append(lambda: self.settle(trainer.state))

    def on_train_begin(self, args, state, control, **kwargs):
        self.pending.clear()
        self.forget_found_inf()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # The last step's verdict. Waiting for it does not idle the GPU: this step's pass is queued
        # behind it. Every rank of a distributed run decides here, at the same step.
        self.settle(state)
        step = state.global_step + 1
        verdict = self.verdict(args)
        if verdict is None:
            return
        optimizer = self.skipping_optimizer(args) if reads_late(args) else None
        if optimizer is not None:
            optimizer.found_inf = verdict[0].float()
            self.pending.append((step, Readback(verdict)))
        else:
            bad, loss_bad = (bool(v) for v in verdict.tolist())  # one device-to-host sync per step
            self.judge(step, bad, loss_bad, state, now=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.forget_found_inf()  # the next step sets its own (or none)

    def on_step_end(self, args, state, control, **kwargs):
        self.log_skipped()

    def on_train_end(self, args, state, control, **kwargs):
        self.forget_found_inf()
        self.settle(state)
        self.log_skipped()

    def torch_optimizer(self) -> torch.optim.Optimizer | None:
        return getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)  # inside accelerate's wrapper

    def forget_found_inf(self) -> None:
        optimizer = self.torch_optimizer()
        if getattr(optimizer, "found_inf", None) is not None:
            del optimizer.found_inf

    def log_skipped(self) -> None:
        if len(self.skipped) > self._logged:
            self._logged = len(self.skipped)
            self.trainer.log({"nonfinite_skipped_steps": len(self.skipped)})

    def verdict(self, args) -> torch.Tensor | None:
        """[not finite, the loss was not] for this step on every rank, on the device; None when
        there is nothing to check."""
        trainer = self.trainer
        losses_finite, trainer.losses_finite = trainer.losses_finite, None
        norm, trainer.step_grad_norm = trainer.step_grad_norm, None
        if torch.is_tensor(norm):
            # The norm Trainer took of the step's gradients (to clip or to log) is NaN or inf exactly
            # when one of them is: no second pass over them.
            grads_finite = norm.isfinite()
        else:
            # This process's gradients (its shards under FSDP2: the all-reduce below covers the others).
            grads = local_grads(p for p in trainer.trainable() if p.grad is not None)
            grads_finite = all_finite(grads) if grads else None
        several = several_processes()
        if grads_finite is None and losses_finite is None and not several:
            return None
        ok = torch.ones((), dtype=torch.bool, device=args.device)
        loss_bad = ~(losses_finite.to(args.device) if losses_finite is not None else ok)
        grads_bad = ~(grads_finite.to(args.device) if grads_finite is not None else ok)
        verdict = torch.stack([loss_bad | grads_bad, loss_bad]).float()
        if several:  # every rank stops or skips together (each takes part, whatever it has to check)
            dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
        return verdict

    def skipping_optimizer(self, args) -> torch.optim.Optimizer | None:
        """The optimizer, when it can skip a step on the device: torch's fused Adam/AdamW (which read
        `found_inf`) over plain tensors, with no fp16 GradScaler setting found_inf itself."""
        optimizer = self.torch_optimizer()
        fused_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(
            group.get("fused") for group in optimizer.param_groups)
        no_scaler = getattr(self.trainer.accelerator, "scaler", None) is None
        return optimizer if fused_adam and no_scaler and self.trainer.local_clipping() else None

    def settle(self, state) -> None:
        """Acts on the verdicts not read yet (waiting for their copies, not for later work)."""
        while self.pending:
            step, verdict = self.pending.pop(0)
            bad, loss_bad = (bool(v) for v in verdict.value().tolist())
            self.judge(step, bad, loss_bad, state)

    def judge(self, step: int, bad: bool, loss_bad: bool, state, now: bool = False) -> None:
        """Stops or counts a skipped step; `now`: the step whose optimizer step comes next, which a
        skip keeps from the weights by dropping its gradients."""
        if not bad:
            return
        if self.policy == "stop":
            self.pending.clear()
            what = "the loss" if loss_bad else "the gradient norm"
            raise NonFiniteError(
                f"training stopped at step {step} of {state.max_steps}: {what} was NaN or inf. The weights were not "
                "updated with it. Lower training.learning_rate (or set training.max_grad_norm), or set "
                "on_nonfinite=skip to skip such steps."
            )
        if now:
            for p in self.trainer.trainable():
                p.grad = None  # an optimizer skips parameters without a gradient
        self.skipped.append(step)
        if state.is_world_process_zero:
            self.write(f"step {step}: NaN or inf loss or gradient; step skipped "
                       f"({len(self.skipped)} skipped so far, on_nonfinite=skip)")
