"""Preference losses (DPO's sigmoid, IPO, ORPO, SimPO, KTO) on one packed pass of a step's samples.

The samples of a step (data/collate.py PreferenceCollator: chosen then rejected, or KTO's replies then
their mismatched "KL" samples) are one packed row; the output layer runs only on the trained positions,
in chunks (as the SFT loss in model/loss.py), and each sample's log-probability is the sum over its
trained reply tokens (end-of-turn included). The reference is the same weights with the adapter
disabled (peft's `disable_adapter()`) or the frozen starting adapter: never a second copy of the model.

The formulas are TRL 1.16's (trl/trainer/dpo_trainer.py for sigmoid and ipo,
trl/experimental/cpo for simpo, trl/experimental/orpo for orpo's odds ratio, trl/trainer/kto_trainer.py
for kto); tests/unit/model/test_preference.py checks loss, rewards and LoRA gradients against TRL.
Written here rather than called from TRL because TRL computes them from padded [chosen; rejected]
batches with its own forward (`fused_lm_head`), where chatlora has one packed row and chunked head.
"""

from __future__ import annotations

import contextlib
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chatlora.config.preference import PreferenceConfig
from chatlora.data.collate import model_inputs
from chatlora.model.loss import causal_lm, chunk_rows, hidden_states_out, separable_head

# Losses that compare against a reference model; orpo and simpo are reference-free.
WITH_REFERENCE = ("sigmoid", "ipo", "kto")


