"""`chatlora train` through the real command line: a run end to end, and bad data, a bad training
argument or a failed run leaving no run folder (and the user's own empty folder in place)."""

from __future__ import annotations

from conftest import FIXTURES, TINY_TRAINABLE, run_cli


def test_cli_trains_end_to_end(tiny_model_dir, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"name: tiny\nmodel: {{name: {tiny_model_dir}}}\n"
        f"data: {{train: {FIXTURES / 'alpaca.json'}, validation: 0.2, max_length: 128}}\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
        "training: {per_device_train_batch_size: 2, max_steps: 4, learning_rate: 1.0e-2, logging_steps: 2}\n"
    )
    result = run_cli("train", str(config), f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "data: " in out and "(alpaca)" in out
    assert "pre-flight: ok" in out
    assert f"trainable parameters: {TINY_TRAINABLE:,} of " in out
    assert "step 2/4  loss " in out and "step 4/4  loss " in out and "tok/s" in out
    assert "held-out loss: " in out and " before training -> " in out
    assert f"adapter saved: {tmp_path / 'run' / 'adapter'}" in out
    assert "training:" in result.stderr and "4/4" in result.stderr  # the progress bar
    # Libraries' noise a user cannot act on stays out: bitsandbytes' and `kernels`' warnings about a
    # 4-bit kernel from a model hub, on CPUs with AVX512-BF16 where the test tools installed them.
    assert "gemm_4bit_forward" not in result.stdout + result.stderr
    assert "publisher trust check" not in result.stdout + result.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_bad_data_exits_2_and_writes_nothing(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": 3\n')
    result = run_cli("train", "demo", f"model.name={tiny_model_dir}", f"data.train={bad}", "data.validation=null",
                     f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{bad}:line 2: malformed JSON at column 15" in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_training_argument_leaves_no_run_folder(tiny_model_dir, tmp_path):
    result = run_cli("train", "demo", f"model.name={tiny_model_dir}", f"data.train={FIXTURES / 'alpaca.json'}",
                     "data.validation=null", "training.lr_scheduler_type=bogus", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "training:" in result.stderr and "bogus" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_failed_run_keeps_the_users_empty_output_folder(tiny_model_dir, tmp_path):
    """An empty folder the user made for the run is theirs: a run that fails before training empties
    it of what it wrote, and leaves it in place."""
    mine = tmp_path / "mine"
    mine.mkdir()
    result = run_cli("train", "demo", f"model.name={tiny_model_dir}", f"data.train={FIXTURES / 'alpaca.json'}", "data.validation=null",
                     "lora.target_modules=[no_such_layer]", f"output_dir={mine}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert mine.is_dir() and not any(mine.iterdir())
