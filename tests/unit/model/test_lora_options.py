"""The LoRA variants' settings reach peft as written, the combinations peft or chatlora cannot do are
refused by name before any weight loads, and the memory plan counts what they add. Training, exact
resume and merge of each variant: e2e/test_lora_variants.py."""

from __future__ import annotations

import pytest
import torch

from chatlora.config.lora import LoraSettings
from chatlora.errors import ConfigError
from chatlora.model.lora import add_lora
from chatlora.plan.arch import from_config
from chatlora.plan.memory import Setup, estimate
from conftest import tiny_config


@pytest.mark.parametrize("overrides, message", [
    (["lora.init=svd"], "lora.init: 'svd' is not one of default, gaussian, pissa, olora, orthogonal or pissa_niter_N"),
    (["lora.init=orthogonal", "lora.r=3"], "lora.init=orthogonal needs an even lora.r (got 3)"),
    (["lora.init=pissa", "lora.use_dora=true"], "lora.init=pissa does not work with lora.use_dora"),
    (["lora.init=olora", "lora.modules_to_save=[lm_head]"], "lora.init=olora does not work with lora.modules_to_save"),
    (["lora.plus_lr_ratio=0"], "lora.plus_lr_ratio: 0.0 must be positive"),
    (["lora.layers_to_transform=[-1]"], "lora.layers_to_transform: [-1] must list layer indices"),
    (["lora.layers_to_transform=[0]", "lora.target_modules=.*proj"], "lora.layers_to_transform needs lora.target_modules as a list"),
    (["lora.init=pissa_niter_4", "model.quantize=nf4"], "lora.init=pissa_niter_4 does not work with model.quantize=nf4"),
    (["lora.init=pissa", "distributed.strategy=fsdp2"], "lora.init=pissa does not work with distributed.strategy=fsdp2"),
    (["lora.plus_lr_ratio=16", "distributed.strategy=fsdp2"], "lora.plus_lr_ratio does not work with distributed.strategy=fsdp2"),
])
def test_refused_when_the_config_loads(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, tmp_path, *overrides)
    assert message in str(e.value)


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_settings_reach_peft(tiny_model):
    settings = LoraSettings(r=4, use_dora=True, use_rslora=True, init="gaussian", modules_to_save=["lm_head"],
                            layers_to_transform=1)
    model = add_lora(tiny_model, settings)
    config = model.peft_config["default"]
    assert (config.use_dora, config.use_rslora, config.init_lora_weights) == (True, True, "gaussian")
    assert config.layers_to_transform == [1] and set(config.modules_to_save) >= {"lm_head"}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n or "lm_head.modules_to_save" in n for n in names), names
    assert any("lora_magnitude_vector" in n for n in names)


@pytest.mark.parametrize("settings, message", [
    (LoraSettings(layers_to_transform=[2]), "lora.layers_to_transform [2]: this llama model has layers 0 to 1"),
    (LoraSettings(modules_to_save=["embed"]), "lora.modules_to_save embed: no such module in this llama model"),
])
def test_refused_for_the_model(tiny_model, settings, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        add_lora(tiny_model, settings)


def test_plan_counts_dora_layers_and_saved_modules():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    plain = from_config(config, LoraSettings(r=4))
    dora = from_config(config, LoraSettings(r=4, use_dora=True))
    # DoRA: a magnitude per output feature of q 32, k 16, v 16, o 32, gate 64, up 64, down 32, per layer
    assert dora.lora - plain.lora == 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
    assert dora.lora_outputs == 32 + 16 + 16 + 32 + 64 + 64 + 32 and dora.largest_target == 64 * 32
    one = from_config(config, LoraSettings(r=4, layers_to_transform=[1], modules_to_save=["lm_head"]))
    assert one.lora == plain.lora // 2 and one.lora_layers == 1 and one.saved == 259 * 32

    setup = Setup(dropout=False, weight_bytes=4, autocast=False)
    base = estimate(plain, setup, tokens=100, trained=40)
    with_dora = estimate(dora, Setup(dropout=False, weight_bytes=4, autocast=False, dora=True), tokens=100, trained=40)
    # two float32 outputs of every wrapped layer, per token and layer, and the magnitudes' 16 bytes each
    assert with_dora.kept - base.kept == 2 * 2 * 4 * dora.lora_outputs * 100
    assert with_dora.adapter - base.adapter == 16 * (dora.lora - plain.lora)
    saved = estimate(one, setup, tokens=100, trained=40)
    assert saved.adapter == 16 * one.lora + 4 * 4 * 259 * 32  # the head's copy, gradient and two Adam states
    dropout = Setup(dropout=True, weight_bytes=4, autocast=False)
    assert estimate(plain, dropout, 100, 40).kept - estimate(one, dropout, 100, 40).kept == 5 * plain.lora_inputs * 100


def test_lora_plus_optimizer_groups(tiny_model, tmp_path, tiny_model_dir):
    from chatlora.run import RunDir
    from chatlora.trainer.arguments import loraplus_optimizer, training_arguments

    cfg = tiny_config(tiny_model_dir, tmp_path, "lora.plus_lr_ratio=16", "training.weight_decay=0.1")
    model = add_lora(tiny_model, cfg.lora)
    optimizer = loraplus_optimizer(cfg, training_arguments(cfg, RunDir(tmp_path / "run")), model)
    lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert lr[id(p)] == pytest.approx(1e-2 * (16 if "lora_B" in name else 1)), name
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.1


def test_a_trained_output_layer_keeps_the_chunked_loss(tiny_model):
    """lora.modules_to_save=[lm_head]: the loss still runs the head outside the forward pass, in chunks
    (model/loss.py), on the trainable copy: the same loss and head gradient as the model's own logits."""
    from chatlora.model.loss import separable_head, trained_token_loss

    model = add_lora(tiny_model, LoraSettings(r=4, modules_to_save=["lm_head"]))
    copy = model.base_model.model.lm_head.modules_to_save["default"]
    assert separable_head(model) is copy
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 11, 64]])
    labels = ids.clone()
    labels[0, :3] = -100
    total, count = trained_token_loss(model, {"input_ids": ids, "labels": labels})
    total.backward()
    ours = copy.weight.grad.clone()
    copy.weight.grad = None
    logits = model(input_ids=ids).logits[0, :-1]
    reference = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
    reference.backward()
    assert int(count) == 5 and torch.allclose(total, reference, atol=1e-5)
    assert torch.allclose(ours, copy.weight.grad, atol=1e-6)
    assert model.base_model.model.get_output_embeddings() is model.base_model.model.lm_head, "the wrapper is put back"
    with model.disable_adapter():
        assert separable_head(model) is model.base_model.model.lm_head.original_module