def _chunk_logps(hidden, weight, bias, targets):
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def shared_prompt_mask(pair: torch.Tensor, kind: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive [1, 1, T, T] mask of a row packed with shared prompts (data/collate.py pack_shared):
    a token sees the earlier tokens of its own pair that are prompt or of its own kind."""
    at = torch.arange(pair.shape[0], device=pair.device)
    sees = (pair[:, None] == pair[None, :]) & (at[None, :] <= at[:, None]) & ((kind[None, :] == 0) | (kind[None, :] == kind[:, None]))
    mask = torch.zeros(sees.shape, dtype=dtype, device=pair.device).masked_fill_(~sees, torch.finfo(dtype).min)
    return mask[None, None]


def token_logps(model, batch: dict) -> torch.Tensor:
    """Log-probability of each trained token of a packed row (PackCollator, or pack_shared with its
    explicit targets), in trained-position order."""
    keep = batch["trained_positions"]
    targets = batch["targets"] if "targets" in batch else batch["labels"][0, 1:][keep]
    inputs = model_inputs(batch)
    if "segment_pair" in batch:
        dtype = causal_lm(model).get_input_embeddings().weight.dtype
        inputs["attention_mask"] = shared_prompt_mask(batch["segment_pair"], batch["segment_kind"], dtype)
    head = separable_head(model)
    if head is None:
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits[0].float()
        return -F.cross_entropy(logits, targets, reduction="none")
    with hidden_states_out(model, head):
        hidden = model(**inputs, logits_to_keep=keep, use_cache=False).logits[0]
    rows = chunk_rows(head.weight.shape[0])
    parts = [checkpoint(_chunk_logps, hidden[i : i + rows], head.weight, head.bias, targets[i : i + rows], use_reentrant=False)
             for i in range(0, hidden.shape[0], rows)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probabilities, trained tokens) of each sample of the row."""
    per_token = token_logps(model, batch)
    samples = 2 * int(batch["pairs"])
    sums = per_token.new_zeros(samples).index_add(0, batch["sequence"], per_token)
    counts = torch.bincount(batch["sequence"], minlength=samples).to(per_token.dtype)
    return sums, counts


# The frozen copy of a starting adapter (the SFT run's), where one is kept: TRL's name for it too.
REFERENCE_ADAPTER = "ref"


@contextlib.contextmanager
def as_reference(model):
    """The model as the reference: its frozen starting adapter where it holds one, else its base
    weights (adapter disabled). No weights are copied for the second; the first copies LoRA only."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config is None:
        yield
    elif REFERENCE_ADAPTER in peft_config:
        active = model.active_adapter
        model.set_adapter(REFERENCE_ADAPTER)
        try:
            yield
        finally:
            model.set_adapter(active)
    else:
        with model.disable_adapter():
            yield


@torch.no_grad()
def reference_logps(model, batch: dict) -> torch.Tensor:
    """The samples' log-probabilities under the reference (`as_reference`), computed at each step: the
    reference pass is a forward without gradients (about a third of a LoRA step's work), and
    caching it would cost a pass over the data before training and a column kept in step with it."""
    was = model.training
    model.eval()  # the reference is deterministic: no LoRA dropout in its pass
    try:
        with as_reference(model):
            return sequence_logps(model, batch)[0]
    finally:
        model.train(was)


def preference_loss(model, batch: dict, settings: PreferenceConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss over the step's pairs or KTO rows, metrics: rewards/chosen, rewards/rejected,
    rewards/margins, rewards/accuracies; detached, on the device)."""
    logps, counts = sequence_logps(model, batch)
    n = int(batch["pairs"])
    ref = reference_logps(model, batch) if settings.loss in WITH_REFERENCE else None
    if settings.loss == "kto":
        return _kto(logps, ref, batch["preference_label"], settings)
    chosen, rejected = logps[:n], logps[n:]
    chosen_nll = -chosen.sum() / counts[:n].sum()  # the chosen replies' token loss: orpo's, and sft_weight's
    beta = settings.beta
    if settings.loss in ("sigmoid", "ipo"):
        chosen_ratio, rejected_ratio = chosen - ref[:n], rejected - ref[n:]
        if settings.loss == "sigmoid":
            losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
        else:  # TRL's IPO: log-ratios averaged per token
            delta = chosen_ratio / counts[:n].clamp(min=1) - rejected_ratio / counts[n:].clamp(min=1)
            losses = (delta - 1 / (2 * beta)) ** 2
        chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        loss = losses.mean()
        if settings.sft_weight:
            loss = loss + settings.sft_weight * chosen_nll
    else:  # reference-free, on the mean log-probability per token
        chosen_mean, rejected_mean = chosen / counts[:n], rejected / counts[n:]
        if settings.loss == "simpo":
            losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - settings.simpo_gamma)
            loss = losses.mean()
        else:  # orpo: the chosen replies' token loss, minus beta times the log odds ratio term
            log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
            loss = chosen_nll - (beta * F.logsigmoid(log_odds)).mean()
        chosen_reward, rejected_reward = beta * chosen_mean.detach(), beta * rejected_mean.detach()
    return loss, _metrics(chosen_reward, rejected_reward)


def _kto(logps, ref, label, settings: PreferenceConfig):
    n = label.shape[0]
    ratio = logps[:n] - ref[:n]
    kl = (logps[n:] - ref[n:]).mean().detach().clamp(min=0)
    beta = settings.beta
    chosen, rejected = ratio[label], ratio[~label]
    losses = torch.cat([settings.desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
                        settings.undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))])
    # A batch may hold rows of one label only: its other reward is left out, not logged as NaN.
    metrics = {key: value for key, value in _metrics(beta * chosen.detach(), beta * rejected.detach(), paired=False).items()
               if not (key == "rewards/chosen" and chosen.numel() == 0 or key == "rewards/rejected" and rejected.numel() == 0)}
    metrics["kl"] = kl
    return losses.mean(), metrics


def _metrics(chosen: torch.Tensor, rejected: torch.Tensor, paired: bool = True) -> dict[str, torch.Tensor]:
    out = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean()}
    if paired:  # margins and accuracy are per pair
        out["rewards/margins"] = (chosen - rejected).mean()
        out["rewards/accuracies"] = (chosen > rejected).float().mean()
    return out


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (as TRL's log1mexp)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
