"""The training loss with the output layer run only where a token is trained, in chunks.

A chat sample trains only its replies; the prompt's logits (vocabulary-wide: 49k for SmolLM2, 152k
for Qwen) would be computed and thrown away. `logits_to_keep` with the positions that predict a
trained token makes the model skip the rest inside its own forward, so peft and DDP hooks still
apply. While the loss runs, the output layer is swapped for an identity, so the forward returns
hidden states at those positions; the real head is then applied in chunks whose logits are
recomputed in the backward pass instead of kept, so at most one chunk of logits exists at a time.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chatlora.data.render import IGNORE

# Config attributes of models that transform logits after the head (softcapping, scaling): for
# them the head cannot be split off, and the loss uses the model's own logits.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# Elements of float32 logits in one chunk (1 GiB).
CHUNK_ELEMENTS = 2**28


def causal_lm(model):
    """The transformers model inside DDP / FSDP / peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def separable_head(model) -> torch.nn.Linear | None:
    """The output layer when logits are exactly `head(hidden)`, else None."""
    base = causal_lm(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or any(getattr(base.config, a, None) for a in LOGIT_TRANSFORMS):
        return None
    return head


@contextmanager
def hidden_states_out(model, head: torch.nn.Linear):
    base = causal_lm(model)
    base.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        base.set_output_embeddings(head)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy of `head(hidden)` against targets, one chunk of rows at a time."""
    rows = max(64, CHUNK_ELEMENTS // head.weight.shape[0])
    if hidden.shape[0] <= rows:
        return _chunk_loss(hidden, head.weight, head.bias, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], rows):
        total = total + checkpoint(_chunk_loss, hidden[i : i + rows], head.weight, head.bias, targets[i : i + rows], use_reentrant=False)
    return total


def trained_token_loss(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the cross-entropy over trained tokens, number of trained tokens)."""
    labels = inputs["labels"]
    targets = labels[:, 1:]  # position p predicts the token at p + 1
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    targets = targets[:, keep]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    head = separable_head(model)
    if head is None:
        logits = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, (targets != IGNORE).sum()
    with hidden_states_out(model, head):
        hidden = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits
    hidden, targets = hidden.flatten(0, 1), targets.flatten()
    trained = targets != IGNORE
    return chunked_cross_entropy(hidden[trained], head, targets[trained]), trained.sum()


@torch.no_grad()
def packing_is_exact(model, device=None) -> bool:
    """Whether this model keeps attention inside each sample of a packed row (restarting position_ids,
    no attention mask). Checked on the real model, because a model whose attention ignores the
    packing would silently let samples see each other."""
    from chatlora.data.collate import PackCollator

    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    a, b = [5, 17, 42, 7, 99, 3], [11, 64, 2, 19]
    packed = PackCollator()([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}])
    packed = {k: v.to(device) if torch.is_tensor(v) else v for k, v in packed.items() if k != "labels"}
    together = model(**packed, use_cache=False).logits
    alone = model(input_ids=torch.tensor([b], device=device), use_cache=False).logits
    model.train(was_training)
    scale = alone.abs().max().clamp_min(1e-6)
    return bool(((together[:, len(a):] - alone).abs().max() / scale) < 2e-2)
