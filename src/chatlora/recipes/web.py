"""`chatlora web RUN [RUN ...]`: the Streamlit chat page, generating in this process with the same
Engine as `chatlora serve`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from chatlora.errors import ChatloraError
from chatlora.run import RunDir


def web(runs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8501, max_tokens: int = 1024,
        device: str | None = None, echo: Callable[[str], None] = print, decode: str = "auto") -> None:
    """Serve the chat page until interrupted. Raises ChatloraError, before the model loads, for a bad
    run folder, a non-loopback address (the page has no login: put it behind a proxy with one), a
    port in use, or Streamlit missing."""
    from chatlora.serve import page, server

    if not server.is_loopback(host):
        raise ChatloraError(f"refusing to serve the chat page on {host}: it has no login. Listen on 127.0.0.1 (the "
                            "default) and reach it through an SSH tunnel, or use `chatlora serve --api-key`.")
    page.require_streamlit()
    for run in runs:
        RunDir.open(run)
    server.bind(host, port).close()  # fail now, with our message, if the port is taken
    from chatlora.generate.engine import Engine

    echo(f"loading {', '.join(Path(r).resolve().name for r in runs)} ...")
    with server.quiet_loading():
        engine = Engine.from_runs(runs, device, decode, echo=echo, max_tokens=max_tokens)
    try:
        page.launch(engine, host, port, echo)
    finally:
        engine.close()
