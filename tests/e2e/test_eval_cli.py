"""`chatlora eval` on the tiny model through the real command line: a file of prompts, bad input, the
user's files never written over, and the note when no row fits for the loss."""

from __future__ import annotations

import json

from conftest import FIXTURES, run_cli


def test_cli_eval_on_a_file(tiny_run, tmp_path):
    out = tmp_path / "report"
    result = run_cli("eval", str(tiny_run), "--data", str(FIXTURES / "sharegpt.json"), "--limit", "2",
                     "--max-new-tokens", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "sharegpt.json").read_text())
    assert report["rows"] == 2 and report["max_new_tokens"] == 4
    assert "| perplexity (lower is better) |" in result.stdout
    assert "greedy replies (adapter)" in result.stderr  # progress bars


def test_cli_eval_bad_input(tiny_run, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}\n')
    result = run_cli("eval", str(tiny_run), "--data", str(bad), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}:line 1" in result.stderr and not (tmp_path / "r").exists()
    # A run trained without held-out data needs --data.
    from chatlora.recipes.train import train
    from conftest import tiny_config

    run = train(tiny_config(tiny_model_dir, tmp_path, "training.max_steps=1"), echo=lambda _: None)
    result = run_cli("eval", str(run.path))
    assert result.returncode == 2 and "trained without held-out data" in result.stderr and "--data FILE" in result.stderr


def test_cli_eval_never_writes_over_the_users_files(tiny_run, tmp_path):
    """The report is NAME.json/.md in --out: next to the data file it would replace the data itself.
    Refused before any model loads; a folder that is a file too. An earlier report is replaced."""
    held = tmp_path / "held.json"
    held.write_bytes((FIXTURES / "alpaca.json").read_bytes())
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "held.md").write_text("my notes")
    for out, kept in ((tmp_path, held), (notes, notes / "held.md")):
        before = kept.read_bytes()
        result = run_cli("eval", str(tiny_run), "--data", str(held), "--limit", "1", "--max-new-tokens", "2", "--out", str(out))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "is not an earlier chatlora eval report" in result.stderr and kept.read_bytes() == before
    (tmp_path / "afile").write_text("x")
    result = run_cli("eval", str(tiny_run), "--data", str(held), "--out", str(tmp_path / "afile"))
    assert result.returncode == 2 and "is a file" in result.stderr and "Traceback" not in result.stderr
    for _ in range(2):  # the second run replaces the first run's report
        result = run_cli("eval", str(tiny_run), "--data", str(held), "--limit", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "r"))
        assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r" / "held.json").read_text())["rows"] == 1


def test_cli_eval_says_when_no_row_fits_for_the_loss(tiny_run, tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"instruction": "Tell me everything.", "output": "word " * 400}) + "\n")
    result = run_cli("eval", str(tiny_run), "--data", str(long), "--max-new-tokens", "2", "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert "warning: no conversation fits data.max_length=128 with its reply, so there is no held-out loss" in result.stdout
