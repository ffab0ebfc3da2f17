"""The engine behind `chatlora serve` and `chatlora web`: one worker thread owns the model; requests
wait in a queue and run in batches of the same model (adapter or base).

Threads, not asyncio, because a forward pass holds the CPU or GPU for milliseconds at a time and
must not stall the server's event loop. Callers get their reply as Events through a callback
(`submit`) or an iterator (`stream`).

With a `decoder` (the fast path: a static KV cache, CUDA graphs on a GPU) batching is continuous:
requests join the running batch between two steps and leave it the step they finish
(generate/continuous.py). Without one, a batch runs until its last row ends (generate/rows.py).
Both modes share the rows, the sampler (generate/sampling.py) and the detokenizer (generate/text.py).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from chatlora.data.render import Renderer
from chatlora.errors import ChatloraError
from chatlora.generate.continuous import RunningBatch
from chatlora.generate.events import Event, RequestError
from chatlora.generate.rows import Row, run_batch
from chatlora.generate.sampling import Sampling
from chatlora.generate.text import TextStream
from chatlora.model.load import stop_ids

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Ticket:
    """A submitted request; `cancel()` stops its generation at the next token."""

    model: str
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    done: bool = False
    """The last Event was handed out; cancelling now changes nothing."""
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        if not self.done:
            self._cancelled.set()

    def deliver(self, event: Event) -> None:
        self.done = event.done  # before emit: a reader that cancels on its last event finds it done
        self.emit(event)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class Stats:
    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    tokens: int = 0
    """Tokens generated, all rows and batches together."""
    batches: int = 0
    largest_batch: int = 0
    running: int = 0
    """Requests in the batch being generated now."""


def base_model_name(name: str) -> str:
    """The served name of the base model: its config name, or the folder/file name for a local path."""
    path = Path(name)
    if path.exists():
        return path.stem if path.suffix == ".gguf" else path.name
    return name


class Engine:
    """Batched generation for several adapters on one base model.

    `adapters` are the adapter names inside `model` (a peft model), each served under its name;
    `base_name` serves the model with the adapters switched off. `max_tokens` caps one request's new
    tokens; `max_batch` the requests generated together; `max_queue` those waiting (more are refused).
    `decoder` (a chatlora.generate.decode.StaticDecoder over `model`, with `max_batch` slots) turns on
    continuous batching; its graphs are recorded for every served name before the engine starts.
    """

    def __init__(self, model, renderer: Renderer, adapters: Sequence[str], base_name: str, *, max_tokens: int = 1024,
                 max_batch: int = 32, max_queue: int = 256, batch_wait: float = 0.01, decoder=None):
        if len(set(adapters)) != len(adapters):
            raise ChatloraError(f"two runs have the same folder name ({', '.join(adapters)}); each is served under its folder name")
        if base_name in adapters:
            base_name = "base"
        self.model, self.renderer, self.tokenizer = model, renderer, renderer.tokenizer
        self.adapters, self.base_name = list(adapters), base_name
        self.names = [*self.adapters, base_name]
        """Served model names: one per adapter, then the base model."""
        self.max_tokens, self.max_batch, self.max_queue, self.batch_wait = max_tokens, max_batch, max_queue, batch_wait
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.decoder = decoder
        if decoder is not None:
            self.context = decoder.columns  # the static cache's row is the context now
            self.max_batch = decoder.slots
            for name in self.names:
                with self._adapter(name):
                    decoder.variant = name
                    decoder.warm_up()
        self.stop_ids = set(stop_ids(model.generation_config))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.device = next(model.parameters()).device
        self.stats = Stats()
        self._pending: deque[Ticket] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._reason = ""
        work = self._work if decoder is None else self._work_continuous
        self._thread = threading.Thread(target=work, name="chatlora-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_runs(cls, runs: Sequence[str | Path], device: str | None = None, decode: str = "eager",
                  max_context: int = 4096, echo: Callable[[str], None] = log.info, **options) -> "Engine":
        """Load the runs' shared base model once, with every run's adapter, and the fast decode path of
        `decode` (chatlora.model.decode_modes.MODES) with `max_context` tokens per request. Raises ChatloraError."""
        from chatlora.generate.decode import fast_decoder
        from chatlora.model.decode_modes import resolve_mode
        from chatlora.model.from_run import default_device, load_run

        # Resolved paths: a run given as "." must still be served under its folder's name.
        paths = [Path(r).resolve() for r in runs]
        names = [p.name for p in paths]
        if len(set(names)) != len(names):
            raise ChatloraError(f"two runs have the same folder name ({', '.join(names)}); each is served under its folder name")
        resolve_mode(decode, device or default_device())  # a mode this device cannot run fails before loading
        loaded = load_run(paths[0], device, extra_runs=paths[1:])
        # Several adapters (and the base model) share the weights, so they stay unmerged; each served
        # name gets its own recorded graphs.
        decoder = fast_decoder(loaded.model, decode, slots=options.get("max_batch", 32), columns=max_context,
                               echo=echo, warm=False)
        return cls(loaded.model, loaded.renderer, loaded.adapters, base_model_name(loaded.config.model.name),
                   decoder=decoder, **options)

    # -- requests --------------------------------------------------------------------------------

    def prompt(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids; RequestError when the chat template cannot render the messages."""
        try:
            return self.renderer.prompt_ids(messages)
        except Exception as e:  # jinja2 raises its own errors (e.g. a template that refuses system turns)
            raise RequestError(f"the chat template cannot render these messages: {e}", param="messages") from None

    def submit(self, model: str, messages: list[dict], sampling: Sampling, emit: Callable[[Event], None]) -> Ticket:
        """Queue a request. `emit` is called from the engine's thread with each Event, the last with a
        finish_reason. Raises RequestError for an unknown model, a prompt that does not fit, too many
        max_tokens, or a full queue."""
        if model not in self.names:
            raise RequestError(f"The model '{model}' does not exist; this server has: {', '.join(self.names)}",
                               status=404, code="model_not_found", param="model")
        if sampling.max_new_tokens is not None and sampling.max_new_tokens > self.max_tokens:
            raise RequestError(f"max_tokens is {sampling.max_new_tokens}; this server allows at most {self.max_tokens}", param="max_tokens")
        prompt = self.prompt(messages)
        room = self.context - len(prompt) if self.context else self.max_tokens
        if room < 1 or (sampling.max_new_tokens or 1) > room:
            what = "this model's context" if self.decoder is None else "this server's context (--max-context)"
            raise RequestError(f"{what} is {self.context} tokens; the prompt has {len(prompt)} and "
                               f"max_tokens asks for {sampling.max_new_tokens or 1} more", code="context_length_exceeded", param="messages")
        if sampling.max_new_tokens is None:
            sampling = replace(sampling, max_new_tokens=min(self.max_tokens, room))
        ticket = Ticket(model, prompt, sampling, emit)
        with self._cv:
            if self._closed:
                raise RequestError(self._reason, status=503, kind="server_error")
            if len(self._pending) >= self.max_queue:
                raise RequestError(f"the server is busy ({self.max_queue} requests waiting); try again shortly",
                                   status=429, code="server_busy", kind="rate_limit_error")
            self._pending.append(ticket)
            self.stats.requests += 1
            self._cv.notify()
        return ticket

    def stream(self, model: str, messages: list[dict], sampling: Sampling) -> Iterator[Event]:
        """The reply's Events as they come. Closing the iterator early cancels the generation."""
        events: queue.Queue[Event] = queue.Queue()
        ticket = self.submit(model, messages, sampling, events.put)
        try:
            while True:
                event = events.get()
                yield event
                if event.done:
                    return
        finally:
            ticket.cancel()  # no effect once finished; stops the generation when the reader left early

    def complete(self, model: str, messages: list[dict], sampling: Sampling) -> tuple[str, Event, list[int]]:
        """The whole reply: its text, the last Event (finish reason, usage) and the generated token ids."""
        text, tokens = [], []
        for event in self.stream(model, messages, sampling):
            text.append(event.text)
            tokens += event.tokens
        return "".join(text), event, tokens

    def stop(self, reason: str = "the server is shutting down") -> None:
        """Refuse new requests, and end those running or waiting with an error event saying `reason`,
        at their next token. Returns at once (the server's event loop calls it); `close` waits."""
        with self._cv:
            if not self._closed:
                self._closed, self._reason = True, reason
            self._cv.notify()

    @property
    def stopped(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the worker and wait for it; requests running or waiting end with an error event."""
        self.stop()
        self._thread.join(timeout=60)

    # -- the worker thread -----------------------------------------------------------------------

    def _take_batch(self) -> list[Ticket]:
        """The oldest waiting request and the others of the same model after it, up to max_batch."""
        live = [t for t in self._pending if not t.cancelled]
        self.stats.cancelled += len(self._pending) - len(live)  # cancelled while waiting: never run
        batch = [t for t in live if t.model == live[0].model][: self.max_batch] if live else []
        chosen = {id(t) for t in batch}
        self._pending = deque(t for t in live if id(t) not in chosen)
        return batch

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for t in self._pending:
                        self._fail(t, self._reason)
                    return
            # Requests of a burst arrive a few ms apart: wait while more are coming, so they share a batch.
            for _ in range(10):
                seen = len(self._pending)
                if seen >= self.max_batch or self.batch_wait <= 0:
                    break
                time.sleep(self.batch_wait)
                if len(self._pending) == seen:
                    break
            with self._cv:
                batch = self._take_batch()
            if batch:
                self._run(batch)

    def _work_continuous(self) -> None:
        """The worker with a decoder: admit waiting requests of the running batch's model into free
        rows, step the batch once, repeat. Requests of another model wait until the batch drains."""
        batch = RunningBatch(self.decoder, self.stop_ids, self._count_tokens)
        adapter = contextlib.ExitStack()
        current: str | None = None
        while True:
            with self._cv:
                while not self._pending and not batch.rows and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for t in self._pending:
                        self._fail(t, self._reason)
                    batch.fail(self._reason)
                    adapter.close()
                    return
                live = [t for t in self._pending if not t.cancelled]
                self.stats.cancelled += len(self._pending) - len(live)
                if not batch.rows and live and live[0].model != current:
                    current = None
                if current is None and live:
                    current = live[0].model
                    adapter.close()
                    adapter = contextlib.ExitStack()
                    adapter.enter_context(self._adapter(current))
                    self.decoder.variant = current
                    self.stats.batches += 1
                # Another model waits: let this batch drain so its turn comes.
                others = batch.rows and any(t.model != current for t in live)
                free = self.decoder.slots - len(batch.rows)
                joining = [] if others else [t for t in live if t.model == current][:free]
                chosen = {id(t) for t in joining}
                self._pending = deque(t for t in live if id(t) not in chosen)
            for _, row in self._rows(joining):
                try:
                    outcome = batch.join(row)
                except Exception as e:  # a bug or out-of-memory in its prefill: fail this request alone
                    log.exception("prefill failed")
                    batch.decoder.keep(list(range(len(batch.rows))))
                    row.fail(f"generation failed: {e.__class__.__name__}: {e}")
                    self.stats.finished += 1
                    continue
                if outcome == "cancelled":
                    self.stats.cancelled += 1
                elif outcome == "finished":
                    self.stats.finished += 1
            self.stats.running = len(batch.rows)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch.rows))
            if not batch.rows:
                continue
            try:
                finished, cancelled = batch.step()
                self.stats.finished += finished
                self.stats.cancelled += cancelled
            except Exception as e:
                log.exception("generation failed")
                self.stats.finished += len(batch.rows)
                batch.fail(f"generation failed: {e.__class__.__name__}: {e}")
            self.stats.running = len(batch.rows)

    def _count_tokens(self, n: int) -> None:
        self.stats.tokens += n

    def _adapter(self, name: str):
        if name == self.base_name:
            return self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    def _fail(self, t: Ticket, message: str) -> None:
        """End a request that has no Row with an error event. Never raises (see Row.fail)."""
        try:
            t.deliver(Event(finish_reason="error", error=message))
        except Exception:
            log.exception("could not deliver an error event")

    def _rows(self, tickets: list[Ticket]) -> list[tuple[Ticket, Row]]:
        """Each ticket with its Row. A ticket whose Row cannot be made (a bug: its parameters were
        checked when it was submitted) ends alone with an error event and is left out."""
        rows = []
        for t in tickets:
            try:
                rows.append((t, self._row(t)))
            except Exception as e:
                log.exception("a request failed")
                self._fail(t, f"generation failed: {e.__class__.__name__}: {e}")
                self.stats.finished += 1
        return rows

    def _row(self, t: Ticket) -> Row:
        generator = None
        if not t.sampling.greedy:
            generator = torch.Generator(self.device)
            generator.manual_seed(t.sampling.seed if t.sampling.seed is not None else secrets.randbits(63))
        # A closing engine stops its batch at the next token, like a cancel.
        return Row(t.prompt, t.sampling, t.deliver, lambda: t.cancelled or self._closed,
                   TextStream(self.tokenizer, t.sampling.stop), generator)

    def _run(self, tickets: list[Ticket]) -> None:
        started = self._rows(tickets)
        if not started:
            return
        batch, rows = [t for t, _ in started], [row for _, row in started]
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self.stats.running = len(batch)

        def counted(n: int) -> None:
            self.stats.tokens += n

        try:
            with self._adapter(batch[0].model):
                run_batch(self.model, rows, self.pad_id, self.stop_ids, counted)
        except Exception as e:  # a bug or out-of-memory: fail these requests, keep serving the next ones
            log.exception("generation failed")
            for row, t in zip(rows, batch):
                if not t.cancelled and not t.done:
                    row.fail(f"generation failed: {e.__class__.__name__}: {e}")
        finally:
            for row, t in zip(rows, batch):
                if self._closed and not t.done and not t.cancelled:  # its reader still waits for an end
                    row.fail(self._reason)
            self.stats.running = 0
            cancelled = sum(t.cancelled for t in batch)
            self.stats.cancelled += cancelled
            self.stats.finished += len(batch) - cancelled
