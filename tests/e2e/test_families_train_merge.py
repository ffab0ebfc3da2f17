"""Each chat-model family, tiny (tests/families.py), through the whole train-then-merge workflow on
the CPU: a few steps of `train` on its real path (Gemma 2: padded, with the note saying why), then
`merge`, whose reloaded model must equal base + adapter. The per-module checks of each family are
in unit/model/test_families_arch.py."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from families import FAMILIES, save_family


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread (see unit/model/test_families_arch.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family, the folder of its tiny model)."""
    return request.param, save_family(tmp_path_factory.mktemp(request.param), request.param)


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
