"""Wrap a base model with a LoRA adapter (peft): its variants (DoRA, rsLoRA, PiSSA/OLoRA starts,
full copies of chosen modules, chosen layers) are peft's own, set from `lora:` (config/lora.py)."""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import torch

from chatlora.config.lora import LoraSettings
from chatlora.errors import ConfigError
from chatlora.run import adapter_folder


def linear_names(model) -> list[str]:
    """Short names of the model's linear layers (what `lora.target_modules` may list)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def unmatched_targets(model, targets: list[str] | str) -> list[str]:
    """The names of a `lora.target_modules` list that adapted nothing in the peft `model`. peft adapts
    the names that match a module (its name ends with one) and says nothing of the others: a list
    written for one family ([q_proj, k_proj, v_proj, gate_proj, ...]) misses most of Phi-3's fused
    qkv_proj and gate_up_proj. (The names peft maps onto an MoE model's fused experts, which are
    parameters, not modules, leave its list of target modules: those did adapt something.)"""
    if isinstance(targets, str):  # all-linear, or a regex: peft itself refuses one that matches nothing
        return []
    kept = set(next(iter(model.peft_config.values())).target_modules or ())
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if t in kept and not any(name == t or name.endswith("." + t) for name in names)]


def add_lora(model, settings: LoraSettings, gradient_checkpointing: bool = False):
    """A peft model with only the adapter's weights trainable (and lora.modules_to_save's copies).
    Raises ConfigError for unknown targets, layers or modules to save, or for dropout on targets peft
    cannot drop out (an MoE model's fused experts)."""
    from peft import LoraConfig, TaskType, get_peft_model

    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if settings.layers_to_transform and layers is not None and max(settings.layers_to_transform) >= layers:
        raise ConfigError(f"lora.layers_to_transform {settings.layers_to_transform}: this "
                          f"{model.config.model_type} model has layers 0 to {layers - 1}")
    missing = [m for m in settings.modules_to_save if not any(n == m or n.endswith("." + m) for n, _ in model.named_modules())]
    if missing:
        raise ConfigError(f"lora.modules_to_save {', '.join(missing)}: no such module in this {model.config.model_type} "
                          f"model (e.g. {', '.join(_top_level_names(model))})")
    targets = settings.target_modules
    if settings.layers_to_transform and targets == "all-linear":
        # peft takes layers_to_transform with a list of names only: all-linear's, the linear layers
        # inside the decoder layers (the output layer is never a target).
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and re.search(r"\.\d+\.", n)})
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        init_lora_weights=True if settings.init == "default" else settings.init,
        modules_to_save=list(settings.modules_to_save) or None,
        layers_to_transform=settings.layers_to_transform,
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
        if "does not work with lora_dropout" in str(e):
            # transformers 5 keeps an MoE model's routed experts as fused 3D weights, which peft adapts
            # as parameters: their LoRA has no input of its own to drop out.
            raise ConfigError(
                f"lora.dropout={settings.dropout}: peft cannot apply dropout to the fused expert weights of this "
                f"{model.config.model_type} model, which lora.target_modules={settings.target_modules!r} adapts; "
                "set lora.dropout=0, or list target modules without the experts (e.g. [q_proj, k_proj, v_proj, o_proj])"
            ) from None
        raise


def _top_level_names(model) -> list[str]:
    """Short names of the modules outside the decoder layers (embed_tokens, norm, lm_head, ...)."""
    return sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n and not any(c.isdigit() for c in n)})


def save_initial_adapter(model, settings: LoraSettings) -> tempfile.TemporaryDirectory | None:
    """For a PiSSA/OLoRA start (lora.init), the adapter as initialised, in a temporary folder that
    `save_adapter` converts the trained adapter against; None for the other starts. Saved as peft's
    PiSSA guide says: with init_lora_weights=True in its config, so that loading it for the conversion
    does not take the components out of the base weights a second time. The start is deterministic
    (an SVD or a QR of the base weights), so a resumed run derives the same one."""
    if not settings.changes_base:
        return None
    folder = tempfile.TemporaryDirectory(prefix="chatlora-lora-init-")
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    try:
        model.save_pretrained(Path(folder.name) / "initial")
    finally:
        config.init_lora_weights = init
    return folder


def save_adapter(model, folder: Path, initial: tempfile.TemporaryDirectory | None, state=None) -> None:
    """Save the trained (active) adapter to `folder`, and no other the model holds (a preference run's
    frozen reference). After a PiSSA/OLoRA start it is converted (peft's
    `path_initial_model_for_weight_conversion`) into a plain LoRA of rank 2r over the original base
    weights, so every later command loads it over the unchanged base model."""
    # save_embedding_layers=False: only LoRA weights (and modules_to_save, which peft saves anyway) are
    # trained, so peft need not look up the base model's config to guess whether the vocabulary changed.
    extra = {"path_initial_model_for_weight_conversion": str(Path(initial.name) / "initial")} if initial else {}
    with warnings.catch_warnings():
        # The conversion loads the starting adapter beside the trained one, which peft warns about in
        # general ("changes the base weights ... should not be used with other adapters"); here it is its own step.
        warnings.filterwarnings("ignore", message=".*changes the base weights of the model.*")
        model.save_pretrained(folder, save_embedding_layers=False, state_dict=state, selected_adapters=[model.active_adapter],
                              **extra)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def start_from_adapter(model, path: str, reference: bool, gradient_checkpointing: bool = False):
    """A peft model whose trainable adapter starts as a trained one (`model.adapter`: an SFT run folder
    or an adapter folder), its LoRA settings the adapter's own. With `reference`, a frozen copy of it
    is kept as the preference losses' reference (model/preference.py: REFERENCE_ADAPTER), LoRA
    weights only. Raises ModelError for a missing or damaged adapter, or one that does not fit."""
    from peft import PeftModel

    from chatlora.model.from_run import check_adapter
    from chatlora.model.preference import REFERENCE_ADAPTER

    folder = adapter_folder(path)
    check_adapter(folder)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    model = PeftModel.from_pretrained(model, folder, is_trainable=True)
    if reference:
        model.load_adapter(folder, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    return model
