"""Trainer callbacks: a progress bar with loss, tokens/s and ETA; metrics.jsonl; the loss plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

from chatlora.trainer.plot import plot_losses

# Keys of Trainer's log dicts that are kept in metrics.jsonl and printed, with their short names.
SHOWN = {"loss": "loss", "eval_loss": "eval_loss", "learning_rate": "lr", "grad_norm": "grad_norm"}


class Progress(TrainerCallback):
    """One bar for the whole run (steps, ETA from tqdm, last loss and real tokens/s as postfix) and
    one printed line per log step, which stays in the scrollback after the bar moves on."""

    def __init__(self):
        self.bar = None
        self.loss: float | None = None  # the last logged loss

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step", dynamic_ncols=True)
        self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

    def rate(self, state) -> float:
        """Real tokens per second since training began. (On a GPU the count lags the steps by one or
        two until a log adds the rest: trainer.py's _track_num_input_tokens.)"""
        return (state.num_input_tokens_seen - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            # Until the first logged loss there is none to show ("loss nan" would read as a diverged run).
            loss = "" if self.loss is None else f"loss {self.loss:.4f}, "
            self.bar.set_postfix_str(f"{loss}{self.rate(state):,.0f} tok/s", refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.loss = logs["loss"]
        parts = [f"step {state.global_step}/{state.max_steps}" if state.max_steps else "before training"]
        parts += [f"{short} {logs[k]:.4g}" for k, short in SHOWN.items() if isinstance(logs.get(k), (int, float))]
        if "loss" in logs:
            parts.append(f"tok/s {self.rate(state):,.0f}")
        if len(parts) > 1 and state.is_world_process_zero:
            (self.bar.write if self.bar is not None else print)("  ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLog(TrainerCallback):
    """Appends every log to metrics.jsonl and redraws the loss plot at each save and at the end."""

    def __init__(self, metrics: Path, plot: Path, progress: Progress):
        self.metrics, self.plot, self.progress = metrics, plot, progress

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": round(time.time(), 3)}
        # Lists too: the replies generated on held-out prompts (trainer.evaluation.GenerationMonitor).
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str, list))})
        if "loss" in logs:
            row["tokens_per_s"] = round(self.progress.rate(state), 1)
            row["tokens_seen"] = state.num_input_tokens_seen
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_losses(self.metrics, self.plot)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_losses(self.metrics, self.plot)
