"""Conversations into fitted samples (render, tokenize, fit into max_length), in this process or in
`data.num_proc` worker processes, always in the conversations' order.

Both the in-memory path (data/prepare.py) and the streamed one (data/stream.py) call `fit_each`, so
a row gives the same samples, counts and errors either way. A row's time goes to the chat template
(Jinja, in Python under the GIL) and the tokenizer, so threads do not help; worker processes do.
`datasets.map(num_proc=...)` would do the same for the in-memory path, but it shards a finished
dataset, and the streamed path has none: its rows arrive one by one and must keep their order and
line numbers for the error report, so the pool is fed in chunks from an iterator here.
"""

from __future__ import annotations

import collections
import copy
import itertools
import multiprocessing
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from chatlora.data.render import Renderer, RenderError, Tokenized
from chatlora.data.truncate import REPLY_TOO_LONG, fit
from chatlora.errors import Problem

CHUNK = 256  # rows per message to a worker: large enough that pickling is a small share


@dataclass
class Fitted:
    """What one conversation became: its samples as (sample, cut), the truncation rules used, and the
    template's refusal (`error`)."""

    samples: list[tuple[Tokenized, bool]] = field(default_factory=list)
    rules: Counter = field(default_factory=Counter)
    error: str | None = None

    def problem(self, source: str, where: str, max_length: int) -> Problem | None:
        """The row's problem for the data report: the template's refusal, or a reply longer than
        max_length under overlong='error'; None when it fitted."""
        if self.error is not None:
            return Problem(source, where, "", self.error)
        if self.rules[REPLY_TOO_LONG]:
            return Problem(source, where, "", f"the reply alone is longer than data.max_length={max_length}")
        return None


class Fitter:
    """One renderer per `train_on` (a source may train other turns than the run), and the settings."""

    def __init__(self, renderer: Renderer, max_length: int, overlong: str):
        self.renderers = {renderer.train_on: renderer}
        self.train_on, self.max_length, self.overlong = renderer.train_on, max_length, overlong

    def __call__(self, messages: list[dict], train_on: str | None) -> Fitted:
        want = train_on or self.train_on
        if want not in self.renderers:  # the same probed template, other turns trained
            self.renderers[want] = copy.copy(self.renderers[self.train_on])
            self.renderers[want].train_on = want
        out = Fitted()
        try:
            out.samples = fit(messages, self.renderers[want], self.max_length, self.overlong, out.rules)
        except RenderError as e:
            out.error = str(e)
        return out


def fit_each(items: Iterable[tuple[Any, list[dict] | None, str | None]], renderer: Renderer, max_length: int,
             overlong: str, num_proc: int = 1) -> Iterator[tuple[Any, Fitted | None]]:
    """(tag, Fitted) for each (tag, messages, train_on) of `items`, in order; an item whose messages are
    None passes through as (tag, None), in its place (a problem the reader found, kept in file order).
    With num_proc > 1 the rows are fitted in that many worker processes."""
    fitter = Fitter(renderer, max_length, overlong)
    if num_proc <= 1:
        for tag, messages, train_on in items:
            yield tag, None if messages is None else fitter(messages, train_on)
        return
    # spawn, not fork: the parent may hold threads (tokenizers', torch's) that a fork would copy mid-lock.
    # apply_async on a bounded queue, not imap: imap reads its whole input ahead, which for streamed
    # data is the whole file in memory.
    rows, pending = iter(items), collections.deque()
    with multiprocessing.get_context("spawn").Pool(num_proc, initializer=_start, initargs=(fitter,)) as pool:
        while True:
            while len(pending) < 2 * num_proc and (chunk := list(itertools.islice(rows, CHUNK))):
                pending.append((chunk, pool.apply_async(_fit_chunk, ([(m, t) for _, m, t in chunk],))))
            if not pending:
                return
            chunk, result = pending.popleft()
            for (tag, _, _), fitted in zip(chunk, result.get()):
                yield tag, fitted


_FITTER: Fitter | None = None


def _start(fitter: Fitter) -> None:
    global _FITTER
    _FITTER = fitter


def _fit_chunk(chunk: list[tuple[list[dict] | None, str | None]]) -> list[Fitted | None]:
    return [None if messages is None else _FITTER(messages, train_on) for messages, train_on in chunk]
