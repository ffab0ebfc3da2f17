"""A 4-bit NF4 base (model.quantize=nf4): loading, merging into the de-quantized base, and the errors.
bitsandbytes (>= 0.48) runs NF4 inference on a CPU, which these tests use on a tiny model; training
on a 4-bit base needs CUDA (tests/gpu/test_gpu.py). Skipped when bitsandbytes is not installed
(pip install 'chatlora[qlora]')."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

from conftest import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def qlora_run(wide_model_dir, tmp_path_factory):
    """A run trained on the 16-bit base (a CPU cannot train on a 4-bit one), then marked as trained on
    the 4-bit base: what later commands load is then exactly a 4-bit run's base + adapter."""
    import yaml

    from chatlora.recipes.train import train

    cfg = tiny_config(wide_model_dir, tmp_path_factory.mktemp("qlora"), "data.validation=0.3",
                      "training.max_steps=3", "training.learning_rate=5e-2")
    run = train(cfg, lambda _line: None)
    raw = yaml.safe_load((run.path / "config.yaml").read_text())
    raw["model"]["quantize"] = "nf4"
    (run.path / "config.yaml").write_text(yaml.safe_dump(raw))
    return run


def test_a_4bit_run_loads_its_base_in_4bit(qlora_run):
    import bitsandbytes as bnb

    from chatlora.model.from_run import load_run

    loaded = load_run(qlora_run.path, "cpu")
    layer = loaded.model.get_base_model().model.layers[0].mlp.up_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_training_on_a_4bit_base_needs_cuda(wide_model_dir, tmp_path):
    from chatlora.errors import ModelError
    from chatlora.recipes.train import train

    lines: list[str] = []
    with pytest.raises(ModelError, match="CUDA GPU only"):
        train(tiny_config(wide_model_dir, tmp_path, "model.quantize=nf4"), lines.append)
    assert any("4-bit NF4 layers" in line for line in lines)  # the plan was shown first
    assert not (tmp_path / "run").exists()


def test_random_init_is_quantized_too(wide_model_dir):
    import bitsandbytes as bnb

    from chatlora.config.schema import ModelConfig
    from chatlora.model.load import load_generation_config, load_model, load_tokenizer
    from chatlora.model.source import resolve

    cfg = ModelConfig(name=str(wide_model_dir), quantize="nf4", random_init=True)
    source = resolve(cfg)
    tokenizer = load_tokenizer(source, cfg)
    model = load_model(source, cfg, tokenizer, load_generation_config(source, cfg, tokenizer))
    assert isinstance(model.model.layers[1].self_attn.q_proj, bnb.nn.Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16


def test_merge_into_the_dequantized_base(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from chatlora.recipes.merge import merge

    run = qlora_run
    lines: list[str] = []
    out = tmp_path / "merged"
    result = merge(str(run.path), str(out), device="cpu", echo=lines.append)
    assert result["dequantized_from"] == "nf4" and result["dtype"] == "bfloat16"
    warning = [line for line in lines if line.startswith("warning: this adapter was trained on a 4-bit")]
    assert warning and f"{result['max_abs_diff']:.3g}" in warning[0]
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("Linear4bit" in type(m).__name__ for m in merged.modules())


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    import builtins

    from chatlora.errors import ModelError
    from chatlora.model import quant

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("no")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ModelError, match=r"chatlora\[qlora\]"):
        quant.require_bitsandbytes()
