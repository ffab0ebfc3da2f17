"""Wrap a base model with a LoRA adapter (peft)."""

from __future__ import annotations

import torch

from chatlora.config.schema import LoraSettings
from chatlora.errors import ConfigError


def linear_names(model) -> list[str]:
    """Short names of the model's linear layers (what `lora.target_modules` may list)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def add_lora(model, settings: LoraSettings, gradient_checkpointing: bool = False):
    """A peft model with only the LoRA weights trainable. Raises ConfigError for unknown targets."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
    )
    if gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad, or no gradient reaches the adapters
        # (the tutorial's "model.enable_input_require_grads()").
        model.enable_input_require_grads()
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        if "not found" in str(e) or "Target modules" in str(e):
            raise ConfigError(
                f"lora.target_modules {settings.target_modules!r} matches no layer of this model; "
                f"its linear layers are: {', '.join(linear_names(model))}"
            ) from None
        raise


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
