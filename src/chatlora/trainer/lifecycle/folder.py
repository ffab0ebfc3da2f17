"""Everything `chatlora train` does around the training itself so that nothing is lost and every stop
is explained: the resume plan, signals, the non-finite guard, stamped checkpoints, and what is left
of the run folder when something fails.

A run that fails before its training loop begins (a model that will not load, a bad LoRA target,
Ctrl-C while loading) removes the folder it created: nothing in it was worth keeping. One that fails
later keeps it, with its complete checkpoints, and the message says how to continue.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chatlora.config.schema import Config
from chatlora.errors import ChatloraError, Preempted, ResumeError, StorageError, refuse_file_in_the_way
from chatlora.run import RunDir, step_of
from chatlora.trainer.lifecycle import checkpoint as ckpt
from chatlora.trainer.plot import read_metrics
from chatlora.trainer.lifecycle.resume import Plan, check_unchanged, fingerprint, plan
from chatlora.trainer.lifecycle.stop import StopOnSignal

if TYPE_CHECKING:
    from chatlora.trainer.guard import NonFiniteGuard

# Files a run writes while training, removed when an unfinished run with no checkpoint starts over.
RESTART_REMOVES = ("metrics.jsonl", "loss.png", "compare.txt", "tensorboard", ".adapter.tmp")


class RunLifecycle:
    def __init__(self, cfg: Config, echo: Callable[[str], None] = print):
        self.cfg, self.echo = cfg, echo
        self.stop = StopOnSignal()
        self.plan: Plan | None = None
        self.created = False
        """The run folder did not exist and this run made it."""
        self.was_empty = False
        """The run folder existed, empty (the user made it): a failure empties it again but keeps it."""
        self.training = False
        """The training loop has begun: from here on the folder is kept whatever happens."""
        self.stamp: dict | None = None
        self.trainer = None

    @property
    def run(self) -> RunDir | None:
        return self.plan.run if self.plan else None

    # -- before training ---------------------------------------------------------------------------

    def _plan(self, run: RunDir) -> Plan:
        """What start() will do with `run` (reads only): raises for output_dir a file or under one, or a
        resume target that is not there or is damaged."""
        refuse_file_in_the_way(run.path, "output_dir", "unset: runs/<name>-<date>-<time>")
        return plan(self.cfg, run)

    def refuse_early(self, run: RunDir) -> None:
        """The refusals of start() that need no data, also a new run aimed at a folder that holds
        another. Called before the data is read, so a wrong folder is named in a second, not after
        tokenizing; start() plans again (checkpoint headers only, cheap)."""
        if self._plan(run).kind == "new":
            run.refuse_taken()

    def start(self, run: RunDir, args, data_key: str) -> str | None:
        """Plan the run (reads only, so a refusal changes nothing), then make or reuse its folder.
        Returns the checkpoint to resume from, or None. Replaces `run.create()`."""
        self.plan = self._plan(run)
        run = self.plan.run
        if str(run.checkpoints) != args.output_dir:
            args.output_dir = str(run.checkpoints)  # resume=PATH names the run folder
        self.stamp = fingerprint(self.cfg, args, data_key)
        if self.plan.kind == "finished":
            last = run.latest_checkpoint()
            more = (f" To train it further, resume from {last} with resume={last} resume_allow_changes=true and a higher "
                    "training.max_steps." if last else "")
            self.echo(f"resume=auto: the run in {run.path} has finished (its adapter is in {run.adapter}); nothing to do.{more}")
            return None
        if self.plan.kind == "resume":
            changes = check_unchanged(self.plan.checkpoint, self.stamp, self.cfg.resume_allow_changes)
            for line in changes:
                self.echo(f"warning: resuming with a change (resume_allow_changes=true): {line}")
            self.echo(f"resuming from {self.plan.checkpoint} (step {step_of(self.plan.checkpoint)})")
            ckpt.remove_partial(run.checkpoints)
            return str(self.plan.checkpoint)
        if self.plan.kind == "restart":
            self.echo(f"resume=auto: {run.path} holds an unfinished run with no complete checkpoint; starting it over")
            ckpt.remove_partial(run.checkpoints)
            for name in RESTART_REMOVES:
                path = run.path / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            return None
        self.created = not run.path.exists()
        self.was_empty = not self.created and not any(run.path.iterdir())
        run.create()
        return None

    @property
    def finished(self) -> bool:
        """resume=auto found the run already finished: there is nothing to train."""
        return self.plan is not None and self.plan.kind == "finished"

    def decision(self) -> tuple[str, str, str | None]:
        """What start() decided (kind, run folder, checkpoint), for the other processes' follow()."""
        return self.plan.kind, str(self.plan.run.path), str(self.plan.checkpoint) if self.plan.checkpoint else None

    def follow(self, args, data_key: str, decision: tuple[str, str, str | None]) -> None:
        """start() for every process but rank 0 of a multi-process run: take rank 0's decision
        without touching the folder (rank 0 alone makes, cleans and writes it)."""
        kind, path, checkpoint = decision
        self.plan = Plan(kind, RunDir(Path(path)), Path(checkpoint) if checkpoint else None)
        args.output_dir = str(self.plan.run.checkpoints)
        self.stamp = fingerprint(self.cfg, args, data_key)

    def guard(self) -> NonFiniteGuard:
        """The non-finite guard for the trainer (which calls it at each step), as the config asks."""
        from chatlora.trainer.guard import NonFiniteGuard  # torch: not before the data is checked

        write = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        return NonFiniteGuard(self.cfg.on_nonfinite, write)

    def attach(self, trainer) -> None:
        """The training loop is about to begin with this trainer (built with the stamp, the guard and
        stop-on-signal from here). On a resume, drops the metrics logged after the checkpoint (they
        are logged again)."""
        self.trainer = trainer
        if self.plan and self.plan.kind == "resume":
            _truncate_metrics(self.run.metrics, step_of(self.plan.checkpoint) or 0)
        self.training = True

    def eval_loss_before(self) -> float:
        """The held-out loss before training, as the interrupted run logged it (resumed runs do not
        evaluate it again)."""
        rows = read_metrics(self.run.metrics) if self.run else []
        return next((r["eval_loss"] for r in rows if r.get("step") == 0 and "eval_loss" in r), float("nan"))

    def finished_training(self, trainer) -> None:
        """Raises Preempted when a signal stopped training before its last step (the checkpoint is saved)."""
        state = trainer.state
        if self.stop.requested and state.global_step < state.max_steps:
            where = self.run.latest_checkpoint()
            raise Preempted(
                f"{self.stop.requested} at step {state.global_step} of {state.max_steps}: saved {where}. "
                f"Continue exactly from there with the same command and resume=auto output_dir={self.run.path}."
            )

    # -- the with-block ----------------------------------------------------------------------------

    def __enter__(self) -> "RunLifecycle":
        self.stop.install()
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        self.stop.uninstall()
        if error is None:
            return False
        self._close_progress_bars()  # so the message starts on a line of its own
        if isinstance(error, pickle.UnpicklingError) and self.plan and self.plan.kind == "resume":
            # torch's own message suggests weights_only=False, the one thing not to do with a file
            # that asks to run code; only the line naming what it asked for is passed on.
            what = next((line for line in str(error).splitlines() if "GLOBAL" in line or "global" in line), "")
            raise ResumeError(
                f"cannot resume from {self.plan.checkpoint}: one of its files holds more than tensors and numbers"
                + (f" ({what.strip().rstrip('.')})" if what else "") + ". chatlora loads checkpoints with weights_only=True "
                "and never runs code stored in them; resume from a checkpoint chatlora wrote, or start over."
            ) from None
        run = self.run
        if run is None or not run.path.exists():
            return False
        ckpt.remove_partial(run.checkpoints)
        shutil.rmtree(run.path / ".adapter.tmp", ignore_errors=True)
        reason = None if isinstance(error, ChatloraError) else ckpt.storage_reason(error)
        if not self.training:
            if self.created:
                shutil.rmtree(run.path, ignore_errors=True)  # made by this run, and nothing trained yet
            elif self.was_empty:
                for child in run.path.iterdir():
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            if reason is not None:
                raise StorageError(f"could not write to {run.path}: {reason}") from None
            return False
        if isinstance(error, Preempted):
            return False
        kept = self._what_is_kept()
        if reason is not None:
            raise StorageError(f"could not write to {run.path}: {reason}.\n{kept}") from None
        if isinstance(error, ChatloraError):
            error.args = (f"{error}\n{kept}",)
        elif isinstance(error, KeyboardInterrupt):
            print(kept, file=sys.stderr)
        return False

    def _close_progress_bars(self) -> None:
        for callback in self.trainer.callback_handler.callbacks if self.trainer else []:
            if getattr(callback, "bar", None) is not None:
                callback.bar.close()
                callback.bar = None

    def _what_is_kept(self) -> str:
        run = self.run
        last = run.latest_checkpoint()
        if last is not None:
            return (f"The run folder {run.path} keeps its last complete checkpoint, {last.name}: continue from it "
                    f"with resume=auto output_dir={run.path} (add resume_allow_changes=true to change settings).")
        return (f"The run folder {run.path} has no checkpoint to continue from (training.save_strategy=steps with "
                f"training.save_steps=N saves some); start it over with resume=auto output_dir={run.path}, or delete it.")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows logged up to the checkpoint's step: the interrupted run may have logged a few
    steps past it, and the resumed run logs those again."""
    if not path.is_file():
        return
    from chatlora.run import write_atomic

    # read_metrics drops a line torn by a kill in mid-write; rows are written back as MetricsLog wrote them.
    kept = [row for row in read_metrics(path) if row.get("step", 0) <= step]
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
