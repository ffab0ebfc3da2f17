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
    of its sample, so that model/preference.py sums each sample's log-probabilities.

    With `share_prompt` (pairs only) each pair's prompt is in the row once (`pack_shared`), its
    attention described for the model's kernel: "varlen" (model/attention.py) or "mask" (any other)."""

    def __init__(self, share_prompt: str | None = None):
        if share_prompt not in (None, "varlen", "mask"):
            raise ValueError(f"share_prompt {share_prompt!r}")
        self.share_prompt = share_prompt

    def __call__(self, features: list[dict]) -> dict:
        if self.share_prompt and "label" not in features[0]:
            return pack_shared(features, varlen=self.share_prompt == "varlen")
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


def pack_shared(features: list[dict], varlen: bool = False) -> dict:
    """Pairs packed with each prompt once: [prompt, chosen reply, rejected reply] per pair, where
    PreferenceCollator's row holds the prompt twice (a quarter to a third of a DPO step's tokens).

    The rejected reply must see the prompt but not the chosen reply before it, which neither
    position_ids nor the sample boundaries of PackCollator can say. The row says it in the form the
    model's attention takes:
    - `varlen`: segments for model/attention.py's kernel. Queries in segments [prompt], [chosen],
      [rejected]; keys gathered by `kv_index` into [prompt], [prompt + chosen], [prompt + rejected]
      (`cu_seq_lens_k`), causal from the bottom right.
    - else `segment_pair` / `segment_kind` (0 prompt, 1 chosen, 2 rejected) per token, from which
      model/preference.py builds a dense mask (sdpa, eager: the CPU).
    Position ids count on from the prompt in both replies. The first token of each reply is predicted
    from the prompt's last position, so that position is trained twice and the targets are explicit
    (`targets`), not the next token of the row. The shared prompt is the longest common prefix of the
    two token sequences before either's first trained token (data/pairs.py refuses pairs whose
    prompts render differently, so that is the whole prompt)."""
    n = len(features)
    ids, labels, positions, pair_of, kind = [], [], [], [], []
    q_lens, k_lens, kv_index = [], [], []
    chosen, rejected = [], []  # (row position, target, sample) per trained token
    for i, f in enumerate(features):
        c_ids, c_lab, r_ids, r_lab = f["input_ids"], f["labels"], f["rejected_input_ids"], f["rejected_labels"]
        limit = min(_untrained(c_lab), _untrained(r_lab))
        shared = next((k for k in range(limit) if c_ids[k] != r_ids[k]), limit)
        base, c_len, r_len = len(ids), len(c_ids) - shared, len(r_ids) - shared
        prompt = list(range(base, base + shared))
        c_start, r_start = base + shared, base + shared + c_len
        ids += c_ids + r_ids[shared:]
        labels += [IGNORE] * shared + list(c_lab[shared:]) + list(r_lab[shared:])
        positions += list(range(len(c_ids))) + list(range(shared, len(r_ids)))
        pair_of += [i] * (shared + c_len + r_len)
        kind += [0] * shared + [1] * c_len + [2] * r_len
        for seq, lab, start, out, sample in ((c_ids, c_lab, c_start, chosen, i), (r_ids, r_lab, r_start, rejected, n + i)):
            for q in range(len(seq) - 1):
                if lab[q + 1] != IGNORE:
                    out.append((base + q if q < shared else start + q - shared, lab[q + 1], sample))
        for length, keys in ((shared, prompt), (c_len, prompt + list(range(c_start, r_start))),
                             (r_len, prompt + list(range(r_start, r_start + r_len)))):
            if length:
                q_lens.append(length)
                k_lens.append(len(keys))
                kv_index += keys
    trained = chosen + rejected
    as_row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
    cumulative = lambda xs: torch.tensor([0] + xs, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # noqa: E731
    row = {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions),
           "trained_positions": torch.tensor([t[0] for t in trained], dtype=torch.long),
           "targets": torch.tensor([t[1] for t in trained], dtype=torch.long),
           "sequence": torch.tensor([t[2] for t in trained], dtype=torch.long), "pairs": torch.tensor(n)}
    if varlen:
        row.update(cu_seq_lens_q=cumulative(q_lens), cu_seq_lens_k=cumulative(k_lens), max_length_q=max(q_lens),
                   max_length_k=max(k_lens), kv_index=torch.tensor(kv_index, dtype=torch.long))
    else:
        row.update(segment_pair=torch.tensor(pair_of, dtype=torch.long), segment_kind=torch.tensor(kind, dtype=torch.long))
    return row


# Keys of a batch that are not the model's inputs.
NOT_MODEL_INPUTS = ("labels", "trained_positions", "sequence", "pairs", "preference_label", "targets",
                    "segment_pair", "segment_kind")


def model_inputs(batch: dict) -> dict:
    """The batch without what only the loss reads."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
