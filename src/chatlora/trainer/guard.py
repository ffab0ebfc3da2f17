"""The non-finite guard: a NaN or inf loss or gradient never reaches the weights.

Checked just before each optimizer step, once the step's gradients are complete (and, under DDP,
averaged across ranks). `stop` raises NonFiniteError naming the step, before the optimizer has
changed the weights with it, so the weights and every checkpoint saved so far are good; `skip`
drops the step (no update, no moment change) and counts it.

On a GPU, reading the verdict at once would make the host wait for the GPU at every step (see
trainer/speed/readback.py). There, when the optimizer is torch's fused Adam or AdamW, the verdict goes to
the optimizer on the device instead (`found_inf`: the step is skipped on the GPU when it is set, the
way GradScaler skips fp16 steps), and the host reads it a step later, or at once before anything is
logged or saved: a stop is then raised at the next step's optimizer step at the latest, and the bad
step never touched the weights. Elsewhere (CPU, other optimizers, fp16, FSDP2 shards) the verdict is
read at once and a skipped step's gradients are dropped.

The trainer (trainer.py) owns the guard and hands it each step's facts (Step): the guard never reads
the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from chatlora.errors import NonFiniteError
from chatlora.trainer.distributed.ranks import several_processes
from chatlora.trainer.speed.grads import all_finite, local_grads
from chatlora.trainer.speed.readback import Readback


def reads_late(args) -> bool:
    """Whether the guard reads its verdicts late where it can (on a GPU: see the module's doc)."""
    return args.device.type == "cuda"


@dataclass
class Step:
    """What one optimizer step is judged by, as the trainer hands it over."""

    losses_finite: torch.Tensor | None
    """A boolean tensor: every micro-batch loss of the step was finite (None: none noted)."""
    norm: torch.Tensor | None
    """The norm Trainer took of the step's gradients (to clip, to log), if it took one."""
    params: list[torch.nn.Parameter]
    """The trained parameters."""
    optimizer: torch.optim.Optimizer | None
    """torch's optimizer (inside accelerate's wrapper)."""
    scaler: bool
    """An fp16 GradScaler sets the optimizer's found_inf itself."""
    plain_grads: bool
    """The gradients are plain tensors on this process (trainer.local_clipping())."""


def torch_optimizer(optimizer) -> torch.optim.Optimizer | None:
    return getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper


def forget_found_inf(optimizer) -> None:
    if getattr(optimizer, "found_inf", None) is not None:
        del optimizer.found_inf


class NonFiniteGuard:
    def __init__(self, policy: str, write: Callable[[str], None]):
        self.policy, self.write = policy, write
        self.skipped: list[int] = []
        self._logged = 0
        self.pending: list[tuple[int, Readback]] = []
        """(step, its verdict on the device) not read yet: [not finite, the loss was not]."""
        self.step: Step | None = None
        """The step being judged."""

    def begin(self, optimizer) -> None:
        """Training begins (the trainer calls it, as every method here)."""
        self.pending.clear()
        forget_found_inf(torch_optimizer(optimizer))

    def before_optimizer_step(self, args, state, step: Step) -> None:
        # The last step's verdict. Waiting for it does not idle the GPU: this step's pass is queued
        # behind it. Every rank of a distributed run decides here, at the same step.
        self.step = step
        self.settle(state)
        number = state.global_step + 1
        verdict = self.verdict(args)
        if verdict is None:
            return
        optimizer = self.skipping_optimizer(args) if reads_late(args) else None
        if optimizer is not None:
            optimizer.found_inf = verdict[0].float()
            self.pending.append((number, Readback(verdict)))
        else:
            bad, loss_bad = (bool(v) for v in verdict.tolist())  # one device-to-host sync per step
            self.judge(number, bad, loss_bad, state, now=True)

    def after_optimizer_step(self) -> None:
        if self.step is not None:
            forget_found_inf(self.step.optimizer)  # the next step sets its own (or none)

    def end(self, state, optimizer) -> None:
        forget_found_inf(torch_optimizer(optimizer))
        self.settle(state)

    def newly_skipped(self) -> int | None:
        """The count of skipped steps when it grew since it was last asked (to log), else None."""
        if len(self.skipped) > self._logged:
            self._logged = len(self.skipped)
            return len(self.skipped)
        return None

    def verdict(self, args) -> torch.Tensor | None:
        """[not finite, the loss was not] for this step on every rank, on the device; None when
        there is nothing to check."""
        step = self.step
        if torch.is_tensor(step.norm):
            # The norm Trainer took of the step's gradients (to clip or to log) is NaN or inf exactly
            # when one of them is: no second pass over them.
            grads_finite = step.norm.isfinite()
        else:
            # This process's gradients (its shards under FSDP2: the all-reduce below covers the others).
            grads = local_grads(p for p in step.params if p.grad is not None)
            grads_finite = all_finite(grads) if grads else None
        losses_finite = step.losses_finite
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
        step = self.step
        optimizer = step.optimizer
        fused_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(
            group.get("fused") for group in optimizer.param_groups)
        return optimizer if fused_adam and not step.scaler and step.plain_grads else None

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
            for p in self.step.params:
                p.grad = None  # an optimizer skips parameters without a gradient
        self.skipped.append(step)
        if state.is_world_process_zero:
            self.write(f"step {step}: NaN or inf loss or gradient; step skipped "
                       f"({len(self.skipped)} skipped so far, on_nonfinite=skip)")
