"""Batches of tokenized samples."""

from __future__ import annotations

import torch

from chatlora.data.groups import passes
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
    """Concatenates samples into rows with no padding, each row at most `max_tokens` long.

    position_ids restart at 0 for each sample and no attention mask is passed: transformers then
    keeps attention inside each sample (a block-diagonal causal mask under sdpa); the cumulative
    sample lengths (`cu_seq_lens_*`) let varlen/flash kernels do the same with no mask at all. The
    first token of each sample is never a target, so no sample learns to predict the next one.

    With `max_tokens`, a batch that does not fit one row comes back as {"chunks": [row, ...]} (rows of
    about equal tokens: data/groups.py says why) plus
    the concatenated input_ids and labels, which Trainer uses to count tokens; ChatTrainer runs one
    forward and backward pass per chunk within the same optimizer step.

    Each row also carries `trained_positions`: the positions whose next token is trained, found here
    on the CPU so that the loss need not search the labels on the device (a host sync per pass; see
    model/loss.py). With `pad_to` (CUDA graphs, trainer/speed/graphs.py) a row is padded to a multiple of
    that many tokens by a sample of its own that trains nothing, and its trained positions to a
    multiple of a quarter of the row by a position with no target, so that many steps share a shape;
    max_length then is the row's length, the same for every row of that length. `pad_to` must be a
    multiple of 4.
    """

    def __init__(self, max_tokens: int | None = None, pad_to: int | None = None, pad_id: int | None = None):
        self.max_tokens = max_tokens
        self.pad_to = pad_to
        self.pad_id = pad_id
        """The padding's token (with pad_to): the tokenizer's pad id, so that Trainer's count of
        real tokens (include_num_input_tokens_seen=non_padding) leaves the padding out; 0 if None."""

    def __call__(self, features: list[dict]) -> dict:
        groups = passes([len(f["input_ids"]) for f in features], self.max_tokens)
        rows = [self.pack([features[i] for i in g], self.pad_to, self.pad_id) for g in groups]
        if len(rows) == 1:
            return rows[0]
        return {"chunks": rows,
                "input_ids": torch.cat([r["input_ids"] for r in rows], dim=1),
                "labels": torch.cat([r["labels"] for r in rows], dim=1)}

    @staticmethod
    def pack(features: list[dict], pad_to: int | None = None, pad_id: int | None = None) -> dict:
        ids, labels, positions, bounds = [], [], [], [0]
        for f in features:
            n = len(f["input_ids"])
            ids += f["input_ids"]
            labels += [IGNORE] + list(f["labels"][1:])
            positions += range(n)
            bounds.append(bounds[-1] + n)
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        if pad_to:
            # At least one token of padding, so the next-to-last position (whose next token is
            # padding) never has a target: the padded trained positions point there. (Token 0, the
            # default, is in every vocabulary.)
            pad = -(-(len(ids) + 1) // pad_to) * pad_to - len(ids)
            ids += [pad_id or 0] * pad
            labels += [IGNORE] * pad
            positions += range(pad)
            bounds.append(bounds[-1] + pad)
            longest = len(ids)
        trained = [p for p in range(len(ids) - 1) if labels[p + 1] != IGNORE]
        if pad_to:
            # To a multiple of a quarter of the row (at least one quarter): the row's length then
            # nearly decides the shape (about 13 shapes in 3 epochs of the recipe, against 75 with
            # multiples of 32), for the output layer's work on a few hundred positions more.
            quarter = len(ids) // 4
            trained += [len(ids) - 2] * (max(quarter, -(-len(trained) // quarter) * quarter) - len(trained))
        as_row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
        cu = torch.tensor(bounds, dtype=torch.int32)
        return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions),
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
                "trained_positions": torch.tensor(trained, dtype=torch.long)}


class PreferenceCollator:
    """A step's preference samples packed into one row (PackCollator.pack), so chosen and rejected go
    through one varlen forward pass: the chosen samples first, then the rejected ones in the same
    order (KTO: the replies, then the mismatched "KL" samples, each prompt with the previous row's
    reply, as TRL's KTOTrainer builds them). `sequence` holds, for each trained position, the index
    of its sample, so that model/preference.py sums each sample's log-probabilities."""

    def __call__(self, features: list[dict]) -> dict:
        samples = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        if "label" in features[0]:  # KTO
            heads = [_untrained(f["labels"]) for f in features]
            samples += [{"input_ids": f["input_ids"][:h] + p["input_ids"][hp:], "labels": [IGNORE] * h + p["labels"][hp:]}
                        for f, h, p, hp in zip(features, heads, features[-1:] + features[:-1], heads[-1:] + heads[:-1])]
        else:
            samples += [{"input_ids": f["rejected_input_ids"], "labels": f["rejected_labels"]} for f in features]
        row = PackCollator.pack(samples)
        row["sequence"] = torch.searchsorted(row["cu_seq_lens_q"][1:].long(), row["trained_positions"], right=True)
        row["pairs"] = torch.tensor(len(features))
        if "label" in features[0]:
            row["preference_label"] = torch.tensor([bool(f["label"]) for f in features])
        return row


def _untrained(labels: list[int]) -> int:
    return next(k for k, label in enumerate(labels) if label != IGNORE)


# Keys of a batch that are not the model's inputs.
NOT_MODEL_INPUTS = ("labels", "trained_positions", "sequence", "pairs", "preference_label")


def model_inputs(batch: dict) -> dict:
    """The batch without what only the loss reads."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
