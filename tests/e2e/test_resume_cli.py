"""Nothing lost through the real command line: SIGTERM to `chatlora train` saves, exits 75 and
resumes exactly; a SIGKILL in the middle of a save and a disk that refuses a write lose nothing.
Compared bit for bit with one uninterrupted run (exact_resume.py); the in-process cases:
e2e/test_resume.py."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chatlora.errors import EXIT_PREEMPTED, EXIT_STORAGE
from chatlora.run import STAMP, complete_checkpoints
from chatlora.trainer.lifecycle.checkpoint import STAGING
from conftest import FIXTURES, quiet_train, tiny_config
from exact_resume import SETTINGS, assert_same_as
from snapshot import snapshot


@pytest.fixture(scope="module")
def reference(uninterrupted_run):
    """The uninterrupted run every interrupted one must equal (conftest: trained once per session)."""
    return uninterrupted_run


def write_config(folder: Path, model_dir: Path) -> Path:
    """tiny_config with SETTINGS as a YAML file, for the command line."""
    config = folder / "tiny.yaml"
    config.write_text(textwrap.dedent(f"""\
        name: tiny
        model: {{name: {model_dir}}}
        data: {{train: {FIXTURES / 'alpaca.json'}, max_length: 128}}
        lora: {{r: 4, alpha: 8, dropout: 0.1}}
        training: {{per_device_train_batch_size: 2, gradient_accumulation_steps: 2, max_steps: 6, learning_rate: 1.0e-2,
                    logging_steps: 1, save_strategy: steps, save_steps: 2}}
        """))
    return config


def test_sigterm_to_the_cli_saves_exits_75_and_resumes_exactly(reference, tiny_model_dir, tmp_path, capsys):
    from chatlora.cli import main

    config = write_config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "chatlora", "train", str(config), f"output_dir={run}"], cwd=tmp_path,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line.startswith("step 1/6"):
            # Paused while the signal is sent, so it lands mid-training however fast the steps are.
            child.send_signal(signal.SIGSTOP)
            child.send_signal(signal.SIGTERM)
            child.send_signal(signal.SIGCONT)
            break
    out, err = child.communicate(timeout=300)
    assert child.returncode == EXIT_PREEMPTED, err
    assert "Traceback" not in err
    assert "SIGTERM: saving a checkpoint at the end of this step" in err
    stopped = [line for line in err.splitlines() if line.startswith("stopped: SIGTERM at step ")]
    assert stopped and f"resume=auto output_dir={run}" in stopped[0], err
    step = int(stopped[0].split()[4])
    assert 1 <= step < 6
    assert f"checkpoint-{step}" in [p.name for p in complete_checkpoints(run / "checkpoints")]
    assert not (run / "adapter").exists()

    assert main(["train", str(config), f"output_dir={run}", "resume=auto"]) == 0  # the CLI again, in this process
    assert f"resuming from {run / 'checkpoints' / f'checkpoint-{step}'} (step {step})" in capsys.readouterr().out
    assert_same_as(reference, run)


# Run in a child: the real CLI, killed with SIGKILL (nothing can catch it) while it writes the
# optimizer state of checkpoint-4, after the adapter of that checkpoint is already on disk.
KILL_IN_SAVE = """
import os, signal, sys
import torch
from chatlora.cli import main

real_save = torch.save
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if "checkpoint-4" in str(f) and str(f).endswith("optimizer.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
sys.exit(main(sys.argv[1:]))
"""


def _file_size_limit(limit: int):
    def apply():  # in the child, before exec: writes past `limit` bytes fail with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def test_a_kill_during_a_save_and_a_refused_write_lose_nothing(reference, tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, "train", str(config), f"output_dir={run}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = checkpoints / STAGING / "checkpoint-4"
    assert (partial / "adapter_model.safetensors").is_file() and not (partial / STAMP).exists()
    assert not (checkpoints / "checkpoint-4").exists(), "a half-written checkpoint never carries a checkpoint's name"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-2"]
    kept = snapshot(checkpoints / "checkpoint-2")

    # The disk now refuses files over 40 kB (as a full disk or a quota would refuse any): the resume
    # starts from checkpoint-2, and the save of checkpoint-4 (its optimizer state is 56 kB) fails.
    refused = subprocess.run([sys.executable, "-m", "chatlora", "train", str(config), f"output_dir={run}", "resume=auto"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                             preexec_fn=_file_size_limit(40_000))
    assert refused.returncode == EXIT_STORAGE == 74, refused.stderr
    assert "Traceback" not in refused.stderr
    assert "resuming from" in refused.stdout and "checkpoint-2 (step 2)" in refused.stdout, "the partial folder is ignored"
    assert "error: could not save the checkpoint of step 4" in refused.stderr
    assert "The last complete checkpoint, checkpoint-2, is kept" in refused.stderr
    assert not (checkpoints / STAGING).exists() and not (checkpoints / "checkpoint-4").exists()
    assert snapshot(checkpoints / "checkpoint-2") == kept

    quiet_train(tiny_config(tiny_model_dir, tmp_path, *SETTINGS, "resume=auto"))
    assert_same_as(reference, run)
