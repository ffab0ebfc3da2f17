"""Fused projections (chatlora.model.fuse): q/k/v and gate/up as one matmul give the model's own logits,
only plain Linear layers are fused, and undo puts the original modules back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chatlora.model.fuse import FusedProjection, fuse_projections

PROMPT = torch.tensor([[5, 17, 42, 7, 99, 3, 8, 23]])


def qwen2():  # q/k/v with bias, grouped-query attention (k and v narrower than q)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture
def llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.mark.parametrize("build", ["qwen2", "llama"])
@torch.inference_mode()
def test_fused_model_gives_the_same_logits_and_undo_restores_it(build, request):
    model = qwen2() if build == "qwen2" else request.getfixturevalue("llama")
    before = model(PROMPT).logits
    params = sum(p.numel() for p in model.parameters())
    fused, undo = fuse_projections(model)
    layers = model.config.num_hidden_layers
    assert fused == 2 * layers
    assert sum(isinstance(m, FusedProjection) for m in model.modules()) == 5 * layers
    torch.testing.assert_close(model(PROMPT).logits, before, rtol=1e-5, atol=1e-5)
    undo()
    assert not any(isinstance(m, FusedProjection) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == params
    torch.testing.assert_close(model(PROMPT).logits, before, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_lora_layers_are_left_alone(llama):
    """An unmerged adapter keeps its own forward: attention with LoRA on q and v is not fused; the MLP,
    which has no adapter, is."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    before = model(PROMPT).logits
    fused, _ = fuse_projections(model)
    assert fused == model.config.num_hidden_layers  # gate/up only
    attention = model.base_model.model.model.layers[0].self_attn
    assert not isinstance(attention.q_proj, FusedProjection) and isinstance(attention.k_proj, nn.Linear)
    torch.testing.assert_close(model(PROMPT).logits, before, rtol=1e-5, atol=1e-5)
