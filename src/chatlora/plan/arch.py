"""A model's architecture, read from its config.json alone: the sizes the memory and speed plan need.

The parameter counts come from building the model on PyTorch's meta device, where tensors have
shapes and no storage: exact for any architecture transformers knows, with no weights read and no
memory used. The activation formulas in memory.py assume a llama-style decoder layer (attention
with q/k/v/o projections, a gated MLP, RMSNorm), which covers Qwen, Llama, Mistral, SmolLM, Gemma.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch

from chatlora.config.schema import LoraSettings, ModelConfig
from chatlora.errors import ModelError


@dataclass(frozen=True)
class Arch:
    """Sizes of a decoder-only model, in elements."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    params: int
    """All parameters (embeddings, layers, norms, output layer; a tied output layer counted once)."""
    layer_linear: int
    """Weights of the decoder layers' linear layers, all layers (what 4-bit quantization shrinks)."""
    layer_bias: int
    """Biases of those linear layers (kept in 16 bits when the weights are quantized)."""
    head: int
    """Output layer weights (vocab x hidden), run only on trained positions."""
    lora: int
    """LoRA parameters for the config's targets and rank."""
    lora_inputs: int
    """Sum of the input widths of the LoRA-wrapped linear layers of one adapted decoder layer (each
    gets its own dropout, whose output and mask are kept for backward when lora.dropout > 0)."""
    lora_outputs: int = 0
    """Sum of the output widths of those layers (DoRA keeps two outputs of each for backward)."""
    lora_layers: int = 0
    """Decoder layers with adapters (lora.layers_to_transform; all by default)."""
    largest_target: int = 0
    """Weights of the largest wrapped linear layer (DoRA builds its full updated weight for the norm)."""
    saved: int = 0
    """Parameters of lora.modules_to_save: trained in full, as copies beside the frozen originals."""


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _targeted(short: str, targets: list[str] | str) -> bool:
    if targets == "all-linear":
        return True
    if isinstance(targets, str):  # peft treats a string as a regex on the full name
        return re.fullmatch(targets, short) is not None
    return any(fnmatch.fnmatch(short, t) for t in targets)


def from_config(config, lora: LoraSettings, name: str = "") -> Arch:
    """Arch of a transformers config (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    params = sum(p.numel() for p in model.parameters())  # parameters() lists a tied weight once
    layer_linear = layer_bias = lora_params = largest = 0
    inputs: dict[int, int] = {}
    outputs: dict[int, int] = {}
    adapted: set[int] = set()
    wanted = set(lora.layers_to_transform) if lora.layers_to_transform else None
    for full, module in model.named_modules():
        index = _layer_index(full)
        if not isinstance(module, torch.nn.Linear) or module is head or index is None:
            continue
        layer_linear += module.weight.numel()
        layer_bias += module.bias.numel() if module.bias is not None else 0
        if _targeted(full.rsplit(".", 1)[-1], lora.target_modules) and (wanted is None or index in wanted):
            # DoRA adds a magnitude per output feature
            lora_params += lora.r * (module.in_features + module.out_features) + (module.out_features if lora.use_dora else 0)
            largest = max(largest, module.weight.numel())
            if not adapted or index == min(adapted):
                adapted.add(index)
                inputs[id(module)] = module.in_features
                outputs[id(module)] = module.out_features
            adapted.add(index)
    saved = {id(p): p.numel() for name in lora.modules_to_save for full, m in model.named_modules()
             if full == name or full.endswith("." + name) for p in m.parameters()}
    heads = text.num_attention_heads
    return Arch(
        name=name or getattr(text, "model_type", "model"),
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=text.intermediate_size,
        vocab=text.vocab_size,
        params=params,
        layer_linear=layer_linear,
        layer_bias=layer_bias,
        head=head.weight.numel() if head is not None else 0,
        lora=lora_params,
        lora_inputs=sum(inputs.values()),
        lora_outputs=sum(outputs.values()),
        lora_layers=len(adapted),
        largest_target=largest,
        saved=sum(saved.values()),
    )


def read_arch(source, model_cfg: ModelConfig, lora: LoraSettings) -> Arch:
    """The architecture of the configured base model from its config.json (or GGUF header), no weights.

    Raises ModelError when the config cannot be read or the model is not a decoder this plan knows.
    """
    from chatlora.model.load import model_config

    try:
        return from_config(model_config(source, model_cfg), lora, model_cfg.name)
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"could not read the architecture of {model_cfg.name!r} from its config: {str(e).splitlines()[0]}") from None
