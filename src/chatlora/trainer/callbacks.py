"""Trainer callbacks, all observers (they watch the run and log; none changes a step): a progress bar
with loss, tokens/s and ETA; metrics.jsonl and the loss plot; replies generated on held-out prompts
every N steps (stop rate, length, repetition); TensorBoard in the run folder. What does change a step
(the non-finite guard, stopping on a signal, FSDP2's set-up) is the trainer's own (trainer.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

from chatlora.config.schema import Config, EvalConfig
from chatlora.data.formats import Conversation
from chatlora.data.render import Renderer
from chatlora.evaluate.metrics import reply_stats
from chatlora.generate.replies import generate_replies
from chatlora.generate.sampling import Sampling
from chatlora.trainer.plot import plot_losses

# Keys of Trainer's log dicts that are kept in metrics.jsonl and printed, with their short names.
SHOWN = {"loss": "loss", "eval_loss": "eval_loss", "learning_rate": "lr", "grad_norm": "grad_norm",
         # stage: dpo (trainer/preference.py)
         "rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margins": "margin",
         "rewards/accuracies": "acc", "eval_rewards/accuracies": "eval_acc"}


class Progress(TrainerCallback):
    """One bar for the whole run (steps, ETA from tqdm, last loss and real tokens/s as postfix) and
    one printed line per log step, which stays in the scrollback after the bar moves on."""

    def __init__(self):
        self.bar = None
        self.loss: float | None = None  # the last logged loss
        self.accuracy: float | None = None  # and preference accuracy (stage: dpo)

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
            loss = "" if self.loss is None else f"loss {self.loss:.4f}, " + (f"acc {self.accuracy:.2f}, " if self.accuracy is not None else "")
            self.bar.set_postfix_str(f"{loss}{self.rate(state):,.0f} tok/s", refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.loss = logs["loss"]
            self.accuracy = logs.get("rewards/accuracies")
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
        # Lists too: the replies generated on held-out prompts (GenerationMonitor below).
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


def log_tensorboard_to(trainer, folder: Path) -> None:
    """Point TensorBoard (when `report_to` asks for it) at the run folder's tensorboard/, rather than
    Trainer's default under checkpoints/runs/<date>_<host>/, so `tensorboard --logdir runs/` finds every run."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(folder)


class GenerationMonitor(TrainerCallback):
    """Greedy replies to a few held-out prompts during training, logged through Trainer (so they reach
    metrics.jsonl, TensorBoard and the console) with stop rate, mean length, repetition and ROUGE-L.

    A stop rate of zero once training has begun is called out loudly: a chat model that no longer ends
    its turn is broken in a way the loss curve does not show.
    """

    def __init__(self, renderer: Renderer, conversations: list[Conversation], settings: EvalConfig, write: Callable[[str], None]):
        held = [c for c in conversations if c.messages[-1]["role"] == "assistant"][: settings.prompts]
        self.prompts = [c.messages[:-1] for c in held]
        self.references = [c.messages[-1]["content"] for c in held]
        self.renderer, self.settings, self.write = renderer, settings, write
        self.trainer = None
        """Set after the Trainer is built: logs go through `trainer.log`."""
        self.last_step: int | None = None
        self.best_stop_rate = 0.0
        eot = renderer.end_of_turn()
        self.eot = renderer.tokenizer.convert_ids_to_tokens(eot) if eot is not None else "the end-of-turn token"

    @classmethod
    def build(cls, cfg: Config, renderer: Renderer, conversations: list[Conversation],
              write: Callable[[str], None]) -> GenerationMonitor | None:
        """A monitor as the config asks, or None when off (eval.steps=0, eval.prompts=0, no held-out data)."""
        if cfg.eval.steps == 0 or cfg.eval.prompts == 0 or not conversations:
            return None
        return cls(renderer, conversations, cfg.eval, write)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.settings.steps and state.global_step % self.settings.steps == 0:
            self.generate(state, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self.settings.steps is None:
            self.generate(state, model)

    def generate(self, state, model) -> dict | None:
        if state.global_step == self.last_step or not self.prompts:
            return None  # the final evaluation after the last step's own one: same weights, same replies
        self.last_step = state.global_step
        limit = self.settings.max_new_tokens
        replies = generate_replies(model, self.renderer, self.prompts, Sampling(max_new_tokens=limit))
        stats = reply_stats([r.ids for r in replies], [r.stopped for r in replies], [r.text for r in replies], self.references)
        logs = {f"gen_{k}": v for k, v in asdict(stats).items() if k != "count"}
        logs["generations"] = [{"prompt": p[-1]["content"], "reply": r.text, "stopped": r.stopped, "tokens": len(r.ids)}
                               for p, r in zip(self.prompts, replies)]
        if state.is_world_process_zero:
            when = f"step {state.global_step}/{state.max_steps}" if state.max_steps else "before training"
            self.write(f"{when}  held-out replies: {stats.line()}")
            for p, r in zip(self.prompts, replies):
                text = r.text if len(r.text) <= 100 else r.text[:97] + "..."
                self.write(f"    {p[-1]['content'][:40]!r} -> {text!r}" + ("" if r.stopped else " [no stop]"))
            if stats.stop_rate == 0 and state.global_step == 0:
                # The base model, not yet trained: many chat models run long; only a note.
                self.write(f"    (the base model: no reply ended on {self.eot} within {limit} tokens)")
            elif stats.stop_rate == 0:
                fell = f" (it was {self.best_stop_rate:.0%} earlier)" if self.best_stop_rate > 0 else ""
                for line in (
                    f"!!! WARNING: stop rate 0%{fell}: none of the {stats.count} held-out replies ended on {self.eot} within {limit} tokens.",
                    "!!! A chat model that does not end its turn runs on forever when served. Check that `chatlora data check`",
                    f"!!! marks {self.eot} as trained, lower training.learning_rate, or raise eval.max_new_tokens if replies are just long.",
                ):
                    self.write(line)
        self.best_stop_rate = max(self.best_stop_rate, stats.stop_rate)
        if self.trainer is not None:
            self.trainer.log(logs)
        return logs
