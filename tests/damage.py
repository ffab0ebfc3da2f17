"""Ways to damage a copy of a trained run, shared by the in-process and the command-line tests of
damaged runs (unit/recipes/test_damaged_runs.py, e2e/test_damaged_runs_cli.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

SETTINGS = ["training.max_steps=2", "training.save_strategy=steps", "training.save_steps=1"]


def copy_run(run: Path, folder: Path, damage: Callable[[Path], None] = lambda _run: None, name: str = "") -> Path:
    copy = folder / (name or run.name)
    shutil.copytree(run, copy)
    damage(copy)
    return copy


def cut(path: Path) -> None:
    """The file cut short half way, as by a full disk or a killed copy."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CHECKPOINT = Path("checkpoints/checkpoint-2")
ADAPTER = Path("adapter/adapter_model.safetensors")
ADAPTER_CONFIG = Path("adapter/adapter_config.json")
# name -> (damage, the file the message must name, what it must say)
RUN_DAMAGE = {
    "zero-byte adapter": (lambda r: (r / ADAPTER).write_bytes(b""), ADAPTER, "is damaged"),
    "truncated adapter": (lambda r: cut(r / ADAPTER), ADAPTER, "is damaged"),
    "garbage adapter": (lambda r: (r / ADAPTER).write_bytes(b"\xff" * 4096), ADAPTER, "is damaged"),
    "adapter_config.json not JSON": (lambda r: (r / ADAPTER_CONFIG).write_text("{\n  broken"), ADAPTER_CONFIG, "is damaged"),
    "adapter_config.json a list": (lambda r: (r / ADAPTER_CONFIG).write_text("[]"), ADAPTER_CONFIG, "not a JSON object"),
    "no adapter_config.json": (lambda r: (r / ADAPTER_CONFIG).unlink(), ADAPTER_CONFIG, "is missing"),
    "no tokenizer/": (lambda r: shutil.rmtree(r / "tokenizer"), Path("tokenizer"), "has no tokenizer/ folder"),
    "config.yaml not YAML": (lambda r: (r / "config.yaml").write_text("model: {name: [\n"), Path("config.yaml"), "is not valid YAML"),
    "config.yaml a list": (lambda r: (r / "config.yaml").write_text("- a\n"), Path("config.yaml"), "not a valid chatlora config"),
}
