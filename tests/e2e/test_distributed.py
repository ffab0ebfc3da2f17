"""Several processes on the CPU (gloo): 2 processes, and 2 nodes on loopback, train the tiny model
exactly as one process does with the same global batch; stops and failures of a launched job.

The runs cross an epoch boundary (16 rows, 4 samples per step, 6 steps), so the reshuffled second
epoch is covered too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatlora.trainer.plot import read_metrics
from conftest import FIXTURES, free_port, losses, run_cli, tiny_config

ROWS = [str(FIXTURES / "alpaca.json"), str(FIXTURES / "sharegpt.json"), str(FIXTURES / "openai.jsonl")]  # 10 + 3 + 3
# The single-process recipe: 2 x 2 samples per step. Held-out data and replies run too (on every rank).
COMMON = [f"data.train=[{','.join(ROWS)}]", f"data.validation={FIXTURES / 'openai.jsonl'}",
          "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2", "training.max_steps=6",
          "lora.dropout=0.0", "eval.prompts=1", "eval.max_new_tokens=6", "report.compare=1", "report.max_new_tokens=6"]


def assert_same_training(run: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    assert losses(run) == pytest.approx(losses(reference), rel=1e-5)
    assert len(losses(run)) == 6
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (run, reference))
    assert a.keys() == b.keys()
    for key in a:
        # Relative to the whole tensor: Adam divides each element's gradient by its own running size,
        # so a gradient element near zero turns summation-order rounding (other micro-batches, other
        # processes) into an update difference of a few 1e-6; a real error (a missed gradient
        # average, a lost sample) moves whole tensors by percents.
        assert (a[key] - b[key]).norm() <= 1e-4 * b[key].norm(), key


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> Path:
    from chatlora.recipes.train import train

    tmp = tmp_path_factory.mktemp("one")
    return train(tiny_config(tiny_model_dir, tmp, *COMMON), echo=lambda _line: None).path


def config_file(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny config as a YAML file, as a user would launch it."""
    path = tmp_path / "tiny.yaml"
    path.write_text(f"name: tiny\nmodel: {{name: {tiny_model_dir}}}\ndata: {{train: x, max_length: 128}}\n"
                    "lora: {r: 4, alpha: 8}\ntraining: {learning_rate: 1.0e-2, logging_steps: 1}\n")
    return path


def env_for(cache: Path) -> dict[str, str]:
    # One thread per process keeps 2 processes on 2 cores; a fresh cache shows who tokenizes.
    return {"OMP_NUM_THREADS": "1", "CHATLORA_CACHE": str(cache)}


