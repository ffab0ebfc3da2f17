"""Nothing lost: exact resume, preemption by signal, a kill in the middle of a save, a disk that refuses
a write, and resuming with another config or other data refused by name. All on the tiny model,
compared bit for bit with one uninterrupted run (exact_resume.py). The command line in a subprocess
(SIGTERM, a kill during a save, a refused write): e2e/test_resume_cli.py."""

from __future__ import annotations

import json
import math
import shutil
import signal
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatlora.errors import EXIT_PREEMPTED, Preempted, ResumeError
from chatlora.run import complete_checkpoints
from chatlora.trainer.lifecycle.checkpoint import STAGING
from chatlora.trainer.plot import read_metrics
from conftest import FIXTURES, losses, quiet_train, tiny_config
from exact_resume import SETTINGS, SignalAt, adapter, assert_same_as
from snapshot import snapshot


@pytest.fixture(scope="module")
def reference(uninterrupted_run):
    """The uninterrupted run every interrupted one must equal (conftest: trained once per session)."""
    return uninterrupted_run


def test_three_steps_then_resume_then_three_equal_six(reference, tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, *SETTINGS)
    with pytest.raises(Preempted) as stopped:
        quiet_train(cfg, callbacks=[SignalAt(3)])
    run = tmp_path / "run"
    assert "SIGTERM at step 3 of 6" in str(stopped.value) and "resume=auto" in str(stopped.value)
    assert stopped.value.exit_code == EXIT_PREEMPTED == 75
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["checkpoint-2", "checkpoint-3"]
    assert not (run / "adapter").exists(), "a stopped run has no final adapter"
    assert losses(run) == reference["losses"][:3]

    resumed = quiet_train(tiny_config(tiny_model_dir, tmp_path, *SETTINGS, "resume=auto"))
    assert resumed.path == run
    assert_same_as(reference, run)
    assert not (run / "checkpoints" / STAGING).exists()


def test_streamed_data_stops_and_resumes_onto_the_same_samples(reference, tiny_model_dir, tmp_path):
    """data.streaming, stopped at step 3 and resumed: the same losses and adapter as the uninterrupted
    run of the same rows read into memory (the streamed samples are those samples, in that order)."""
    cfg = tiny_config(tiny_model_dir, tmp_path, *SETTINGS, "data.streaming=true")
    with pytest.raises(Preempted):
        quiet_train(cfg, callbacks=[SignalAt(3)])
    assert losses(tmp_path / "run") == reference["losses"][:3]
    quiet_train(tiny_config(tiny_model_dir, tmp_path, *SETTINGS, "data.streaming=true", "resume=auto"))
    assert_same_as(reference, tmp_path / "run")


def test_a_first_ctrl_c_saves_and_a_finished_run_is_not_trained_again(reference, tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, *SETTINGS)
    with pytest.raises(Preempted, match="SIGINT at step 1 of 6"):
        quiet_train(cfg, callbacks=[SignalAt(1, signal.SIGINT)])
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-1"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handler is put back"
    quiet_train(tiny_config(tiny_model_dir, tmp_path, *SETTINGS, "resume=auto"))
    assert_same_as(reference, tmp_path / "run")
    before = snapshot(tmp_path / "run")
    lines: list[str] = []
    from chatlora.recipes.train import train

    train(tiny_config(tiny_model_dir, tmp_path, *SETTINGS, "resume=auto"), echo=lines.append)
    assert any("has finished" in line and "nothing to do" in line for line in lines)
    assert snapshot(tmp_path / "run") == before


def test_resume_by_path_of_a_finished_run_is_refused_and_changes_nothing(tiny_model_dir, tmp_path):
    # As resume=auto leaves a finished run alone, so does resume=PATH: its checkpoints could only train
    # the same adapter again (and Trainer resumed at the last step trained one step past it).
    run = quiet_train(tiny_config(tiny_model_dir, tmp_path, *SETTINGS, "training.max_steps=2")).path
    before = snapshot(run)
    for target in (run, run / "checkpoints" / "checkpoint-2"):
        with pytest.raises(ResumeError) as refusal:
            quiet_train(tiny_config(tiny_model_dir, tmp_path, *SETTINGS, "training.max_steps=2", f"resume={target}"))
        message = str(refusal.value)
        assert f"the run in {run} has finished" in message and "nothing to train" in message, message
        assert "resume_allow_changes=true and a higher training.max_steps" in message, message
        assert snapshot(run) == before, f"resume={target} changed the finished run"


