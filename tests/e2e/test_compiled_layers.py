"""`model.compile=layers`, the whole toolchain on the CPU (inductor writes C++, compiles it in worker
processes and loads it): each decoder layer compiled once with symbolic sizes trains the tiny model
as eager does, and packed rows of changing lengths do not each cost a compile."""

from __future__ import annotations

import pytest

from chatlora.trainer.plot import read_metrics
from conftest import quiet_train, tiny_config


def test_compiled_layers_train_as_eager(tiny_model_dir, tmp_path):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    common = ["training.max_steps=6", "training.per_device_train_batch_size=2"]
    eager = quiet_train(tiny_config(tiny_model_dir, tmp_path / "eager", *common))
    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics

    dynamo.reset()
    counters.clear()
    clear_compilation_metrics()  # dynamo.reset() keeps the record of earlier compiles
    fast = quiet_train(tiny_config(tiny_model_dir, tmp_path / "compiled", *common, "model.compile=layers"))
    losses = [[r["loss"] for r in read_metrics(run.metrics) if "loss" in r] for run in (eager, fast)]
    assert len(losses[1]) == 6
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    # Six steps of packed rows of different lengths, forward and backward: one graph, shared by every
    # layer (the first layer's input is made to need a gradient, as the others' do) and every length
    # (whole-model compiling made one per length), and none for the packing check, which runs before
    # the layers compile.
    assert counters["stats"]["unique_graphs"] == 1
    # ... traced once: no trace thrown away and redone (model/layers.py, `compile_settings`).
    assert all(not m.restart_reasons for m in get_compilation_metrics()), [m.restart_reasons for m in get_compilation_metrics()]
    dynamo.reset()
