"""`chatlora serve RUN [RUN ...]`: the runs' adapters on one shared base model, behind an
OpenAI-compatible HTTP API. Each run folder's name is a model name; the base model is one too."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from chatlora.run import RunDir


def serve(runs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_tokens: int = 1024, max_batch: int = 32, max_body: int = 1 << 20, device: str | None = None,
          echo: Callable[[str], None] = print, decode: str = "auto", max_context: int = 4096) -> None:
    """Serve until interrupted. Raises ChatloraError before loading anything for a bad run folder, an
    address in use, or a non-loopback address without an API key. `decode` picks the decode path
    (chatlora.model.decode.MODES; on CUDA by default a static cache with CUDA graphs and continuous
    batching), `max_context` the tokens of one request with it."""
    from chatlora.serve import server
    from chatlora.serve.app import create_app
    from chatlora.serve.engine import Engine

    server.check_bind(host, api_key)
    for run in runs:
        RunDir.open(run)
    sock = server.bind(host, port)
    engine = Engine.from_runs(runs, device, decode, max_context, echo, max_tokens=max_tokens, max_batch=max_batch)
    try:
        def ready(url: str) -> None:
            echo(f"models: {', '.join(engine.names)} (on {engine.device})")
            echo(f"serving the OpenAI API at {url}/v1" + ("" if api_key else " (no API key)"))

        server.run(create_app(engine, api_key, max_body), sock, ready)
    finally:
        engine.close()
