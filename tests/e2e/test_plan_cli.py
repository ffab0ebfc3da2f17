"""`chatlora plan` through the real command line: a plan that fits, a card by name, an unknown card
and nothing fitting exit 2 without a traceback."""

from __future__ import annotations

from conftest import FIXTURES, run_cli


def test_cli_plan(tiny_model_dir):
    data = str(FIXTURES / "alpaca.json")
    r = run_cli("plan", "demo", f"model.name={tiny_model_dir}", f"data.train={data}", "data.validation=null",
                "--gpu-mem", "24GiB", "training.gradient_checkpointing=true")
    assert r.returncode == 0, r.stderr
    assert "peak GPU memory" in r.stdout and "fits 24.0 GiB" in r.stdout and "gradient checkpointing on" in r.stdout
    r = run_cli("plan", "demo", f"model.name={tiny_model_dir}", f"data.train={data}", "--gpu", "h100")
    assert r.returncode == 0, r.stderr
    assert "real tokens/s" in r.stdout and "H100 SXM (80.0 GiB)" in r.stdout
    r = run_cli("plan", "demo", f"model.name={tiny_model_dir}", f"data.train={data}", "--gpu", "voodoo")
    assert r.returncode == 2 and "not a GPU the plan knows" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("plan", "demo", f"model.name={tiny_model_dir}", f"data.train={data}", "--gpu-mem", "0.001",
                "data.batch_tokens=auto")
    assert r.returncode == 2 and "nothing fits" in r.stderr and "Traceback" not in r.stderr
