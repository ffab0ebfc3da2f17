"""`chatlora merge` refusals through the real command line: parity outside the tolerance, an adapter
with NaN or inf, an existing output; each writes nothing."""

from __future__ import annotations

import shutil

from conftest import run_cli


def test_parity_outside_the_tolerance_fails_and_writes_nothing(tiny_run, tmp_path):
    out = tmp_path / "merged"
    result = run_cli("merge", str(tiny_run), str(out), "--dtype", "float16", "--max-diff", "1e-6")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not match base + adapter within the tolerance" in result.stderr
    assert "parity on " in result.stdout
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


def test_refuses_an_adapter_with_nan_or_inf(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    file = run / "adapter" / "adapter_model.safetensors"
    weights = load_file(file)
    names = sorted(weights)
    weights[names[0]][0, 0] = float("nan")
    weights[names[1]][0, :2] = float("inf")
    save_file(weights, file)
    result = run_cli("merge", str(run), str(tmp_path / "merged"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the adapter has non-finite weights" in result.stderr
    assert f"{names[0]}: 1 NaN, 0 inf" in result.stderr and f"{names[1]}: 0 NaN, 2 inf" in result.stderr
    assert not (tmp_path / "merged").exists()


def test_refuses_an_existing_output(tiny_run, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("merge", str(tiny_run), str(out))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = run_cli("merge", str(tiny_run), str(out / "keep.txt" / "merged"))  # refused before loading anything
    assert result.returncode == 2 and "which is a file" in result.stderr and "Traceback" not in result.stderr
