"""Each chat-model family, tiny (tests/families.py), through the whole train-then-merge workflow on
the CPU: a few steps of `train` on its real path (Gemma 2: padded, with the note saying why), then
`merge`, whose reloaded model must equal base + adapter. The per-module checks of each family are
in unit/model/test_families_arch.py."""

from __future__ import annotations

import pytest

from conftest import tiny_config

# one_thread and family: tests/conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_then_merging_with_parity(family, tmp_path):
    """A few steps of `train` through the family's real path (Gemma 2: padded, with the note saying
    why), then `merge`, whose reloaded model must equal base + adapter."""
    from chatlora.recipes.merge import merge
    from chatlora.recipes.train import train

    name, folder = family
    lines: list[str] = []
    run = train(tiny_config(folder, tmp_path, "training.max_steps=2"), lines.append)
    batches = next(line for line in lines if line.startswith("batches:"))
    if name == "gemma2":
        assert ("packing: off for gemma2 (attention logit soft-capping is not supported by varlen attention); "
                "padded batches instead") in lines
        assert batches.endswith("padded; attention: eager")
    else:
        assert "packed; attention: sdpa" in batches
    assert not any(line.startswith("warning:") for line in lines), lines
    result = merge(str(run.path), str(tmp_path / "merged"), device="cpu", echo=lines.append)
    assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] <= 1e-4, result
