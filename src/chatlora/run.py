"""The run folder: everything later commands need, found from its path alone.

    config.yaml      the resolved config
    adapter/         adapter_model.safetensors + adapter_config.json (peft)
    tokenizer/       tokenizer files with the chat template and the pad token used in training
    data_report.json what the data pipeline did (rows, truncation rules, lengths)
    distributed.json how the run was split over processes (trainer.distributed.record)
    metrics.jsonl    one JSON object per log line (loss, lr, grad norm, tokens/s, eval loss)
    loss.png         the loss curve
    checkpoints/     Trainer checkpoints (checkpoint-N), each complete or absent (trainer/checkpoint.py)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from chatlora.config.load import build, load_yaml
from chatlora.config.schema import Config
from chatlora.errors import ChatloraError, ConfigError


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    adapter = property(lambda self: self.path / "adapter")
    tokenizer = property(lambda self: self.path / "tokenizer")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    plot = property(lambda self: self.path / "loss.png")
    checkpoints = property(lambda self: self.path / "checkpoints")
    data_report = property(lambda self: self.path / "data_report.json")

    @classmethod
    def for_config(cls, cfg: Config) -> "RunDir":
        """Where a config's run goes (nothing is created yet)."""
        return cls(cfg.output_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")

    def create(self) -> "RunDir":
        """Make the folder. Refuses an existing non-empty one, so no earlier run is overwritten."""
        if self.path.exists() and any(self.path.iterdir()):
            raise ChatloraError(f"the run folder {self.path} already exists and is not empty; continue the run in it with "
                                "resume=auto, or choose another folder with output_dir=...")
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        # Resolved, so that "." or "runs/x/" still has its folder name (adapters are named after it).
        run = cls(Path(path).resolve())
        if not run.config.is_file():
            raise ChatloraError(f"{path} is not a chatlora run folder (no config.yaml)")
        return run

    def load_config(self) -> Config:
        """The config the run was trained with. Raises ConfigError naming config.yaml when it cannot be
        read as one (edited by hand, cut short, or written by another chatlora version)."""
        fix = ("fix it, or put back the config the run was trained with (`chatlora config show CONFIG key=value ...` "
               "prints one)")
        try:
            raw = load_yaml(self.config.read_text("utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            why = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"the run's config file {self.config} is not valid YAML ({why}{where}); {fix}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"the run's config file {self.config} cannot be read ({e}); {fix}") from None
        try:
            return build(Config, raw, "")
        except ConfigError as e:
            raise ConfigError(f"the run's config file {self.config} is not a valid chatlora config ({e}); {fix}") from None

    def write_config(self, data: dict[str, Any]) -> None:
        write_atomic(self.config, yaml.safe_dump(data, allow_unicode=True, sort_keys=False))

    def write_json(self, path: Path, data: Any) -> None:
        write_atomic(path, json.dumps(data, ensure_ascii=False, indent=2))


def run_folder(target: str | Path) -> Path | None:
    """The run folder `target` is (or whose adapter/ folder it is); None for a bare adapter."""
    folder = Path(target)
    return next((c for c in (folder, folder.parent) if (c / "config.yaml").is_file()), None)


def target_config(target: str | Path) -> Config | None:
    """The run config of a run folder (or of the run an adapter/ folder is in); None for a bare adapter."""
    folder = run_folder(target)
    return RunDir.open(folder).load_config() if folder else None


def write_atomic(path: Path, text: str) -> None:
    """Write a file via a temporary name and rename, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, a folder at `path`) leaves no stray file
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place (the old one, if any, goes only after)."""
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
