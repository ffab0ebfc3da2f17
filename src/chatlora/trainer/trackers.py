"""Experiment trackers (training.report_to: tensorboard, wandb, swanlab, mlflow). transformers' own
integration callbacks log the metrics and TrainingArguments; this adds what they do not know:

- each tracker's local files in the run folder (wandb/, swanlog/, mlruns/, tensorboard/), so a run
  folder keeps its own record; the trackers' own settings (WANDB_MODE=offline, SWANLAB_MODE=local,
  MLFLOW_TRACKING_URI, ...) still decide whether and where anything is sent;
- chatlora's resolved config (config.yaml's content) in each tracker;
- the generation monitor's held-out replies as a table (a list of rows, which the integrations
  cannot log: they drop or flatten it).

The runs are started here, before Trainer's callbacks would start them with their defaults (a
callback finds the run open and logs into it), and finished once the run is done, after the last
held-out loss was logged.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from chatlora.config.schema import TRACKER_PACKAGES

COLUMNS = ["step", "prompt", "reply", "stopped", "tokens"]


def wanted(report_to: Any) -> list[str]:
    """The trackers of a training.report_to value (a name, a list, "all", "none" or None) that
    chatlora completes here."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "all" in names:
        return [n for n, modules in TRACKER_PACKAGES.items() if any(importlib.util.find_spec(m) for m in modules)]
    return [n for n in names if n in TRACKER_PACKAGES]


class Trackers(TrainerCallback):
    """The trackers of one run: started by `start`, the replies table logged at each `on_log` that
    carries the monitor's replies, finished by `finish`. Rank 0 only (Trainer's integrations too)."""

    def __init__(self, names: list[str], config: dict[str, Any]):
        self.names, self.config = names, config
        self.tensorboard = None
        """transformers' TensorBoardCallback of the trainer (its writer exists once training began)."""

    def start(self, run_path: Path) -> None:
        name, config, names = run_path.name, self.config, self.names
        if "wandb" in names:
            import wandb

            wandb.init(project=os.environ.get("WANDB_PROJECT", "chatlora"), name=name, dir=str(run_path),
                       config={"chatlora": config})
        if "swanlab" in names:
            import swanlab

            swanlab.init(project=os.environ.get("SWANLAB_PROJECT", "chatlora"), name=name,
                         log_dir=os.environ.get("SWANLAB_LOG_DIR", str(run_path / "swanlog")), config={"chatlora": config})
        if "mlflow" in names:
            import mlflow

            if "MLFLOW_TRACKING_URI" not in os.environ:
                # mlflow's default is a SQLite database in the working folder (which mlflow-skinny
                # cannot open: no SQLAlchemy); a file store in the run folder keeps the run's record
                # with it. mlflow 3.18 asks for this opt-in to write one.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((run_path / "mlruns").absolute().as_uri())
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "chatlora"))
            mlflow.start_run(run_name=name)
            mlflow.log_dict(config, "chatlora_config.json")

    def attach(self, trainer, before: list) -> None:
        """Find the trainer's TensorBoard callback (report_to=tensorboard), which gets the config as
        text, and move `before` (metrics.jsonl's writer) and then this callback ahead of Trainer's
        integrations: this one takes the replies out of the log once they are written and tabled,
        so that the integrations, which cannot log a list of rows, never see it (SwanLab reports a
        parse error, TensorBoard and MLflow a warning, W&B guesses a type)."""
        from transformers.integrations import TensorBoardCallback

        callbacks = trainer.callback_handler.callbacks
        self.tensorboard = next((c for c in callbacks if isinstance(c, TensorBoardCallback)), None)
        for callback in [*before, self]:
            callbacks.remove(callback)
        first = next((i for i, c in enumerate(callbacks) if type(c).__module__.startswith("transformers.integrations")),
                     len(callbacks))
        callbacks[first:first] = [*before, self]

    def on_train_begin(self, args, state, control, **kwargs):
        if self.tensorboard is not None and self.tensorboard.tb_writer is not None and state.is_world_process_zero:
            import json

            self.tensorboard.tb_writer.add_text("chatlora/config", "```\n" + json.dumps(self.config, indent=2) + "\n```", 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "generations" not in logs:
            return
        if not state.is_world_process_zero:
            logs.pop("generations")
            return
        rows = [[state.global_step, g["prompt"], g["reply"], g["stopped"], g["tokens"]] for g in logs.pop("generations")]
        self.log_replies(state.global_step, rows)

    def log_replies(self, step: int, rows: list[list]) -> None:
        if "wandb" in self.names:
            import wandb

            if wandb.run is not None:
                wandb.log({"held_out/replies": wandb.Table(columns=COLUMNS, data=rows), "train/global_step": step})
        if "swanlab" in self.names:
            import swanlab

            table = swanlab.echarts.Table()
            table.add(COLUMNS, rows)
            swanlab.log({"held_out/replies": table}, step=step)
        if "mlflow" in self.names:
            import mlflow

            if mlflow.active_run() is not None:  # appended to one table artifact, a row per reply and step
                mlflow.log_table({c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)}, "held_out_replies.json")
        writer = self.tensorboard.tb_writer if self.tensorboard is not None else None
        if writer is not None:
            lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
            lines += ["| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in r) + " |" for r in rows]
            writer.add_text("held_out/replies", "\n".join(lines), step)

    def finish(self) -> None:
        """End each tracker's run (after the last held-out loss was logged to it)."""
        if self.tensorboard is not None and self.tensorboard.tb_writer is not None:
            self.tensorboard.tb_writer.flush()
        if "wandb" in self.names:
            import wandb

            wandb.finish()
        if "swanlab" in self.names:
            import swanlab

            swanlab.finish()
        if "mlflow" in self.names:
            import mlflow

            mlflow.end_run()
