"""The training loss with the output layer run only where a token is trained, in chunks.

A chat sample trains only its replies; the prompt's logits (vocabulary-wide: 49k for SmolLM2, 152k
for Qwen) would be computed and thrown away. `logits_to_keep` with the positions that predict a
trained token makes the model skip the rest inside its own forward, so peft and DDP hooks still
apply. While the loss runs, the output layer is swapped for an identity, so the forward returns
hidden states at those positions; the real head is then applied in chunks whose logits are
recomputed in the backward pass instead of kept, so at most one chunk of logits exists at a time.

Why in model/: this is the one definition of the token loss, which training (trainer/trainer.py's
compute_loss), the held-out loss (evaluate/loss.py) and the memory plan's chunk size (plan/memory.py)
all use. It needs only the model and a batch, and evaluate/ sits below trainer/, so it lives below
both; it was model/loss.py, which made evaluate/ import trainer/ while trainer/ imported evaluate/.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chatlora.data.collate import model_inputs
from chatlora.data.render import IGNORE
from chatlora.model.sharding import sharded

# Config attributes of models that transform logits after the head (softcapping, scaling): for
# them the head cannot be split off, and the loss uses the model's own logits.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# Elements of float32 logits in one chunk (1 GiB).
CHUNK_ELEMENTS = 2**28
# Rows of a chunk, at least: a small vocabulary still gets chunks worth a kernel launch.
MIN_CHUNK_ROWS = 64


def chunk_rows(vocab: int) -> int:
    """Rows (positions) of one chunk of logits over a vocabulary of `vocab` tokens: the rule the
    loss runs by, and the one the memory plan (plan/memory.py) predicts the output layer's peak by."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab, 1))


def causal_lm(model):
    """The transformers model inside DDP / FSDP / torch.compile / peft wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def separable_head(model) -> torch.nn.Linear | None:
    """The output layer when logits are exactly `head(hidden)` and it can run outside the model's
    forward pass, else None."""
    base = causal_lm(model)
    head = _active_copy(base.get_output_embeddings()) if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or any(getattr(base.config, a, None) for a in LOGIT_TRANSFORMS):
        return None
    if sharded(model, [head.weight]):
        # FSDP2: each rank holds a shard of the head's weight, gathered only inside the forward
        # pass; applied outside it, the shard would be used as if it were the whole weight.
        return None
    return head


def _active_copy(head):
    """The module that computes a peft-wrapped output layer's outputs (lora.modules_to_save=[lm_head]):
    its active trainable copy, or the original when the adapters are off; any other module as it is."""
    copies = getattr(head, "modules_to_save", None)
    if not isinstance(copies, torch.nn.ModuleDict):
        return head
    if head.disable_adapters or not head.active_adapters or head.active_adapters[0] not in copies:
        return head.original_module
    return copies[head.active_adapters[0]]


# One instance for every swap: torch.compile guards on the module object, and a new Identity each
# step would make it recompile each step.
_IDENTITY = torch.nn.Identity()


@contextmanager
def hidden_states_out(model, head: torch.nn.Linear):
    base = causal_lm(model)
    original = base.get_output_embeddings()  # `head`, or the peft wrapper around it (modules_to_save)
    base.set_output_embeddings(_IDENTITY)
    try:
        yield
    finally:
        base.set_output_embeddings(original)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    # The head runs outside the model's forward, so outside accelerate's autocast, which also hands
    # back the forward's outputs in float32: match the head's own dtype (bf16 on GPU).
    return F.cross_entropy(F.linear(hidden.to(weight.dtype), weight, bias).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy of `head(hidden)` against targets, one chunk of rows at a time."""
    rows = chunk_rows(head.weight.shape[0])
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
    keep = inputs.get("trained_positions")  # found by PackCollator on the CPU
    if keep is None:  # padded rows: a search on the device (nonzero: the host waits for the labels)
        keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    targets = targets[:, keep]
    inputs = model_inputs(inputs)
    head = separable_head(model)
    if head is None:
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, (targets != IGNORE).sum()
    with hidden_states_out(model, head):
        hidden = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    hidden, targets = hidden.flatten(0, 1), targets.flatten()
    trained = targets != IGNORE
    if labels.shape[0] > 1:
        # Padded rows: a position kept for one row may be untrained in another. One packed row
        # needs no mask (every kept position is trained, or points at a position with no target,
        # which cross_entropy ignores), and selecting with one would make the host wait for the
        # whole forward pass before it could queue the output layer and backward.
        hidden, targets = hidden[trained], targets[trained]
    return chunked_cross_entropy(hidden, head, targets), trained.sum()


@torch.no_grad()
def packing_is_exact(model, device=None) -> bool:
    """Whether this model keeps each sample of a packed row to itself (restarting position_ids, no
    attention mask). Checked on the real model, because one whose attention ignores the packing
    would silently let samples see each other: the second sample's logits must not change when the
    first sample's tokens do, and must match the sample run alone (up to kernel rounding)."""
    from chatlora.data.collate import PackCollator

    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    a, other, b = [5, 17, 42, 7, 99, 3], [8, 23, 61, 2, 14, 77], [11, 64, 2, 19, 33]

    def logits_of_b(first: list[int]):
        packed = PackCollator()([{"input_ids": first, "labels": first}, {"input_ids": b, "labels": b}])
        packed = {k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs(packed).items()}
        return model(**packed, use_cache=False).logits[0, len(first):].float()

    with_a, with_other = logits_of_b(a), logits_of_b(other)
    alone = model(input_ids=torch.tensor([b], device=device), use_cache=False).logits[0].float()
    model.train(was_training)
    isolated = (with_a - with_other).norm() <= 1e-3 * with_a.norm()
    positioned = (with_a - alone).norm() <= 0.1 * alone.norm()  # other kernels round differently in bf16
    return bool(isolated and positioned)
