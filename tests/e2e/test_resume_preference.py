"""The preference stage resumes exactly too: 3 steps + resume + 3 steps equal 6 uninterrupted steps bit
for bit (loss, rewards, adapter), starting from an SFT run's adapter with its frozen copy as the
reference; a resume on changed preference rows is refused by name."""

from __future__ import annotations

import json
import signal

import pytest

from chatlora.errors import Preempted, ResumeError
from chatlora.trainer.plot import read_metrics
from conftest import FIXTURES, quiet_train, tiny_config
from exact_resume import SETTINGS, assert_same_as, adapter
from snapshot import snapshot
from test_resume import SignalAt


def dpo(tiny_model_dir, tmp_path, sft, *more, data=None):
    return tiny_config(tiny_model_dir, tmp_path, *SETTINGS, "stage=dpo", f"model.adapter={sft}", *more,
                       data=str(data or FIXTURES / "pairs.jsonl"))


def rewards(run) -> list[float]:
    return [r["rewards/margins"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_preference_stage_resumes_exactly_and_refuses_changed_rows(tiny_run, tiny_model_dir, tmp_path):
    whole = quiet_train(dpo(tiny_model_dir, tmp_path / "whole", tiny_run)).path
    reference = {"losses": [r["loss"] for r in read_metrics(whole / "metrics.jsonl") if "loss" in r], "adapter": adapter(whole)}

    with pytest.raises(Preempted, match="at step 3 of 6"):
        quiet_train(dpo(tiny_model_dir, tmp_path, tiny_run), callbacks=[SignalAt(3, signal.SIGTERM)])
    run = tmp_path / "run"

    rows = [json.loads(line) for line in (FIXTURES / "pairs.jsonl").read_text().splitlines()]
    rows[2]["rejected"] += " Really."
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(run)
    with pytest.raises(ResumeError, match="the tokenized training data"):
        quiet_train(dpo(tiny_model_dir, tmp_path, tiny_run, "resume=auto", data=edited))
    assert snapshot(run) == before

    quiet_train(dpo(tiny_model_dir, tmp_path, tiny_run, "resume=auto"))
    assert_same_as(reference, run)
    assert rewards(run) == rewards(whole)
