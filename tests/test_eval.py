"""`chatlora eval` on the tiny model: its numbers agree with training's and with the metrics library,
the report files, and bad input."""

from __future__ import annotations

import json
import math

import pytest

from chatlora.evaluate.metrics import repetition, rouge_l_chars
from chatlora.recipes.eval import evaluate
from chatlora.trainer.plot import read_metrics
from conftest import FIXTURES, run_cli


@pytest.fixture(scope="module")
def report(tiny_run):
    lines: list[str] = []
    report = evaluate(str(tiny_run), max_new_tokens=10, device="cpu", echo=lines.append)
    report["_lines"] = lines
    return report


def test_held_out_loss_matches_training(report, tiny_run):
    """The base model's loss is the run's 'before training' eval loss; the adapter's the final one."""
    evals = [r["eval_loss"] for r in read_metrics(tiny_run / "metrics.jsonl") if "eval_loss" in r]
    results = report["results"]
    assert results["base"]["loss"] == pytest.approx(evals[0], rel=1e-4)
    assert results["adapter"]["loss"] == pytest.approx(evals[-1], rel=1e-4)
    assert results["adapter"]["loss"] < results["base"]["loss"]
    for side in ("base", "adapter"):
        assert results[side]["perplexity"] == pytest.approx(math.exp(results[side]["loss"]))
        assert results[side]["trained_tokens"] > 0


def test_reply_metrics_are_computed_from_the_replies(report):
    rows = report["replies"]
    assert report["rows"] == len(rows) == 3  # validation=0.3 of the 10-row fixture
    for side in ("base", "adapter"):
        got = report["results"][side]
        assert got["count"] == 3
        assert got["stop_rate"] == sum(r[side]["stopped"] for r in rows) / 3
        assert got["mean_tokens"] == pytest.approx(sum(r[side]["tokens"] for r in rows) / 3)
        assert got["rouge_l"] == pytest.approx(sum(rouge_l_chars(r[side]["text"], r["reference"]) for r in rows) / 3)
        assert 0 <= got["repetition"] <= 1
    assert all(r["base"]["tokens"] == 10 and not r["base"]["stopped"] for r in rows)  # a random model never stops


def test_report_files_and_console(report, tiny_run):
    saved = json.loads((tiny_run / "eval" / "validation.json").read_text())
    assert saved["results"] == report["results"]
    md = (tiny_run / "eval" / "validation.md").read_text()
    assert "| held-out loss (lower is better) |" in md and "- reference: " in md
    text = "\n".join(report["_lines"])
    assert "evaluating on 3 held-out conversations" in text
    assert "| stop rate (higher is better) | 0% | 0% |" in text
    assert "warning: no base reply ended on the end-of-turn token within 10 tokens" in text


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
