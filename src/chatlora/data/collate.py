"""Batches of tokenized samples."""

from __future__ import annotations

import torch

from chatlora.data.render import IGNORE


class PadCollator:
    """Right-pads input_ids with the pad id and labels with -100 (labels never come from the pad id)."""

    def __init__(self, pad_id: int, multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple_of = multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        longest = -(-longest // self.multiple_of) * self.multiple_of
        ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"])
            labels[row, :n] = torch.as_tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackCollator:
    """Concatenates a micro-batch's samples into one row with no padding.

    position_ids restart at 0 for each sample and no attention mask is passed: transformers then
    keeps attention inside each sample (a block-diagonal causal mask, or varlen kernels), so every
    sample sees exactly what it would see alone. The first token of each sample is never a target,
    so no sample learns to predict the start of the next.
    """

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for f in features:
            n = len(f["input_ids"])
            ids += f["input_ids"]
            labels += [IGNORE] + list(f["labels"][1:])
            positions += range(n)
        as_row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
        return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions)}
