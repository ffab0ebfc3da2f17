"""The training loss with the output layer run only where a token is trained.

A chat sample trains only its replies; the prompt's logits (vocabulary-wide: 49k for SmolLM2,
152k for Qwen) would be computed and thrown away. `logits_to_keep` with the positions that predict
a trained token makes the model's own head skip the rest, inside its forward, so peft, DDP hooks
and model-specific logit scaling all still apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatlora.data.render import IGNORE


def trained_token_loss(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the cross-entropy over trained tokens, number of trained tokens)."""
    labels = inputs["labels"]
    targets = labels[:, 1:]  # logits at position p predict the token at p + 1
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits
    targets = targets[:, keep]
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (targets != IGNORE).sum()


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
    together = model(input_ids=packed["input_ids"].to(device), position_ids=packed["position_ids"].to(device), use_cache=False).logits
    alone = model(input_ids=torch.tensor([b], device=device), use_cache=False).logits
    model.train(was_training)
    scale = alone.abs().max().clamp_min(1e-6)
    return bool(((together[:, len(a):] - alone).abs().max() / scale) < 1e-2)