def test_a_run_killed_after_its_last_checkpoint_finishes_as_the_uninterrupted_one(tiny_model_dir, tmp_path):
    # Killed once the checkpoint of its last step was saved but before adapter/ was written. Step 2 is
    # in the middle of the first epoch (3 steps): transformers' Trainer, resumed there, skips the
    # batches already trained and then trains a step 3 before its end-of-step check stops it. A
    # constant learning rate, so that a step 3 would also change the adapter.
    settings = [*SETTINGS, "training.max_steps=2", "training.lr_scheduler_type=constant"]
    run = quiet_train(tiny_config(tiny_model_dir, tmp_path, *settings)).path
    uninterrupted = {"losses": losses(run), "adapter": adapter(run)}
    shutil.rmtree(run / "adapter")
    quiet_train(tiny_config(tiny_model_dir, tmp_path, *settings, "resume=auto"))
    assert losses(run) == uninterrupted["losses"], "no step past max_steps is trained"
    got = adapter(run)
    assert got.keys() == uninterrupted["adapter"].keys()
    for key, tensor in uninterrupted["adapter"].items():
        assert torch.equal(got[key], tensor), key


def test_resume_with_another_config_or_data_is_refused_by_name(reference, tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, *SETTINGS)
    with pytest.raises(Preempted):
        quiet_train(cfg, callbacks=[SignalAt(2)])
    run = tmp_path / "run"
    before = snapshot(run)
    rows = json.loads((FIXTURES / "alpaca.json").read_text())
    rows[3]["output"] += " Truly."
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(rows))
    refused = {
        ("training.learning_rate=0.02",): ["training.learning_rate: 0.01 -> 0.02"],
        ("lora.r=8", "lora.alpha=16"): ["lora.r: 4 -> 8", "lora.alpha: 8.0 -> 16.0"],
        (f"data.train={edited}",): ["the tokenized training data"],
        ("data.max_length=100",): ["data.max_length: 128 -> 100", "the tokenized training data"],
    }
    for overrides, named in refused.items():
        with pytest.raises(ResumeError) as refusal:
            quiet_train(tiny_config(tiny_model_dir, tmp_path, *SETTINGS, *overrides, "resume=auto"))
        message = str(refusal.value)
        assert f"cannot resume from {run / 'checkpoints' / 'checkpoint-2'}" in message
        assert all(line in message for line in named), (overrides, message)
        assert "resume_allow_changes=true" in message
        assert snapshot(run) == before, f"a refused resume ({overrides}) changed the run folder"

    # What does not change the steps taken is no change: the same rows from another path, logging,
    # saving, how batches are copied (a GPU machine copies them without waiting: recipes/train.py),
    # which kernels run (on this CPU, model.kernels=liger is ignored with a note).
    moved = tmp_path / "moved.json"
    shutil.copy(FIXTURES / "alpaca.json", moved)
    quiet_train(tiny_config(tiny_model_dir, tmp_path, *SETTINGS, f"data.train={moved}", "training.save_steps=3",
                            "report.compare=0", "training.accelerator_config.non_blocking=true", "model.kernels=liger", "resume=auto"))
    assert_same_as(reference, run)


def test_resume_allow_changes_goes_on_and_says_what_changed(tiny_model_dir, tmp_path):
    from chatlora.recipes.train import train

    quiet_train(tiny_config(tiny_model_dir, tmp_path, *SETTINGS, "training.max_steps=2"))
    lines: list[str] = []
    run = train(tiny_config(tiny_model_dir, tmp_path, *SETTINGS, "training.max_steps=4", "resume_allow_changes=true",
                            f"resume={tmp_path / 'run'}"), echo=lines.append)
    assert "warning: resuming with a change (resume_allow_changes=true): training.max_steps: 2 -> 4" in lines
    assert [r["step"] for r in read_metrics(run.metrics) if "loss" in r] == [1, 2, 3, 4]


