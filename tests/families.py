"""Tiny models of each chat-model family users bring, built from transformers' own config classes
(2 layers, hidden 32, the byte tokenizer's 259 tokens; no hub, no weights downloaded) and saved to a
folder as tests/conftest.py saves the tiny Llama, so chatlora loads them as a user's local model.

Each keeps what sets its family apart: tied embeddings (Qwen2, Gemma), q/k norms and a head_dim of
its own (Qwen3), grouped-query attention (all but DeepSeek, whose latent attention expands to every
head), sliding windows (Gemma 2/3 alternate them with full layers; Mistral v0.1 has one on every
layer), soft-capped attention and output logits (Gemma 2), head_dim != hidden / heads
(Mistral-Nemo), experts (Mixtral, DeepSeek), fused qkv_proj and gate_up_proj (Phi-3), partial
rotary embeddings and gate_up_proj (GLM, GLM-4), multi-head latent attention (DeepSeek-V2/V3). The
windows are 8 tokens, so samples and replies of 20 tokens cross them.
"""

from __future__ import annotations

from pathlib import Path

WINDOW = 8

# family -> (transformers config class, its settings beyond the shared ones below)
FAMILIES: dict[str, tuple[str, dict]] = {
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "llama": ("LlamaConfig", {}),  # also Yi and SmolLM2
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": WINDOW}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": WINDOW, "sliding_window_pattern": 2}),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}),  # v0.1; later ones have none
    "mistral_nemo": ("MistralConfig", {"head_dim": 16, "sliding_window": None}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "phi3": ("Phi3Config", {}),
    "glm": ("GlmConfig", {"head_dim": 16}),
    "glm4": ("Glm4Config", {"head_dim": 16}),
    "deepseek_v2": ("DeepseekV2Config", {"num_key_value_heads": 4, "q_lora_rank": None, "kv_lora_rank": 16}),
    "deepseek_v3": ("DeepseekV3Config", {"num_key_value_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16}),
}
MLA_MOE = {"qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
           "n_shared_experts": 1, "moe_intermediate_size": 32, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}

# The short names of the layers chatlora's default lora.target_modules (all-linear) adapts: peft's
# every linear layer but the output layer. transformers 5 keeps the routed experts of Mixtral and
# DeepSeek as fused 3D parameters and the router as a module of its own; peft maps all-linear onto
# them as its transformers 4 meaning had it (the experts' weights and the router's, through
# target_parameters). Before peft 0.22 that mapping then adapted no MLP module of DeepSeek's (its
# dense first layers and shared experts); from 0.22 on, all-linear adapts them too (the GPU image
# still has peft 0.21, so both are checked).
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}
MOE = {"gate", "experts"}


def _deepseek_mlp() -> set[str]:
    import peft
    from packaging.version import Version

    return MLP if Version(peft.__version__) >= Version("0.22") else set()


ADAPTED = {
    "mixtral": ATTENTION | MOE,
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "glm": ATTENTION | {"gate_up_proj", "down_proj"},
    "glm4": ATTENTION | {"gate_up_proj", "down_proj"},
    "deepseek_v2": {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} | MOE | _deepseek_mlp(),
    "deepseek_v3": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} | MOE | _deepseek_mlp(),
}
# What a Llama-style list (q/k/v/o, gate/up/down) leaves unadapted in each family: named by training.
UNMATCHED = {
    "mixtral": MLP,  # its experts' weights were w1, w2, w3
    "phi3": {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"},
    "glm": {"gate_proj", "up_proj"},
    "glm4": {"gate_proj", "up_proj"},
    "deepseek_v2": {"k_proj", "v_proj"},
    "deepseek_v3": {"q_proj", "k_proj", "v_proj"},
}


def family_config(family: str, tokenizer):
    import transformers

    name, own = FAMILIES[family]
    settings = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    if family.startswith("deepseek"):
        settings.update(MLA_MOE)
    return getattr(transformers, name)(**{**settings, **own})


def save_family(folder: Path, family: str) -> Path:
    """The family's tiny model (seeded), the byte tokenizer and a generation config that stops on <|im_end|>."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from conftest import build_byte_tokenizer

    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family_config(family, tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(folder)
    return folder
