"""The engine's mode with a static cache, continuous batching: requests join a running batch between
two decode steps and leave it the step they finish, over the static KV cache of a
generate/decode.py StaticDecoder.

The batch of the engine's other mode (generate/rows.py run_batch) runs until its last row ends, so a request
that arrives meanwhile waits for the longest reply in it. Here it waits at most one step (plus the
prefills of those that arrive with it), and a finished row's slot is free at once.
"""

from __future__ import annotations

from collections.abc import Callable

from chatlora.generate.rows import Row
from chatlora.generate.sampling import pick_tokens


class RunningBatch:
    """The rows generating now, in the decoder's row order, and the token each is fed next."""

    def __init__(self, decoder, stop_ids: set[int], on_tokens: Callable[[int], None] = lambda n: None):
        self.decoder, self.stop_ids, self.on_tokens = decoder, stop_ids, on_tokens
        self.rows: list[Row] = []
        self.next: list[int] = []

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.decoder.slots

    def join(self, row: Row) -> str | None:
        """Prefill the row's prompt and take its first token. Returns "finished", "cancelled" when the
        row is done already, else None (it runs on with the batch)."""
        logits = self.decoder.add(row.prompt)
        token = pick_tokens(logits[None], [row])[0]
        self.on_tokens(1)
        if row.cancelled():
            outcome = "cancelled"
        elif not row.advance(token, self.stop_ids):
            outcome = "finished"
        else:
            self.rows.append(row)
            self.next.append(token)
            return None
        self.decoder.keep(list(range(self.decoder.live - 1)))  # it was added last: drop it again
        return outcome

    def step(self) -> tuple[int, int]:
        """One token for every row; rows that end leave. Returns (finished, cancelled) counts."""
        logits = self.decoder.step(self.next)
        tokens = pick_tokens(logits, self.rows)
        self.on_tokens(len(self.rows))
        keep, finished, cancelled = [], 0, 0
        for i, (row, token) in enumerate(zip(self.rows, tokens)):
            if row.cancelled():
                cancelled += 1
            elif row.advance(token, self.stop_ids):
                keep.append(i)
            else:
                finished += 1
        if len(keep) < len(self.rows):
            order = self.decoder.keep(keep)
            self.rows, self.next = [self.rows[i] for i in order], [tokens[i] for i in order]
        else:
            self.next = tokens
        return finished, cancelled

    def fail(self, message: str) -> None:
        """End every row with an error event and empty the batch (a reader that left gets it unread)."""
        for row in self.rows:
            row.fail(message)
        self.clear()

    def clear(self) -> None:
        self.rows, self.next = [], []
        self.decoder.reset()