def nan_config(folder: Path, model_dir: Path, training: str) -> Path:
    """A 6-step run whose learning rate of 1e30 makes step 1's update overflow the weights: step 2's
    loss and every later one are NaN. `training`: more training settings, YAML flow style."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny.yaml"
    config.write_text(textwrap.dedent(f"""\
        name: tiny
        model: {{name: {model_dir}}}
        data: {{train: {FIXTURES / 'alpaca.json'}, max_length: 128}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        training: {{per_device_train_batch_size: 2, max_steps: 6, max_grad_norm: 0, learning_rate: 1.0e+30, {training}}}
        """))
    return config


@pytest.mark.parametrize("late", [False, True], ids=["read-at-once", "read-late"])
def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, capsys, monkeypatch, late):
    from chatlora.cli import main
    from chatlora.trainer import guard

    # read-late: the guard's GPU way on the CPU (the verdict sent to the fused optimizer on the
    # device, which skips the step there, and read by the host a step later or before a save).
    monkeypatch.setattr(guard, "reads_late", lambda args: late)
    sent = []
    original = guard.NonFiniteGuard.skipping_optimizer
    monkeypatch.setattr(guard.NonFiniteGuard, "skipping_optimizer",
                        lambda self, args: sent.append(original(self, args)) or sent[-1])

    config = nan_config(tmp_path, tiny_model_dir, "logging_steps: 1, save_strategy: steps, save_steps: 1")
    code = main(["train", str(config), f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 3
    assert "error: training stopped at step 2 of 6: the loss was NaN or inf. The weights were not updated with it." in err
    assert "keeps its last complete checkpoint, checkpoint-1" in err
    checkpoints = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in checkpoints] == ["checkpoint-1"]
    weights = load_file(checkpoints[0] / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "run" / "adapter").exists()

    # on_nonfinite=skip: every later step is skipped and counted; the weights stay step 1's.
    skip = tmp_path / "skip"
    code = main(["train", str(config), f"output_dir={skip}", "on_nonfinite=skip"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "step 6: NaN or inf loss or gradient; step skipped (5 skipped so far, on_nonfinite=skip)" in err
    assert [r["nonfinite_skipped_steps"] for r in read_metrics(skip / "metrics.jsonl") if "nonfinite_skipped_steps" in r] == [1, 2, 3, 4, 5]
    final = adapter(skip)
    for key, tensor in weights.items():
        assert torch.equal(final[key], tensor), key
    assert bool(sent) == late and all(isinstance(o, torch.optim.AdamW) for o in sent)


def test_metrics_past_the_checkpoint_and_a_torn_line_are_dropped_on_resume(tmp_path):
    from chatlora.trainer.lifecycle.folder import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.4}, {"step": 3, "loss": 2.3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # killed in mid-write
    _truncate_metrics(path, 2)
    assert read_metrics(path) == rows[:3]


def test_a_verdict_read_late_between_logs_stops_and_skips_as_one_read_at_once(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from chatlora.cli import main
    from chatlora.trainer import guard

    config = nan_config(tmp_path, tiny_model_dir, "logging_steps: 4")
    # Nothing is logged or saved at steps 2 and 3: the late guard reads step 2's NaN at step 3's
    # optimizer step, which it stops before.
    monkeypatch.setattr(guard, "reads_late", lambda args: True)
    assert main(["train", str(config), f"output_dir={tmp_path / 'stop'}"]) == 3
    assert "training stopped at step 2 of 6: the loss was NaN or inf" in capsys.readouterr().err
    # A save at step 2 (nothing logged there) reads the verdict first: no checkpoint past the bad step.
    saving = nan_config(tmp_path / "saving", tiny_model_dir, "logging_steps: 4, save_strategy: steps, save_steps: 2")
    assert main(["train", str(saving), f"output_dir={tmp_path / 'stop-saving'}"]) == 3
    assert "training stopped at step 2 of 6: the loss was NaN or inf" in capsys.readouterr().err
    assert complete_checkpoints(tmp_path / "stop-saving" / "checkpoints") == []

    finals = {}
    for late in (False, True):
        monkeypatch.setattr(guard, "reads_late", lambda args: late)
        run = tmp_path / f"skip-{late}"
        assert main(["train", str(config), f"output_dir={run}", "on_nonfinite=skip"]) == 0
        err = capsys.readouterr().err
        assert "step 2: NaN or inf loss or gradient; step skipped (1 skipped so far" in err
        assert "step 6: NaN or inf loss or gradient; step skipped (5 skipped so far" in err
        rows = read_metrics(run / "metrics.jsonl")
        counts = [r["nonfinite_skipped_steps"] for r in rows if "nonfinite_skipped_steps" in r]
        assert counts[-1] == 5 and counts == sorted(set(counts))  # read late, two skips may log as one
        assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)  # non-finite losses left out on the device
        finals[late] = adapter(run)
    for key, tensor in finals[False].items():
        assert torch.isfinite(tensor).all() and torch.equal(finals[True][key], tensor), key


def test_a_stamp_from_before_non_blocking_was_left_out_resumes():
    from chatlora.trainer.lifecycle.resume import differences

    accelerate = {"split_batches": False, "even_batches": True}
    old = {"config_hash": "a", "config": {"training.accelerator_config": {**accelerate, "non_blocking": False}}}
    new = {"config_hash": "b", "config": {"training.accelerator_config": accelerate}}
    assert differences(old, new) == []
    changed = {"config_hash": "c", "config": {"training.accelerator_config": {**accelerate, "even_batches": False}}}
    assert differences(old, changed) == [f"training.accelerator_config: {old['config']['training.accelerator_config']!r} -> "
                                         f"{changed['config']['training.accelerator_config']!r}"]
