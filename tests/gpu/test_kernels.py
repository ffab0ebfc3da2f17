"""`model.kernels=liger` (model/kernels.py): Liger's fused kernels for RMSNorm, RoPE and SwiGLU.

Liger's kernels are Triton, so training with them needs a GPU (marked gpu). On the CPU: the setting
is checked, and where it cannot apply training goes on with a note that says why."""

from __future__ import annotations

import pytest
import torch
import yaml

from chatlora.config.load import to_dict
from chatlora.errors import ConfigError
from chatlora.model.kernels import why_not_liger
from chatlora.run import RunDir
from conftest import losses, run_cli, tiny_config


def test_kernels_setting_lists_its_choices(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="none, liger"):
        tiny_config(tiny_model_dir, tmp_path, "model.kernels=triton")


def test_where_liger_cannot_apply_the_note_says_why(monkeypatch):
    assert why_not_liger(on_gpu=False, compile_layers=False) == "it needs a CUDA GPU"
    assert "model.compile=layers fuses" in why_not_liger(on_gpu=True, compile_layers=True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert why_not_liger(on_gpu=True, compile_layers=False) == "liger-kernel is not installed (pip install 'chatlora[liger]')"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_liger_kernels_train_as_the_models_own_code(tiny_model_dir, tmp_path, graphs):
    """10 steps of the tiny Llama in bf16 with Liger's kernels give the losses of its own code within
    bf16 rounding. The Liger run is a `chatlora train` process of its own: Liger patches transformers'
    code for the rest of the process, which would reach the tests that run after this one."""
    pytest.importorskip("liger_kernel")
    from chatlora.recipes.train import train

    common = ["model.dtype=bfloat16", "training.bf16=true", "training.max_steps=10", "training.per_device_train_batch_size=4",
              "training.learning_rate=1e-3", f"model.cuda_graphs={str(graphs).lower()}"]
    plain = train(tiny_config(tiny_model_dir, tmp_path / "plain", *common), lambda _line: None)
    config = tmp_path / "liger.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tiny_model_dir, tmp_path / "liger", *common, "model.kernels=liger"))))
    result = run_cli("train", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernels: Liger's rms_norm, rope, swiglu for llama" in result.stdout, result.stdout[-2000:]
    liger = losses(RunDir.open(tmp_path / "liger" / "run"))
    assert len(liger) == 10 and liger == pytest.approx(losses(plain), rel=2e-2)
