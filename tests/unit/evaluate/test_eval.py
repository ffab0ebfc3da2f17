"""`chatlora eval` on the tiny model: its numbers agree with training's and with the metrics library,
the report files, and bad input."""

from __future__ import annotations

import json
import math

import pytest

from chatlora.evaluate.metrics import rouge_l_chars
from chatlora.recipes.eval import evaluate
from chatlora.trainer.plot import read_metrics


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
