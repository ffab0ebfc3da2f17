"""Damaged run folders, adapters, base models and checkpoints through the real command line: a
representative few, each must end with one `error:` paragraph naming the file, exit code 2, no
traceback, and the damaged folder left byte for byte as it was. The in-process cases:
unit/recipes/test_damaged_runs.py."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from chatlora.errors import EXIT_USER_ERROR
from conftest import FIXTURES, run_cli
from damage import ADAPTER, CHECKPOINT, RUN_DAMAGE, copy_run, cut
from snapshot import snapshot


@pytest.fixture(scope="module")
def trained(checkpointed_run) -> Path:
    """A finished run with complete checkpoints at steps 1 and 2. Read-only: cases damage copies."""
    return checkpointed_run


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
