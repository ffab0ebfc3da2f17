"""The `lora:` section of a config: the adapter's shape and the LoRA variants peft offers (DoRA,
rsLoRA, PiSSA/OLoRA initialisation, LoRA+ learning rates, full copies of chosen modules). Each
setting maps onto one argument of `peft.LoraConfig` or of `peft.optimizers.create_loraplus_optimizer`;
model/lora.py builds them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from chatlora.errors import ConfigError

# lora.init values and what they change. peft also has eva, corda and loftq, which need data passes or a
# quantizer config of their own, and mica/orthogonal variants; these are the ones a config alone sets up.
INITS = ("default", "gaussian", "pissa", "olora", "orthogonal")
# Initialisations that move the base weights (W = W_res + B0 A0): the adapter saved at the end of training
# is converted into a plain LoRA of twice the rank over the original base (peft's conversion).
BASE_CHANGING = ("pissa", "olora")


@dataclass
class LoraSettings:
    r: int = 8
    """LoRA rank."""
    alpha: float = 32
    """LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.1
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt (`[q_proj, v_proj]`), or `all-linear` for every linear layer but the output."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA, peft's `use_dora`): each adapted layer also learns a magnitude per
    output feature; often better at low rank, slower per step (each pass recomputes the layers' weight
    norms) and heavier (the plan counts its extra activations). Merges like LoRA."""
    use_rslora: bool = False
    """Rank-stabilized LoRA (peft's `use_rslora`): the update is scaled by alpha / sqrt(r) instead of
    alpha / r, so a higher rank does not shrink the update."""
    init: str = "default"
    """How the adapter starts (peft's `init_lora_weights`). default: A random (Kaiming), B zero, so the
    model starts as the base. gaussian: A from a Gaussian. orthogonal: A and B orthogonal (needs an even
    r; base untouched). pissa (or pissa_niter_N, a faster randomized SVD with N iterations) and olora:
    the adapter starts from the base weights' principal (SVD) or QR components, which are taken out of
    the base weights while training; the saved adapter is converted back (peft's conversion: a plain
    LoRA of rank 2r over the original base), so chat, eval, merge and serve use it as any other.
    Checkpoints keep the unconverted adapter (peft re-derives the base when it loads one)."""
    plus_lr_ratio: float | None = None
    """LoRA+ (peft's `create_loraplus_optimizer`): the B matrices learn this many times faster than the
    A matrices, which keep training.learning_rate (the paper suggests 16; lower learning_rate a little).
    None: one learning rate for all. Not with distributed.strategy=fsdp2."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full next to the adapter and saved with it (peft's `modules_to_save`), e.g.
    `[embed_tokens, lm_head]` when the tokenizer gained tokens: each is a full trainable copy (memory:
    its weights, gradients and optimizer states; see `chatlora plan`)."""
    layers_to_transform: list[int] | int | None = None
    """Decoder layer indices to adapt (`[20, 21, 22, 23]`, or one index); None: every layer."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r: {self.r} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: {self.dropout} must be in [0, 1)")
        if not self.alpha > 0:  # alpha 0 scales the update to nothing: training would change no output
            raise ConfigError(f"lora.alpha: {self.alpha} must be positive (the update is scaled by alpha / r)")
        if not self.target_modules:
            raise ConfigError("lora.target_modules: empty; name the modules to adapt ([q_proj, v_proj]) or use all-linear")
        if self.init not in INITS and not re.fullmatch(r"pissa_niter_[1-9][0-9]*", str(self.init)):
            raise ConfigError(f"lora.init: {self.init!r} is not one of {', '.join(INITS)} or pissa_niter_N")
        if self.init == "orthogonal" and self.r % 2:
            raise ConfigError(f"lora.init=orthogonal needs an even lora.r (got {self.r})")
        if self.plus_lr_ratio is not None and not self.plus_lr_ratio > 0:
            raise ConfigError(f"lora.plus_lr_ratio: {self.plus_lr_ratio} must be positive (LoRA+ suggests 16), or null")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None and (not self.layers_to_transform or min(self.layers_to_transform) < 0):
            raise ConfigError(f"lora.layers_to_transform: {self.layers_to_transform!r} must list layer indices (0 or more), or be null")
        if self.layers_to_transform and isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ConfigError(f"lora.layers_to_transform needs lora.target_modules as a list of names or all-linear, "
                              f"not the pattern {self.target_modules!r} (peft's rule)")
        if self.changes_base and self.use_dora:
            # peft's conversion back to a plain LoRA keeps lora_A / lora_B only: DoRA's magnitudes would be lost.
            raise ConfigError(f"lora.init={self.init} does not work with lora.use_dora: peft converts the trained "
                              "adapter back to a plain LoRA, which has no DoRA magnitudes; use init=default with DoRA")
        if self.changes_base and self.modules_to_save:
            raise ConfigError(f"lora.init={self.init} does not work with lora.modules_to_save: peft's conversion of the "
                              "trained adapter keeps the LoRA matrices only; use init=default with modules_to_save")

    @property
    def changes_base(self) -> bool:
        """Whether the initialisation moves part of the base weights into the adapter (PiSSA, OLoRA)."""
        return str(self.init).startswith(BASE_CHANGING)


def check_with_model(lora: LoraSettings, quantize: str, strategy: str) -> None:
    """Refuse, when the config is loaded (before any weight), the variants that do not combine with
    the model's loading or the processes' strategy. Raises ConfigError naming both keys."""
    if lora.changes_base and quantize != "none":
        # peft would take the components out of the de-quantized weights and quantize the residual again;
        # the adapter converted back to a plain LoRA then no longer matches the 4-bit base it is used on.
        raise ConfigError(f"lora.init={lora.init} does not work with model.quantize={quantize}: it changes the base "
                          "weights, which are 4-bit here; use lora.init=default (or gaussian) for QLoRA")
    if strategy == "fsdp2" and lora.changes_base:
        raise ConfigError(f"lora.init={lora.init} does not work with distributed.strategy=fsdp2 (the conversion of the "
                          "saved adapter needs the whole starting adapter in one process); use ddp or lora.init=default")
    if strategy == "fsdp2" and lora.plus_lr_ratio is not None:
        # Trainer refuses an optimizer built before FSDP wraps the model ("Passing `optimizers` is not allowed").
        raise ConfigError("lora.plus_lr_ratio does not work with distributed.strategy=fsdp2: Trainer builds the "
                          "sharded optimizer itself; use ddp, or leave plus_lr_ratio unset")
