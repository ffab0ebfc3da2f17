"""The run folder: everything later commands need, found from its path alone.

    config.yaml      the resolved config
    adapter/         adapter_model.safetensors + adapter_config.json (peft)
    tokenizer/       tokenizer files with the chat template and the pad token used in training
    data_report.json what the data pipeline did (rows, truncation rules, lengths)
    distributed.json how the run was split over processes (trainer.distributed.split.record)
    metrics.jsonl    one JSON object per log line (loss, lr, grad norm, tokens/s, eval loss)
    loss.png         the loss curve
    checkpoints/     Trainer checkpoints (checkpoint-N), each complete or absent (trainer/lifecycle/checkpoint.py;
                     latest_checkpoint below finds them)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from chatlora.config.load import build, load_yaml
from chatlora.config.schema import Config
from chatlora.errors import ChatloraError, ConfigError, file_in_the_way


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

    def refuse_taken(self) -> None:
        """Raise ChatloraError when the folder exists and is not empty: a new run never writes over one."""
        if self.path.exists() and any(self.path.iterdir()):
            raise ChatloraError(f"the run folder {self.path} already exists and is not empty; continue the run in it with "
                                "resume=auto, or choose another folder with output_dir=...")

    def create(self) -> "RunDir":
        """Make the folder. Refuses an existing non-empty one, so no earlier run is overwritten."""
        self.refuse_taken()
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

    def complete_checkpoints(self) -> list[Path]:
        """The run's complete checkpoints, oldest step first (complete_checkpoints below)."""
        return complete_checkpoints(self.checkpoints)

    def latest_checkpoint(self) -> Path | None:
        """The run's last complete checkpoint, or None."""
        return latest_checkpoint(self.checkpoints)


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


def check_new_folder(final: Path, error: type[ChatloraError] = ChatloraError) -> None:
    """Raise `error` when `final` cannot become a new output folder: a file, a folder with something in
    it, or a path through a file. Asked before any work, not after it at mkdir."""
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise error(f"{final} already exists ({'a file' if final.is_file() else 'not empty'}); "
                    "choose another output folder or remove it")
    blocked = file_in_the_way(final.absolute())
    if blocked:
        raise error(f"{final} {blocked}; choose another output folder")


@contextmanager
def staged(final: Path):
    """A temporary folder beside `final` to write an output into; renamed into place (an empty `final`
    gives way) when the block ends, removed when it raises: a failed step leaves nothing at `final`."""
    tmp = final.absolute().with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if final.exists():
            final.rmdir()  # empty: check_new_folder said so
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- checkpoints: which folders under checkpoints/ are complete (trainer/lifecycle/checkpoint.py writes them)

STAMP = "chatlora_resume.json"
"""The file a checkpoint gets last, once everything else is in it: the fingerprints resume compares."""
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def step_of(path: Path) -> int | None:
    """The step of a checkpoint folder named checkpoint-N, else None."""
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in a checkpoints/ folder, oldest step first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if step_of(p) is not None and (p / STAMP).is_file() and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: step_of(p) or 0)


def latest_checkpoint(folder: Path) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def adapter_folder(path: str):
    """The adapter folder of `model.adapter` (a run folder or an adapter folder). Raises ConfigError
    when there is none, before any data or weight loads."""
    folder = Path(path).expanduser()
    folder = folder / "adapter" if (folder / "adapter").is_dir() else folder
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"model.adapter: {path} is neither a run folder with an adapter nor an adapter folder; "
                          "train the SFT run first (the dpo-demo preset: chatlora train demo output_dir=runs/demo), "
                          "or give its path with model.adapter=RUN")
    return folder
