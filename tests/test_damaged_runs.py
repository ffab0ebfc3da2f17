"""Damaged run folders, adapter folders, base models and checkpoints: a file cut short, emptied,
overwritten, edited into something else or deleted. Every command must end with one `error:`
paragraph naming the file and what to do, exit code 2, no traceback, and the damaged folder left
byte for byte as it was.

One tiny run with checkpoints is trained once; each case damages a copy of it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from chatlora.errors import EXIT_USER_ERROR, ChatloraError, ModelError, ResumeError
from conftest import FIXTURES, run_cli, tiny_config
from snapshot import snapshot

SETTINGS = ["training.max_steps=2", "training.save_strategy=steps", "training.save_steps=1"]


def quiet_train(cfg):
    from chatlora.recipes.train import train

    return train(cfg, echo=lambda _line: None)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished run with complete checkpoints at steps 1 and 2. Read-only: cases damage copies."""
    return quiet_train(tiny_config(tiny_model_dir, tmp_path_factory.mktemp("trained"), *SETTINGS)).path


def copy_run(run: Path, folder: Path, damage: Callable[[Path], None] = lambda _run: None, name: str = "") -> Path:
    copy = folder / (name or run.name)
    shutil.copytree(run, copy)
    damage(copy)
    return copy


def cut(path: Path) -> None:
    """The file cut short half way, as by a full disk or a killed copy."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


ADAPTER = Path("adapter/adapter_model.safetensors")
ADAPTER_CONFIG = Path("adapter/adapter_config.json")
# name -> (damage, the file the message must name, what it must say)
RUN_DAMAGE = {
    "zero-byte adapter": (lambda r: (r / ADAPTER).write_bytes(b""), ADAPTER, "is damaged"),
    "truncated adapter": (lambda r: cut(r / ADAPTER), ADAPTER, "is damaged"),
    "garbage adapter": (lambda r: (r / ADAPTER).write_bytes(b"\xff" * 4096), ADAPTER, "is damaged"),
    "adapter_config.json not JSON": (lambda r: (r / ADAPTER_CONFIG).write_text("{\n  broken"), ADAPTER_CONFIG, "is damaged"),
    "adapter_config.json a list": (lambda r: (r / ADAPTER_CONFIG).write_text("[]"), ADAPTER_CONFIG, "not a JSON object"),
    "no adapter_config.json": (lambda r: (r / ADAPTER_CONFIG).unlink(), ADAPTER_CONFIG, "is missing"),
    "no tokenizer/": (lambda r: shutil.rmtree(r / "tokenizer"), Path("tokenizer"), "has no tokenizer/ folder"),
    "config.yaml not YAML": (lambda r: (r / "config.yaml").write_text("model: {name: [\n"), Path("config.yaml"), "is not valid YAML"),
    "config.yaml a list": (lambda r: (r / "config.yaml").write_text("- a\n"), Path("config.yaml"), "not a valid chatlora config"),
}


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


CHECKPOINT = Path("checkpoints/checkpoint-2")
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


# Through the real command line, a representative few (each is mostly process start-up, so they run
# concurrently): name -> (make(folder, run, model) -> (args, the folder that must be left as it was),
# text the error must hold).
def _chat_truncated_adapter(folder, run, model):
    damaged = copy_run(run, folder, lambda r: cut(r / ADAPTER))
    return ["chat", str(damaged), "--prompt", "hi"], damaged


def _eval_bad_yaml(folder, run, model):
    damaged = copy_run(run, folder, RUN_DAMAGE["config.yaml not YAML"][0])
    return ["eval", str(damaged)], damaged


def _merge_adapter_config_list(folder, run, model):
    damaged = copy_run(run, folder, RUN_DAMAGE["adapter_config.json a list"][0])
    return ["merge", str(damaged), str(folder / "merged")], damaged


def _serve_no_adapter_config(folder, run, model):
    good = copy_run(run, folder, name="good")  # served under their folder names: two, not two "run"s
    damaged = copy_run(run, folder, RUN_DAMAGE["no adapter_config.json"][0])
    return ["serve", str(good), str(damaged), "--port", "0"], damaged


def _chat_on_another_base(folder, run, model):
    from conftest import save_tiny_model

    other = save_tiny_model(folder / "wider", hidden=64)  # same vocabulary and layers, other widths
    return ["chat", str(run), "--model", str(other), "--prompt", "hi"], run


def _train_truncated_base(folder, run, model):
    base = folder / "base"
    shutil.copytree(model, base)
    cut(base / "model.safetensors")
    config = folder / "tiny.yaml"
    config.write_text(f"model: {{name: {base}}}\ndata: {{train: {FIXTURES / 'alpaca.json'}, max_length: 128}}\n"
                      "training: {max_steps: 1}\n")
    return ["train", str(config), f"output_dir={folder / 'new-run'}"], base


def _resume_truncated_optimizer(folder, run, model):
    damaged = copy_run(run, folder, lambda r: (shutil.rmtree(r / "adapter"), cut(r / CHECKPOINT / "optimizer.pt")))
    config = folder / "tiny.yaml"
    config.write_text((run / "config.yaml").read_text())
    return ["train", str(config), "resume=auto", f"output_dir={damaged}"], damaged


CLI = {
    "chat, truncated adapter": (_chat_truncated_adapter, ["adapter/adapter_model.safetensors is damaged (SafetensorError",
                                                          "checkpoints/checkpoint-2 as RUN"]),
    "eval, config.yaml not YAML": (_eval_bad_yaml, ["config.yaml is not valid YAML"]),
    "merge, adapter_config.json a list": (_merge_adapter_config_list, ["adapter/adapter_config.json is damaged"]),
    "serve, no adapter_config.json": (_serve_no_adapter_config, ["adapter/adapter_config.json is missing"]),
    "chat --model, another base": (_chat_on_another_base, ["does not fit the base model", "size mismatch for", "--model"]),
    "train, truncated base weights": (_train_truncated_base, ["the weights file", "model.safetensors is damaged",
                                                              "download or copy the model again"]),
    "resume, truncated optimizer.pt": (_resume_truncated_optimizer, ["checkpoint-2: its file optimizer.pt is damaged",
                                                                     "resume=", "checkpoint-1"]),
}


@pytest.fixture(scope="module")
def cli_results(trained, tiny_model_dir, tmp_path_factory):
    jobs = {}
    for name, (make, _expect) in CLI.items():
        folder = tmp_path_factory.mktemp("cli")
        args, kept = make(folder, trained, tiny_model_dir)
        jobs[name] = (args, kept, snapshot(kept), folder)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(jobs, pool.map(lambda job: run_cli(*job[0], cwd=job[3], env={"OMP_NUM_THREADS": "1"}),
                                          jobs.values())))
    return {name: (results[name], *jobs[name]) for name in jobs}


@pytest.mark.parametrize("case", list(CLI))
def test_the_command_line_says_which_file_and_exits_2(cli_results, case):
    result, args, kept, before, folder = cli_results[case]
    err = result.stderr
    assert result.returncode == EXIT_USER_ERROR, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert all(text in errors[0] for text in CLI[case][1]), errors[0]
    assert snapshot(kept) == before, "the damaged folder was changed"
    assert not (folder / "merged").exists() and not (folder / "new-run").exists(), "nothing half-made is left"
