"""Launch the Streamlit chat page (web_page.py) in this process, with an Engine loaded beforehand;
and what the page script does with the engine: a Reply streamed, a refusal explained, the history
as the model gets it.

Streamlit runs the page script in this same process, once per browser interaction; the script finds
the engine here, so the model is loaded once (before the page opens) and shared by every tab.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from chatlora.errors import ChatloraError
from chatlora.generate.engine import Engine
from chatlora.generate.events import Event, RequestError
from chatlora.generate.sampling import Sampling

_engine: Engine | None = None
SCRIPT = Path(__file__).with_name("web_page.py")


def current_engine() -> Engine:
    if _engine is None:
        raise RuntimeError("no engine: start the page with `chatlora web RUN`, not `streamlit run`")
    return _engine


class Reply:
    """A reply being generated for the page. Made by submitting the request (RequestError when the
    engine refuses it: see `refusal`); `pieces()` then hands out its text as it comes.

    `cancel()` stops the generation, or drops the request while it waits: the page calls it however
    the script run ends, as a run that is stopped (the Stop button, a rerun) would otherwise leave it
    generating for nobody.
    """

    TICK = 0.5
    """Seconds between two "still thinking" ticks while no text comes."""

    def __init__(self, engine: Engine, model: str, messages: list[dict], sampling: Sampling):
        self.events: queue.Queue[Event] = queue.Queue()
        self.started = time.perf_counter()
        self.ticket = engine.submit(model, messages, sampling, self.events.put)
        self.text = ""
        self.note = ""
        """How it ended: "N tokens in S s", with ", stopped at the token limit" or the error."""
        self.done = False

    @property
    def waited(self) -> float:
        return time.perf_counter() - self.started

    def pieces(self) -> Iterator[str | None]:
        """The reply's new text as it comes, and None every TICK seconds while none comes: the page then
        shows that it is still thinking (a long queue, a long prompt), and each such update lets
        Streamlit stop the script run."""
        while not self.done:
            try:
                event = self.events.get(timeout=self.TICK)
            except queue.Empty:
                yield None
                continue
            if event.text:
                self.text += event.text
                yield event.text
            if event.done:
                self.done = True
                tokens = event.usage.completion_tokens if event.usage else 0
                ending = {"length": ", stopped at the token limit"}.get(event.finish_reason, "")
                if event.error:
                    ending = f", failed: {event.error}"
                self.note = f"{tokens} tokens in {self.waited:.1f} s{ending}"

    def cancel(self) -> None:
        self.ticket.cancel()  # no effect once finished


def refusal(e: RequestError, engine: Engine, messages: list[dict], sampling: Sampling) -> str:
    """Why the page did not send a message, and what to do, in the page's terms (its controls)."""
    if e.code != "context_length_exceeded" or not engine.context:
        return f"Not sent: {e}"
    total = len(engine.prompt(messages))
    alone = len(engine.prompt([m for m in messages if m["role"] == "system"] + messages[-1:]))
    reply = sampling.max_new_tokens or 1
    if alone + reply > engine.context:
        return (f"Not sent: this message is too long for the model, which reads {engine.context} tokens at most: "
                f"the message is {alone} tokens and the reply may take {reply} more (Max new tokens). "
                "Shorten the message, or lower Max new tokens.")
    return (f"Not sent: the conversation has grown too long for the model, which reads {engine.context} tokens at "
            f"most: with this message it is {total} tokens, and the reply may take {reply} more (Max new tokens). "
            "Clear history to start a new conversation, or lower Max new tokens.")


def sendable(messages: list[dict]) -> list[dict]:
    """The page's history as the model gets it: role and content, leaving out each exchange whose
    reply is empty (stopped before its first token, or failed), so no two user turns follow each other."""
    history = []
    for user, reply in zip(messages[::2], messages[1::2]):
        if reply["content"].strip():
            history += [{"role": m["role"], "content": m["content"]} for m in (user, reply)]
    return history


def require_streamlit():
    """Streamlit's bootstrap module; ChatloraError when Streamlit is not installed. `chatlora web` asks
    before it loads the model, which can take minutes."""
    try:
        from streamlit.web import bootstrap
    except ImportError:
        raise ChatloraError("the chat page needs Streamlit, which is not installed: pip install 'chatlora[web]'") from None
    return bootstrap


def launch(engine: Engine, host: str, port: int, echo: Callable[[str], None] = print) -> None:
    """Run Streamlit's server until interrupted."""
    global _engine
    bootstrap = require_streamlit()
    _engine = engine
    flags = {
        "server.address": host, "server.port": port, "server.headless": True, "server.fileWatcherType": "none",
        "server.runOnSave": False, "browser.gatherUsageStats": False, "global.developmentMode": False,
        "client.toolbarMode": "minimal", "browser.serverAddress": host, "browser.serverPort": port,
    }
    bootstrap.load_config_options(flags)
    echo(f"models: {', '.join(engine.names)} (on {engine.device})")
    echo(f"chat page at http://{host}:{port}")
    bootstrap.run(str(SCRIPT), False, [], flags)
