"""`model.compile=layers`: the decoder layers are found through wrappers and compiled one by one.
Training with them (inductor builds and runs C++ in worker processes): e2e/test_compiled_layers.py."""

from __future__ import annotations

import torch

from chatlora.model.layers import compile_layers, decoder_layers


def test_decoder_layers_are_found_through_wrappers(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layers = decoder_layers(model)
    assert layers is model.model.layers and len(layers) == model.config.num_hidden_layers
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert decoder_layers(wrapped) is layers
    assert not any(m._compiled_call_impl for m in layers)
    assert compile_layers(wrapped) == len(layers)
    assert all(m._compiled_call_impl is not None for m in layers)  # nn.Module.compile's compiled forward
    assert compile_layers(torch.nn.Linear(2, 2)) == 0  # nothing to compile: runs as it is
