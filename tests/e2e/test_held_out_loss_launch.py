"""One held-out loss on two processes: `chatlora train --gpus 2` (gloo) reports the same before and
after losses as the plain reference (held_out.py), which one process gives too
(unit/evaluate/test_held_out_loss.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from held_out import HELD_OUT, SETTINGS, TRAIN, eval_losses, references


@pytest.fixture(scope="module")
def held_out_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("held-out") / "held_out.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in HELD_OUT))
    return path


def test_two_processes_report_the_same_loss(tiny_model_dir, tmp_path, held_out_file):
    """`chatlora train --gpus 2` (gloo): 7 held-out rows split 4/3, 2 per evaluation batch. Its
    before/after losses equal the reference on its own adapter (Trainer's sharding would have
    counted a repeated row, and averaged batch means)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(f"name: tiny\nmodel: {{name: {tiny_model_dir}}}\ndata: {{train: x, max_length: 128}}\n"
                      "lora: {r: 4, alpha: 8, dropout: 0.0}\ntraining: {learning_rate: 1.0e-2, logging_steps: 1}\n")
    out = tmp_path / "run"
    result = run_cli("train", "--gpus", "2", str(config), f"data.train=[{','.join(TRAIN)}]", f"data.validation={held_out_file}",
                     "distributed.samples_per_step=4", *SETTINGS, f"output_dir={out}", cwd=tmp_path,
                     env={"OMP_NUM_THREADS": "1", "CHATLORA_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    ref = references(out, tiny_model_dir)
    before, after = eval_losses(out)
    assert before == pytest.approx(ref["base"], abs=1e-6)
    assert after == pytest.approx(ref["adapter"], abs=1e-6)
    assert f"held-out loss: {before:.4f} before training -> {after:.4f} after" in result.stdout
