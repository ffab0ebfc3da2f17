"""The engine's rows: one request being generated (`Row`), and the engine's mode without a static
cache (`run_batch`): one batch of requests for one model, generated together token by token with
transformers' growing KV cache until its last row ends (continuous batching over the static cache
is the other mode: generate/continuous.py).

Our own loop rather than `model.generate`: each row stops on its own (stop token, stop string,
max_new_tokens, cancel) and leaves the batch at once, and each sampled row draws from its own seeded
torch.Generator, so a seeded reply does not depend on what else was in the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from transformers import DynamicCache

from chatlora.generate.events import Event, Usage
from chatlora.generate.kv_cache import cache_keyword
from chatlora.generate.sampling import Sampling, pick_tokens
from chatlora.generate.text import TextStream

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One request inside a running batch."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    cancelled: Callable[[], bool]
    stream: TextStream
    generator: torch.Generator | None = None
    generated: int = 0
    unsent: list[int] = field(default_factory=list)
    """Token ids not yet attached to an emitted event."""

    def _usage(self) -> Usage:
        return Usage(len(self.prompt), self.generated)

    def step(self, token: int, stop_ids: set[int]) -> bool:
        """Take the next token; emit what it adds. Returns False once the row is finished."""
        self.generated += 1
        self.unsent.append(token)
        if token in stop_ids and not self.sampling.ignore_eos:
            return self._finish(self.stream.finish(), "stop")
        text = self.stream.push(token)
        if self.stream.stopped:
            return self._finish(text, "stop")
        if self.generated >= self.sampling.max_new_tokens:
            return self._finish(text + self.stream.finish(), "length")
        if text:
            self.emit(Event(text, tokens=self._take_unsent()))
        return True

    def advance(self, token: int, stop_ids: set[int]) -> bool:
        """`step`, except that an exception in it (a bug, or a caller's callback that raises) ends this
        row alone, with an error event: the other rows of the batch go on."""
        try:
            return self.step(token, stop_ids)
        except Exception as e:
            log.exception("a request failed")
            self.fail(f"generation failed: {e.__class__.__name__}: {e}")
            return False

    def _finish(self, text: str, reason: str) -> bool:
        self.emit(Event(text, reason, self._usage(), tokens=self._take_unsent()))
        return False

    def fail(self, message: str) -> None:
        """End the row with an error event. Never raises: the engine calls it after something went
        wrong, and a failing callback must not take the engine's thread down with it."""
        try:
            self.emit(Event(finish_reason="error", usage=self._usage(), error=message))
        except Exception:
            log.exception("could not deliver an error event")

    def _take_unsent(self) -> list[int]:
        out, self.unsent = self.unsent, []
        return out


@torch.inference_mode()
def run_batch(model, rows: list[Row], pad_id: int, stop_ids: set[int], on_step: Callable[[int], None] = lambda n: None) -> None:
    """Generate every row to its end. Rows are left-padded so all prompts end at the same column;
    the attention mask hides the padding and position ids count real tokens only, which makes each
    row's greedy reply the same as when it runs alone."""
    device = next(model.parameters()).device
    width = max(len(r.prompt) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r.prompt)) + r.prompt for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = {cache_keyword(model): DynamicCache()}  # filled in place by every forward
    # logits_to_keep=1: the prompt's other positions need no logits (vocab x prompt length x batch floats).
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **cache)
    next_pos = positions[:, -1] + 1
    logits = out.logits[:, -1, :].float()
    while True:
        tokens = pick_tokens(logits, rows)
        keep = [i for i, (row, t) in enumerate(zip(rows, tokens)) if not row.cancelled() and row.advance(t, stop_ids)]
        on_step(len(rows))
        if not keep:
            return
        if len(keep) < len(rows):  # finished and cancelled rows leave the batch and its cache
            index = torch.tensor(keep, device=device)
            next(iter(cache.values())).batch_select_indices(index)
            mask, next_pos, rows = mask[index], next_pos[index], [rows[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = model(input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=mask,
                    position_ids=next_pos[:, None], use_cache=True, **cache)
        next_pos = next_pos + 1
        logits = out.logits[:, -1, :].float()
