"""transformers' Trainer with chatlora's loss: the mean over the optimizer step's trained tokens,
with the output layer run only where a token is trained."""

from __future__ import annotations

from transformers import Trainer

from chatlora.trainer.loss import trained_token_loss


class ChatTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Our loss is divided by num_items_in_batch, the trained tokens of the whole optimizer step
        # (all micro-batches, all ranks), so Trainer must not divide it by the accumulation steps
        # again; this is the flag it reads for that.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, count = trained_token_loss(model, inputs)
        if num_items_in_batch is None:  # evaluation: the mean over this batch
            loss = total / count.clamp_min(1)
        else:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # num_items_in_batch counts every rank's tokens and DDP averages gradients over ranks.
                loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss  # no logits kept: evaluation is loss-only