def assert_split_by_tokens(run: Path, reference: Path) -> None:
    """Each step's samples were split over the 2 processes by tokens: their input tokens (metrics'
    tokens_per_process) differ by at most the longest sample, and add up to the tokens the
    one-process run trained at that step (the same samples)."""
    longest = json.loads((run / "data_report.json").read_text())["train"]["longest"]
    split = [r["tokens_per_process"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(split) == 6 and all(len(t) == 2 and min(t) > 0 and max(t) - min(t) <= longest for t in split), split
    seen = [0] + [r["tokens_seen"] for r in read_metrics(reference / "metrics.jsonl") if "loss" in r]
    assert [sum(t) for t in split] == [b - a for a, b in zip(seen, seen[1:])]


def test_two_processes_train_as_one(tiny_model_dir, tmp_path, one_process):
    """`chatlora train --gpus 2` (torchrun under the hood; gloo on the CPU): the same losses and adapter
    as one process, each step's samples split by tokens, the data tokenized once, every line, bar and
    file written once."""
    out = tmp_path / "run"
    result = run_cli("train", "--gpus", "2", str(config_file(tiny_model_dir, tmp_path)), *COMMON, f"output_dir={out}",
                     cwd=tmp_path, env=env_for(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(out, one_process)
    assert_split_by_tokens(out, one_process)
    stdout, stderr = result.stdout, result.stderr
    assert "no GPU here: training on 2 CPU processes (gloo)" in stdout
    assert "batches: 4 samples per optimizer step (2 on each of 2 processes, balanced by tokens), 2 per forward pass, packed" in stdout
    for line in ("pre-flight: ok", "run folder: ", "step 6/6  loss ", "held-out loss: ", "adapter saved: ", "── "):
        assert stdout.count(line) == 1, line
    assert stderr.count("tokenizing train:   0%") == 1, "only rank 0 tokenizes; the other loads the cache"
    assert stderr.count("training:   0%") == 1, "one progress bar"
    assert json.loads((out / "distributed.json").read_text()) == {
        "processes": 2, "nodes": 1, "strategy": "ddp", "samples_per_step": 4, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1}
    assert sum("eval_loss" in r for r in read_metrics(out / "metrics.jsonl")) == 2  # one line per evaluation, not two
    assert (out / "compare.txt").is_file() and (out / "loss.png").is_file()


def test_two_processes_with_accumulation_and_padding(tiny_model_dir, tmp_path, one_process):
    """1-sample padded micro-batches: each process takes its 2 samples of a step in 2 passes (gradient
    accumulation under DDP's no_sync): the same training, each step still split by tokens."""
    out = tmp_path / "run"
    result = run_cli("train", "--gpus", "2", str(config_file(tiny_model_dir, tmp_path)), *COMMON, "distributed.samples_per_step=4",
                     "training.per_device_train_batch_size=1", "data.packing=false", f"output_dir={out}",
                     cwd=tmp_path, env=env_for(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batches: 4 samples per optimizer step (2 on each of 2 processes, balanced by tokens), 1 per forward pass, padded" in result.stdout
    assert_same_training(out, one_process)
    assert_split_by_tokens(out, one_process)


def cut_after_first_checkpoint(run: Path) -> None:
    """Make a finished run look like one killed after its step-3 checkpoint."""
    import shutil

    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "checkpoint-6")


def test_resume_on_two_processes_and_on_one(tiny_model_dir, tmp_path, one_process):
    """A 2-process run cut after its step-3 checkpoint resumes on 2 processes (nothing changed) and,
    being DDP with the same global batch, on 1 process too (said so); both end as the uninterrupted run."""
    out = tmp_path / "run"
    config = str(config_file(tiny_model_dir, tmp_path))
    saving = ["training.save_strategy=steps", "training.save_steps=3"]
    first = run_cli("train", "--gpus", "2", config, *COMMON, *saving, f"output_dir={out}", cwd=tmp_path, env=env_for(tmp_path / "cache"))
    assert first.returncode == 0, first.stderr[-3000:]
    cut_after_first_checkpoint(out)
    again = run_cli("train", "--gpus", "2", config, *COMMON, *saving, f"output_dir={out}", "resume=auto", cwd=tmp_path,
                    env=env_for(tmp_path / "cache"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("resuming from ") == 1 and "checkpoint-3 (step 3)" in again.stdout
    assert_same_training(out, one_process)

    cut_after_first_checkpoint(out)
    alone = run_cli("train", config, *COMMON, *saving, f"output_dir={out}", "resume=auto", cwd=tmp_path, env=env_for(tmp_path / "cache"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "resuming on 1 processes (the run began on 2): the same 4 samples per step, split differently" in alone.stdout
    assert_same_training(out, one_process)


def test_two_nodes_on_loopback(tiny_model_dir, tmp_path, one_process):
    """Two torchrun launchers, one process each, meeting through the c10d rendezvous as two nodes
    would. Here each process takes its share of a step as one batch, packed into token-budget passes,
    so the processes may take different numbers of samples: the same training still."""
    port, out = free_port(), tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "chatlora-test", "-m", "chatlora", "train",
           str(config_file(tiny_model_dir, tmp_path)), *COMMON, "distributed.samples_per_step=4",
           "training.per_device_train_batch_size=1", "data.batch_tokens=120", f"output_dir={out}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_for(tmp_path / "cache")}
    nodes = [subprocess.Popen([*cmd[:3], "--node-rank", str(i), *cmd[3:]], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[1][-2000:] for o in outputs)
    assert_same_training(out, one_process)
    assert_split_by_tokens(out, one_process)
    stdout, stderr = "".join(o[0] for o in outputs), "".join(o[1] for o in outputs)
    assert "batches: 4 samples per optimizer step (split over 2 processes by tokens), packed into forward passes of at most 120 tokens" in stdout
    assert stdout.count("step 6/6  loss ") == 1
    # The second node's first process finds rank 0's tokens in the cache (one machine, one cache).
    assert stderr.count("tokenizing train:   0%") == 1
    assert json.loads((out / "distributed.json").read_text())["nodes"] == 2


def test_accelerate_launch(tiny_model_dir, tmp_path, one_process):
    """`accelerate launch --multi_gpu` (its torchrun launcher; on this CPU machine the processes use
    gloo), the config unchanged."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "chatlora", "train",
           str(config_file(tiny_model_dir, tmp_path)), *COMMON, f"output_dir={out}"]
    result = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **env_for(tmp_path / "cache")}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(out, one_process)
    assert result.stdout.count("step 6/6  loss ") == 1


def test_bad_data_on_two_processes_is_reported_once(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": 3\n')
    result = run_cli("train", "--gpus", "2", str(config_file(tiny_model_dir, tmp_path)), f"data.train={bad}",
                     f"output_dir={tmp_path / 'run'}", cwd=tmp_path, env=env_for(tmp_path / "cache"))
    assert result.returncode == 2
    assert result.stderr.count(f"{bad}:line 2: malformed JSON") == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
    assert "CPU processes" not in result.stdout, "refused by the launcher, before any process started"


# ---------------------------------------------------------------- stops and failures of a launched job


def _launch_long_run(tiny_model_dir: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """`chatlora train --gpus 2` on a run of many steps; returns once its first step is logged."""
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "chatlora", "train", "--gpus", "2", str(config_file(tiny_model_dir, tmp_path)),
                             f"data.train={FIXTURES / 'alpaca.json'}", "training.max_steps=2000", f"output_dir={run}", *extra],
                            cwd=tmp_path, env={**os.environ, **env_for(tmp_path / "cache")}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not losses(run) if (run / "metrics.jsonl").exists() else True:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)
    return proc, run


def _job_processes(run: Path) -> list[int]:
    """The processes whose command line names this run folder."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(run) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_sigterm_to_the_launcher_stops_the_job_with_a_checkpoint_and_75(tiny_model_dir, tmp_path):
    import signal

    proc, run = _launch_long_run(tiny_model_dir, tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "(rank 1)" not in err, err[-3000:]
    assert "SIGTERM passed on to the 2 processes" in err and "resume=auto" in err
    assert list((run / "checkpoints").glob("checkpoint-*")), "the processes saved a checkpoint"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_processes_stop_when_the_launcher_is_killed(tiny_model_dir, tmp_path):
    """torchrun starts its workers in a session of their own: killed with SIGKILL, the launcher would
    leave them training with no parent. They get SIGTERM instead, save a checkpoint and stop."""
    import signal
    import time

    proc, run = _launch_long_run(tiny_model_dir, tmp_path)
    proc.kill()
    out, err = proc.communicate(timeout=60)
    deadline = time.time() + 120
    while _job_processes(run) and time.time() < deadline:
        time.sleep(0.5)
    left = _job_processes(run)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "the processes outlived their launcher"
    assert list((run / "checkpoints").glob("checkpoint-*")), f"they saved a checkpoint on the way out: {err[-2000:]}"


def test_a_nonfinite_loss_on_two_processes_is_reported_once(tiny_model_dir, tmp_path):
    result = run_cli("train", "--gpus", "2", str(config_file(tiny_model_dir, tmp_path)), f"data.train={FIXTURES / 'alpaca.json'}",
                     "training.learning_rate=1e30", "training.max_grad_norm=0", "training.max_steps=6",
                     f"output_dir={tmp_path / 'run'}", cwd=tmp_path, env=env_for(tmp_path / "cache"))
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stderr.count("was NaN or inf") == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]


def test_a_stray_world_size_is_a_clear_error(tiny_model_dir, tmp_path):
    result = run_cli("train", str(config_file(tiny_model_dir, tmp_path)), f"data.train={FIXTURES / 'alpaca.json'}",
                     f"output_dir={tmp_path / 'run'}", cwd=tmp_path, env={"WORLD_SIZE": "2"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT not" in result.stderr
