"""Damaged run folders, adapter folders, base models and checkpoints: a file cut short, emptied,
overwritten, edited into something else or deleted. Every command must end with one `error:`
paragraph naming the file and what to do, exit code 2, no traceback, and the damaged folder left
byte for byte as it was.

One tiny run with checkpoints is trained once (conftest's checkpointed_run); each case damages a copy
of it. The same through the real command line: e2e/test_damaged_runs_cli.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from chatlora.errors import EXIT_USER_ERROR, ChatloraError, ModelError, ResumeError
from conftest import quiet_train, tiny_config
from damage import ADAPTER, ADAPTER_CONFIG, CHECKPOINT, RUN_DAMAGE, SETTINGS, copy_run, cut
from snapshot import snapshot

@pytest.fixture(scope="module")
def trained(checkpointed_run) -> Path:
    """A finished run with complete checkpoints at steps 1 and 2. Read-only: cases damage copies."""
    return checkpointed_run


@pytest.mark.parametrize("case", list(RUN_DAMAGE))
def test_a_damaged_run_folder_names_the_file_before_the_base_model_loads(trained, tmp_path, case):
    """What chat, eval, merge, serve and web all load a run with (model/from_run.py)."""
    from chatlora.model.from_run import load_target

    damage, file, says = RUN_DAMAGE[case]
    run = copy_run(trained, tmp_path, damage)
    before = snapshot(run)
    with pytest.raises(ChatloraError) as error:
        load_target(run, device="cpu")
    message = str(error.value)
    assert error.value.exit_code == EXIT_USER_ERROR
    assert str(run / file) in message and says in message, message
    assert "\n" not in message, "one paragraph"
    if file in (ADAPTER, ADAPTER_CONFIG):  # what to do: the run's last checkpoint holds an adapter too
        assert f"give {run / 'checkpoints' / 'checkpoint-2'} as RUN" in message, message
    assert snapshot(run) == before


def test_a_damaged_extra_run_is_named_before_serving(trained, tmp_path):
    from chatlora.model.from_run import load_run

    good = copy_run(trained, tmp_path / "a")
    bad = copy_run(trained, tmp_path / "b", lambda r: cut(r / ADAPTER))
    with pytest.raises(ModelError, match=f"the adapter file {bad / ADAPTER} is damaged"):
        load_run(good, "cpu", extra_runs=[bad])


def test_a_bare_adapter_folder_with_a_damaged_file_is_named(trained, tmp_path):
    from chatlora.model.from_run import load_target

    folder = tmp_path / "my-adapter"
    shutil.copytree(trained / "adapter", folder)
    (folder / "adapter_config.json").write_text('["not", "a", "config"]')
    with pytest.raises(ModelError, match=r"my-adapter/adapter_config.json is damaged \(it holds a list, not a JSON object\); "
                                         "save or download the adapter again"):
        load_target(folder, device="cpu")


CHECKPOINT_DAMAGE = {
    "truncated optimizer.pt": (lambda c: cut(c / "optimizer.pt"), "optimizer.pt", "not a complete torch file"),
    "truncated rng_state.pth": (lambda c: cut(c / "rng_state.pth"), "rng_state.pth", "not a complete torch file"),
    "trainer_state.json not JSON": (lambda c: cut(c / "trainer_state.json"), "trainer_state.json", "JSONDecodeError"),
    "truncated adapter": (lambda c: cut(c / "adapter_model.safetensors"), "adapter_model.safetensors", "SafetensorError"),
    "stamp a list": (lambda c: (c / "chatlora_resume.json").write_text("[]"), "chatlora_resume.json", "not a JSON object"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_named_and_the_one_before_it_suggested(trained, tiny_model_dir, tmp_path, case):
    damage, file, says = CHECKPOINT_DAMAGE[case]

    def killed_before_the_adapter_then_damaged(run: Path) -> None:
        shutil.rmtree(run / "adapter")
        damage(run / CHECKPOINT)

    run = copy_run(trained, tmp_path, killed_before_the_adapter_then_damaged)
    before = snapshot(run)
    with pytest.raises(ResumeError) as error:
        quiet_train(tiny_config(tiny_model_dir, tmp_path, *SETTINGS, "resume=auto", f"output_dir={run}"))
    message = str(error.value)
    assert error.value.exit_code == EXIT_USER_ERROR
    assert f"cannot resume from {run / CHECKPOINT}: its file {file} is damaged" in message and says in message, message
    assert f"resume={run / 'checkpoints' / 'checkpoint-1'}" in message, message
    assert snapshot(run) == before


def test_the_only_checkpoint_damaged_says_how_to_start_over(trained, tiny_model_dir, tmp_path):
    def only_a_damaged_checkpoint_2(run: Path) -> None:
        shutil.rmtree(run / "adapter")
        shutil.rmtree(run / "checkpoints" / "checkpoint-1")
        cut(run / CHECKPOINT / "optimizer.pt")

    run = copy_run(trained, tmp_path, only_a_damaged_checkpoint_2)
    with pytest.raises(ResumeError, match="no earlier checkpoint is complete: start the run over"):
        quiet_train(tiny_config(tiny_model_dir, tmp_path, *SETTINGS, f"resume={run / CHECKPOINT}"))
