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
        self.preference_sums: dict[str, list] = {}
        """Per metric, [sum over micro-batches, micro-batches] since the last log; the sums stay on the
        device (no host sync per step). A KTO batch of one label has no reward of the other."""

    def preference_step(self, model, inputs, return_outputs: bool = False):
        loss, metrics = preference_loss(model, inputs, self.preference)
        for key, value in metrics.items():
            total = self.preference_sums.setdefault(key, [0, 0])
            total[0], total[1] = total[0] + value.detach().float(), total[1] + 1
        # A mean over the micro-batch's pairs; Trainer does not divide by the accumulation steps when
        # the model takes loss kwargs (ChatTrainer.model_accepts_loss_kwargs), so it is done here.
        loss = loss / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return (loss, {}) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self.preference_sums:
            logs.update({key: round(float(total) / count, 4) for key, (total, count) in self.preference_sums.items()})
            self.preference_sums = {}
        super().log(logs, start_time)

    @torch.no_grad()
    def preference_evaluation(self, model, dataloader, prefix: str) -> EvalLoopOutput:
        """The held-out pairs' mean loss and rewards (`<prefix>_rewards/accuracies`: the share of pairs
        whose chosen reply the model prefers, by the loss's own reward), weighted by pairs."""
        was = model.training
        model.eval()
        sums: dict[str, list[float]] = {}
        pairs = 0
        for batch in dataloader:
            batch = self.prepare_inputs(batch)
            loss, metrics = preference_loss(model, batch, self.preference)
            n = int(batch["pairs"])
            for key, value in {"loss": loss, **metrics}.items():
                total = sums.setdefault(key, [0.0, 0])
                total[0], total[1] = total[0] + float(value) * n, total[1] + n
            pairs += n
        model.train(was)
        metrics = {f"{prefix}_{key}": total / max(count, 1) for key, (total, count) in sums.items()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=pairs)
