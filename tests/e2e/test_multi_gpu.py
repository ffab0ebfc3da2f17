"""Two GPUs of one machine: `chatlora train --gpus 2` with DDP and with FSDP2 (through accelerate, which
shards on GPUs only) trains the tiny model as one GPU does, and FSDP2 saves the adapter whole.
Skipped without 2 CUDA devices; run with `pytest -m gpu tests/e2e/test_multi_gpu.py` on such a machine.
Float32 weights, so the comparison is as tight as on the CPU (tests/e2e/test_distributed.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAINABLE, run_cli
from test_distributed import COMMON, assert_same_training, config_file, env_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]

FLOAT32 = ["model.dtype=float32"]


@pytest.fixture(scope="module")
def one_gpu(tiny_model_dir, tmp_path_factory) -> Path:
    from chatlora.recipes.train import train
    from conftest import tiny_config

    tmp = tmp_path_factory.mktemp("one-gpu")
    return train(tiny_config(tiny_model_dir, tmp, *COMMON, *FLOAT32), echo=lambda _line: None).path


# fsdp2-kept: each process makes its share of a step in 2 passes of 1 sample, and the layers keep their
# weights gathered through backward, and so from one pass to the next (trainer/fsdp.py).
KEPT = ["training.fsdp_config.reshard_after_forward=false", "training.per_device_train_batch_size=1"]


@pytest.mark.parametrize("strategy, extra", [("ddp", []), ("fsdp2", []), ("fsdp2", KEPT)], ids=["ddp", "fsdp2", "fsdp2-kept"])
def test_two_gpus_train_as_one(tiny_model_dir, tmp_path, one_gpu, strategy, extra):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = run_cli("train", "--gpus", "2", str(config_file(tiny_model_dir, tmp_path)), *COMMON, *FLOAT32,
                     f"distributed.strategy={strategy}", *extra, f"output_dir={out}", cwd=tmp_path, env=env_for(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(out, one_gpu)
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in weights.values()) == TINY_TRAINABLE, "the adapter whole, not one process's shards"
    assert result.stdout.count("step 6/6  loss ") == 1


def test_fsdp2_in_bf16(tiny_model_dir, tmp_path):
    """The GPU setting: bf16 weights and autocast, FSDP2 casting the gathered weights; the LoRA
    weights stay float32 and are saved whole and finite."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = run_cli("train", "--gpus", "2", str(config_file(tiny_model_dir, tmp_path)), *COMMON, "model.dtype=bfloat16",
                     "training.bf16=true", "distributed.strategy=fsdp2", "data.batch_tokens=200", f"output_dir={out}",
                     cwd=tmp_path, env=env_for(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in weights.values()) == TINY_TRAINABLE
    assert all(torch.isfinite(t).all() for t in weights.values())
