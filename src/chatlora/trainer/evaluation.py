"""Evaluation during training: best-checkpoint settings, replies generated on held-out prompts every
N steps (stop rate, length, repetition), and TensorBoard in the run folder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from chatlora.config.schema import Config, EvalConfig
from chatlora.data.formats import Conversation
from chatlora.data.render import Renderer
from chatlora.evaluate.metrics import reply_stats
from chatlora.generate.replies import generate_replies
from chatlora.generate.sampling import Sampling


def evaluation_arguments(cfg: Config, kwargs: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments kwargs with the best-checkpoint settings completed (the config checked the
    combinations when it was loaded: config.schema._check_evaluation).

    `load_best_model_at_end` alone is enough: checkpoints are then saved only when the held-out loss
    improves (`save_strategy=best`) and only the best is kept (`save_total_limit=1`), unless the
    config says otherwise.
    """
    out = dict(kwargs)
    if out.get("load_best_model_at_end"):
        if "save_strategy" not in cfg.training:
            out["save_strategy"] = "best"
        if "save_total_limit" not in cfg.training:
            out["save_total_limit"] = 1
    return out


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
