"""Stopping the server without cutting replies off: the first SIGTERM or Ctrl-C starts a drain.

uvicorn alone stops listening at once, waits a few seconds for running responses, then cancels them:
a stream in flight just breaks (no error chunk, no [DONE]), and it re-raises the signal afterwards,
so SIGTERM always exits 143. Here the server keeps listening while it drains, answering new requests
503 (a load balancer moves on), lets the running ones finish for up to `drain_seconds`, then ends
what is left through the engine, so each stream still gets an error chunk and [DONE]. Only then does
uvicorn's own shutdown run, with nothing left to cancel. A second Ctrl-C ends the drain at once.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

import uvicorn

log = logging.getLogger("chatlora.serve")

FLUSH_SECONDS = 3.0
"""After the cut: how long the ended streams get to write their error chunk before uvicorn's shutdown
(a client that stopped reading is then cancelled by it)."""


class Gate:
    """What the app and the server share: whether the server is draining, and how many requests are
    inside the app (streams until their last chunk is written)."""

    def __init__(self) -> None:
        self.draining = False
        self.active = 0


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with the drain above. `cut(reason)` ends the engine's running and waiting
    requests with an error event (Engine.stop); it must return at once."""

    def __init__(self, config: uvicorn.Config, gate: Gate, drain_seconds: float, cut: Callable[[str], None]):
        super().__init__(config)
        self.gate, self.drain_seconds, self.cut = gate, drain_seconds, cut
        self.signalled: float | None = None
        """When the first signal came (time.monotonic), else None."""
        self.deadline = 0.0
        self.forced = False
        """A second Ctrl-C cut the drain short (the command then exits 130)."""
        self.cut_at: float | None = None
        self.announced = False

    def handle_exit(self, sig: int, frame) -> None:
        # A signal handler: only set state here (no logging: its lock may be held by the code the
        # signal interrupted); on_tick acts on it. uvicorn's own handler is not called, as it would
        # re-raise the signal once the server is down.
        if self.signalled is None:
            self.signalled = time.monotonic()
            self.deadline = self.signalled + self.drain_seconds
            self.gate.draining = True
        elif sig == signal.SIGINT:
            self.forced = True
            self.deadline = 0.0

    async def on_tick(self, counter: int) -> bool:
        stop = await super().on_tick(counter)  # keeps the Date header fresh; True only for limit_max_requests
        if self.signalled is None:
            return stop
        now = time.monotonic()
        if self.cut_at is None:
            if self.gate.active == 0:
                return True
            if not self.announced:
                self.announced = True
                log.warning(f"stopping: {self.gate.active} request(s) running get up to {self.drain_seconds:g} s to "
                            "finish; new requests get 503 (Ctrl-C again to end them now)")
            if now >= self.deadline:
                why = "a second Ctrl-C" if self.forced else f"its drain time of {self.drain_seconds:g} s ran out"
                log.warning(f"stopping ({why}): ending {self.gate.active} request(s) with an error")
                self.cut(f"the server stopped before this reply was finished ({why})")
                self.cut_at = now
            return False
        return self.gate.active == 0 or now - self.cut_at > FLUSH_SECONDS
