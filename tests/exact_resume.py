"""The run every interrupted one must equal, shared by e2e/test_resume.py and
e2e/test_resume_cli.py: its settings, and a bit-for-bit comparison with it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from chatlora.trainer.plot import read_metrics
from conftest import losses

# 10 rows, 4 per optimizer step in 2 micro-batches: steps cross epoch boundaries mid-batch, dropout
# draws random numbers, and checkpoints come every 2 steps.
SETTINGS = ["training.max_steps=6", "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2",
            "lora.dropout=0.1", "training.save_strategy=steps", "training.save_steps=2"]


def adapter(run_path: Path) -> dict[str, torch.Tensor]:
    return load_file(run_path / "adapter" / "adapter_model.safetensors")


def assert_same_as(reference, run_path: Path) -> None:
    """Bit for bit: the same loss at every step (each logged once), the same adapter tensors."""
    assert losses(run_path) == reference["losses"]
    assert [r["step"] for r in read_metrics(run_path / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    got = adapter(run_path)
    assert got.keys() == reference["adapter"].keys()
    for key, tensor in reference["adapter"].items():
        assert torch.equal(got[key], tensor), key


class SignalAt(TrainerCallback):
    """Sends this process a real signal at the end of one step, as a scheduler or a user would."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)
