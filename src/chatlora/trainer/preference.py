"""The preference stage's loss path of ChatTrainer (`stage: dpo`): the step's loss is
model/preference.py's on the packed pairs (data/collate.py PreferenceCollator), its rewards, margin and
accuracy are logged with the loss, and each evaluation reports the held-out pairs' loss and preference
accuracy. A mixin of ChatTrainer, not a second trainer: the guard, checkpoints, exact resume and the
callbacks are ChatTrainer's own."""

from __future__ import annotations

import torch
from transformers.trainer_utils import EvalLoopOutput

from chatlora.config.preference import PreferenceConfig
from chatlora.model.preference import preference_loss


class PreferenceSteps:
    def __init__(self, *args, preference: PreferenceConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.preference = preference
        """The preference loss and its settings; None: the SFT stage (ChatTrainer's token loss)."""
        self.preference_sums: dict[str, torch.Tensor] = {}
        """Sums of the micro-batches' rewards since the last log, on the device (no host sync per step)."""
        self.preference_batches = 0

    def preference_step(self, model, inputs, return_outputs: bool = False):
        loss, metrics = preference_loss(model, inputs, self.preference)
        for key, value in metrics.items():
            self.preference_sums[key] = self.preference_sums.get(key, 0) + value.detach().float()
        self.preference_batches += 1
        # A mean over the micro-batch's pairs; Trainer does not divide by the accumulation steps when
        # the model takes loss kwargs (ChatTrainer.model_accepts_loss_kwargs), so it is done here.
        loss = loss / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return (loss, {}) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self.preference_batches:
            logs.update({key: round(float(value) / self.preference_batches, 4) for key, value in self.preference_sums.items()})
            self.preference_sums, self.preference_batches = {}, 0
        super().log(logs, start_time)

    @torch.no_grad()
    def preference_evaluation(self, model, dataloader, prefix: str) -> EvalLoopOutput:
        """The held-out pairs' mean loss and rewards (`<prefix>_rewards/accuracies`: the share of pairs
        whose chosen reply the model prefers, by the loss's own reward), weighted by pairs."""
        was = model.training
        model.eval()
        sums: dict[str, float] = {}
        pairs = 0
        for batch in dataloader:
            batch = self.prepare_inputs(batch)
            loss, metrics = preference_loss(model, batch, self.preference)
            n = int(batch["pairs"])
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
            pairs += n
        model.train(was)
        metrics = {f"{prefix}_{key}": value / max(pairs, 1) for key, value in sums.items()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=pairs)
