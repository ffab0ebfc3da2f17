"""chatlora's FSDP2 parts on 2 CPU processes (gloo): the loss on a sharded model, the adapter gathered
whole, generation that keeps both processes stepping. See tests/e2e/fsdp2_worker.py for what runs.

Trainer reaches FSDP2 through accelerate, which shards on GPUs only: the whole `chatlora train
distributed.strategy=fsdp2` path is tests/e2e/test_multi_gpu.py (marked gpu).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_TRAINABLE

WORKER = Path(__file__).parent / "fsdp2_worker.py"


@pytest.fixture(scope="module")
def fsdp2(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(WORKER), str(tiny_model_dir), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_loss_on_the_sharded_model_equals_one_process(fsdp2):
    result = json.loads((fsdp2 / "result.json").read_text())
    assert result["sharded"]
    # The head is applied inside the forward pass when sharded (its weight is gathered only there).
    assert result["head_split_reference"] and not result["head_split_when_sharded"]
    assert len(result["losses"]) == 4
    assert result["losses"] == pytest.approx(result["reference_losses"], rel=1e-5)


def test_held_out_loss_on_the_sharded_model_equals_one_process(fsdp2):
    """Each process evaluates its share in lockstep (uneven batches and passes: a hang otherwise);
    the loss of the whole set equals the unsharded model's on all of it."""
    result = json.loads((fsdp2 / "result.json").read_text())
    assert result["held_out"] == pytest.approx(result["held_out_reference"], rel=1e-5)


def test_the_adapter_is_saved_whole(fsdp2):
    """Each process holds half of every LoRA weight; the saved adapter has every weight whole, equal
    to the one trained in a single process."""
    from safetensors.torch import load_file

    result = json.loads((fsdp2 / "result.json").read_text())
    for name, local in result["local_shapes"].items():
        full = result["full_shapes"][name]
        assert local[0] * 2 == full[0] and local[1:] == full[1:], name  # what saving shards would keep
    saved = load_file(fsdp2 / "sharded" / "adapter_model.safetensors")
    reference = load_file(fsdp2 / "reference" / "adapter_model.safetensors")
    assert saved.keys() == reference.keys() and len(saved) == len(result["full_shapes"])
    assert sum(t.numel() for t in saved.values()) == TINY_TRAINABLE
    for key in saved:
        assert saved[key].shape == reference[key].shape
        assert (saved[key] - reference[key]).norm() <= 1e-5 * reference[key].norm(), key
    config = json.loads((fsdp2 / "sharded" / "adapter_config.json").read_text())
    assert config["r"] == 4


def test_generation_keeps_every_process_stepping(fsdp2):
    """Process 0 wants 3 new tokens, process 1 wants 8: process 0 must go on taking part in the
    forward passes (each gathers weights from both) until process 1 is done."""
    first, second = json.loads((fsdp2 / "result.json").read_text())["generation"]
    assert first["forwards"] == second["forwards"] == 8
    assert first["tokens"] <= 3 and second["tokens"] <= 8


def test_clipping_and_the_finite_check_on_local_shards_equal_torch_on_whole_gradients(fsdp2):
    """ChatTrainer clips FSDP2 gradients from each process's shards and one all-reduce (torch's own
    clipping goes tensor by tensor through DTensor: about 1 s of CPU per step on a 7B model)."""
    clip = json.loads((fsdp2 / "result.json").read_text())["clip"]
    assert clip["grouped"]
    assert clip["norm"] == pytest.approx(clip["expected"], rel=1e-5)
    assert clip["scaled"] < 1e-5  # every gradient scaled to half: clipped to half the norm
    assert clip["finite"] and not clip["finite_with_nan"]
    uneven = json.loads((fsdp2 / "result.json").read_text())["uneven_clip"]
    assert uneven["empty_shard"]  # 1 row over 2 processes: one holds nothing of it
    assert uneven["norm"] == pytest.approx(uneven["expected"], rel=1e-5) and uneven["scaled"] < 1e-5


def test_a_step_of_several_passes_gathers_the_weights_once(fsdp2):
    """Units that keep their weights gathered through backward (reshard_after_forward=false) keep
    them from one pass of a step to the next (trainer/fsdp.py): a step of 2 passes gathers each
    unit's weights once, not twice, shards them after its last pass, and computes the gradients of
    the step in one pass."""
    passes = json.loads((fsdp2 / "result.json").read_text())["passes"]
    units = passes["layers"] + 1  # each decoder layer and the root
    assert passes["units"] == units
    assert passes["units_resharded_after_forward"] == 1  # layers sharded again after forward (the default): the root alone
    assert passes["one_pass_gathers"] == units
    assert passes["plain_gathers"] == 2 * units
    assert passes["kept_gathers"] == units
    assert passes["plain_sharded_after_each_pass"] == [True, True]
    assert passes["kept_sharded_after_each_pass"] == [False, True]
    assert passes["kept_vs_one_pass"] < 1e-5 and passes["plain_vs_one_pass"] < 1e-5
