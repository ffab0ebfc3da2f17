"""Launch the Streamlit chat page (web_page.py) in this process, with an Engine loaded beforehand.

Streamlit runs the page script in this same process, once per browser interaction; the script finds
the engine here, so the model is loaded once (before the page opens) and shared by every tab.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from chatlora.errors import ChatloraError
from chatlora.serve.engine import Engine
from chatlora.serve.params import RequestError, SamplingParams

_engine: Engine | None = None
SCRIPT = Path(__file__).with_name("web_page.py")


def current_engine() -> Engine:
    if _engine is None:
        raise RuntimeError("no engine: start the page with `chatlora web RUN`, not `streamlit run`")
    return _engine


class Reply:
    """The reply's text pieces as generated, for st.write_stream; afterwards `note` says how it ended.
    Leaving early (the user stops the page or sends another message) cancels the generation."""

    def __init__(self, engine: Engine, model: str, messages: list[dict], params: SamplingParams):
        self.engine, self.model, self.messages, self.params = engine, model, messages, params
        self.note = ""

    def __iter__(self) -> Iterator[str]:
        started = time.perf_counter()
        try:
            for event in self.engine.stream(self.model, self.messages, self.params):
                if event.error:
                    yield f"\n\n*[{event.error}]*"
                elif event.text:
                    yield event.text
                if event.done and event.usage:
                    ending = {"length": ", stopped at the token limit", "error": ", failed"}.get(event.finish_reason, "")
                    self.note = f"{event.usage.completion_tokens} tokens in {time.perf_counter() - started:.1f} s{ending}"
        except RequestError as e:  # raised by the first step: an unknown model, a prompt too long
            yield f"*{e}*"
            self.note = "refused"


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
