"""Stopping on request without losing anything: SIGTERM (spot instances, schedulers, `kill`) or a first
Ctrl-C during training saves a checkpoint at the end of the current optimizer step and stops; the
recipe then exits with EXIT_PREEMPTED, and `resume=auto` continues exactly there.

A second signal, or one before the training loop has begun (loading, tokenizing: nothing to save
yet) or after it has ended, stops at once with KeyboardInterrupt (exit 130).
"""

from __future__ import annotations

import os
import signal
import sys
import threading


# What a process of `chatlora train --gpus N` receives when its launcher dies (recipes.launch). The
# kernel sends it again each time a thread of the dying launcher exits: repeats are one request.
LAUNCHER_GONE = getattr(signal, "SIGUSR2", None)
SIGNALS = (signal.SIGINT, signal.SIGTERM, *([LAUNCHER_GONE] if LAUNCHER_GONE else []))


class StopOnSignal:
    def __init__(self):
        self.requested: str | None = None
        """The name of the signal that asked training to stop (SIGTERM, SIGINT), or None."""
        self.stopped_at: int | None = None
        """The step whose end saved the checkpoint and stopped training."""
        self.in_loop = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        # Python delivers signals to the main thread only, and refuses handlers from other threads.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if signum == LAUNCHER_GONE and self.requested == "the launcher's end":
            return
        if self.requested is not None or not self.in_loop:
            raise KeyboardInterrupt
        self.requested = "the launcher's end" if signum == LAUNCHER_GONE else signal.Signals(signum).name
        if os.environ.get("RANK", "0") != "0":  # every rank stops; rank 0 says so for all of them
            return
        print(f"\n{self.requested}: saving a checkpoint at the end of this step, then stopping "
              "(Ctrl-C again to stop at once, without it)", file=sys.stderr, flush=True)

    def train_begins(self) -> None:
        self.in_loop = True

    def step_ends(self, args, state, control) -> None:
        """At the end of each optimizer step (the trainer calls it): stop there, saving, when asked."""
        from chatlora.trainer.distributed.ranks import any_rank  # torch.distributed

        if any_rank(self.requested is not None, args.device):
            # Every rank stops at the same step: a signal may reach the ranks of a torchrun job at
            # slightly different moments, and a rank left training alone would wait forever.
            self.requested = self.requested or "a signal to another rank"
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def train_ends(self) -> None:
        self.in_loop = False
