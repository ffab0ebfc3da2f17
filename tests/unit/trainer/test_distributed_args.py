"""The rules of several processes, without launching any: the global batch split, the training
arguments per process count, the one-process world, and the resume record."""

from __future__ import annotations

import pytest
import torch

from chatlora.errors import ConfigError
from chatlora.trainer.distributed import check_resume, distributed_arguments, split_step
from chatlora.trainer.world import World
from conftest import tiny_config


@pytest.mark.parametrize("samples, processes, micro, expected", [
    (16, 1, 4, (4, 4)),   # one process: the recipe as written
    (16, 2, 4, (4, 2)),
    (16, 4, 4, (4, 1)),
    (16, 8, 4, (2, 1)),   # a share smaller than the micro-batch
    (12, 2, 4, (3, 2)),   # the largest micro-batch that divides the share of 6
    (16, 4, 1, (1, 4)),
    (7, 1, 8, (7, 1)),
])
def test_split_step(samples, processes, micro, expected):
    assert split_step(samples, processes, micro) == expected
    per, accumulation = expected
    assert per * accumulation * processes == samples and per <= micro


def test_samples_that_do_not_split_evenly_are_refused():
    with pytest.raises(ConfigError, match=r"samples_per_step=10 does not split evenly over 4 processes; use a multiple of 4 \(8, 12\)"):
        split_step(10, 4, 8)


def test_training_arguments_for_several_processes(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, "distributed.samples_per_step=32", "training.per_device_train_batch_size=4")
    kwargs = {"per_device_train_batch_size": 4}
    one = distributed_arguments(cfg, kwargs, 1)
    assert (one["per_device_train_batch_size"], one["gradient_accumulation_steps"]) == (4, 8)
    assert "ddp_find_unused_parameters" not in one
    four = distributed_arguments(cfg, kwargs, 4)
    assert (four["per_device_train_batch_size"], four["gradient_accumulation_steps"]) == (4, 2)
    assert four["ddp_find_unused_parameters"] is False
    mine = distributed_arguments(cfg, {**kwargs, "ddp_find_unused_parameters": True}, 4)
    assert mine["ddp_find_unused_parameters"] is True, "the config's training section wins"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU processes")
def test_fsdp2_on_cpu_processes_is_refused(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, "distributed.strategy=fsdp2")
    assert distributed_arguments(cfg, {}, 1)  # one process ignores the strategy
    with pytest.raises(ConfigError, match="fsdp2 needs GPUs"):
        distributed_arguments(cfg, {}, 2)


def test_a_bad_strategy_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="distributed.strategy: 'zero3' is not one of ddp, fsdp2"):
        tiny_config(tiny_model_dir, tmp_path, "distributed.strategy=zero3")


def test_one_process_world_runs_everything_in_place():
    world = World()
    assert world.main and world.local_main and world.nodes == 1
    assert world.in_turn(lambda: 7) == 7 and world.on_main(lambda: 8) == 8 and world.share("x") == "x"
    world.barrier()


def record(processes: int, strategy: str = "ddp", samples: int = 16) -> dict:
    return {"processes": processes, "nodes": 1, "strategy": strategy, "samples_per_step": samples}


def test_resume_on_the_same_processes_is_silent(tmp_path):
    from chatlora.trainer.distributed import write_record

    write_record(tmp_path, record(2))
    assert check_resume(tmp_path, record(2)) is None


def test_resume_with_ddp_on_other_processes_is_handled(tmp_path):
    from chatlora.trainer.distributed import write_record

    write_record(tmp_path, record(4))
    assert check_resume(tmp_path, record(2)) == ("resuming on 2 processes (the run began on 4): "
                                                  "the same 16 samples per step, split differently")
    assert check_resume(tmp_path / "older-run", record(2)) is not None  # no record: one process


def test_resume_that_would_change_the_training_is_refused(tmp_path):
    from chatlora.trainer.distributed import write_record

    write_record(tmp_path, record(2))
    with pytest.raises(ConfigError, match="trained with 16 samples per optimizer step, now 32.*samples_per_step=16"):
        check_resume(tmp_path, record(2, samples=32))
    write_record(tmp_path, record(4, "fsdp2"))
    with pytest.raises(ConfigError, match="FSDP2 checkpoints are sharded per process: resume it on 4 processes"):
        check_resume(tmp_path, record(2, "fsdp2"))
