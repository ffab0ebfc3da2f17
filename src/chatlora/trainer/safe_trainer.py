"""transformers' Trainer with checkpoints that are complete or absent, and a note of whether every loss
of the current optimizer step was finite, for the non-finite guard (trainer/guard.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from chatlora.trainer.checkpoint import save_atomically


class SafeTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stamp: dict[str, Any] | None = None
        """Written into every checkpoint (the config and data fingerprints resume compares)."""
        self.staging_root: Path | None = None
        """Set while a checkpoint is being written: where Trainer's save goes instead."""
        self.losses_finite = None
        """A boolean tensor: every micro-batch loss since the guard last looked was finite. Kept on
        the device, so noting it costs no host sync; the guard reads it once per optimizer step."""

    def _get_output_dir(self, trial) -> str:
        if self.staging_root is not None:
            return str(self.staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        save_atomically(self, lambda: super(SafeTrainer, self)._save_checkpoint(model, trial))

    def _run_epoch(self, *args, **kwargs):
        # Resumed from the checkpoint of the last step (a run killed after saving it, before its
        # adapter was written), Trainer starts the epoch that step falls in, skips the batches already
        # trained, then trains one step past max_steps before its end-of-step check stops it. Nothing is
        # left to train: the checkpoint's weights, which Trainer has loaded, are the run's.
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        return self.note_loss(super().training_step(model, inputs, num_items_in_batch))

    def note_loss(self, loss: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(loss.detach()).all()
        self.losses_finite = finite if self.losses_finite is None else self.losses_finite & finite
        return loss
