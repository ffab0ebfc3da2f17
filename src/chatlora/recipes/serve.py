"""`chatlora serve RUN [RUN ...]`: the runs' adapters on one shared base model, behind an
OpenAI-compatible HTTP API. Each run folder's name is a model name; the base model is one too."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from chatlora.run import RunDir

DRAIN_SECONDS = 20.0
"""How long requests running at SIGTERM or Ctrl-C get to finish: under the 30 s Kubernetes waits by
default before it sends SIGKILL."""


def serve(runs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_tokens: int = 1024, max_batch: int = 32, max_body: int = 1 << 20, device: str | None = None,
          echo: Callable[[str], None] = print, decode: str = "auto", max_context: int = 4096,
          drain_seconds: float = DRAIN_SECONDS) -> None:
    """Serve until SIGTERM or Ctrl-C, then stop taking requests and give those running `drain_seconds`
    to finish (serve/drain.py). Raises ChatloraError before loading anything for a bad run folder, an
    address in use, or a non-loopback address without an API key; KeyboardInterrupt when a second
    Ctrl-C cut the drain short. `decode` picks the decode path (chatlora.model.decode_modes.MODES; on CUDA
    by default a static cache with CUDA graphs and continuous batching), `max_context` the tokens of
    one request with it."""
    from chatlora.serve import server
    from chatlora.serve.app import create_app
    from chatlora.serve.drain import Gate
    from chatlora.generate.engine import Engine

    api_key = server.check_bind(host, api_key)
    for run in runs:
        RunDir.open(run)
    sock = server.bind(host, port)
    started = time.perf_counter()
    echo(f"loading {', '.join(Path(r).resolve().name for r in runs)} ...")
    with server.quiet_loading():
        engine = Engine.from_runs(runs, device, decode, max_context, echo, max_tokens=max_tokens, max_batch=max_batch)
    try:
        def ready(_: str) -> None:
            first, *others = server.urls(sock)
            echo(f"models: {', '.join(engine.names)} (on {engine.device}, loaded in {time.perf_counter() - started:.0f} s)")
            echo(f"serving the OpenAI API at {first}/v1" + ("" if api_key else " (no API key)"))
            for other in others:
                echo(f"  also at {other}/v1")
            echo(f"SIGTERM or Ctrl-C stops it, giving running requests {drain_seconds:g} s to finish")

        gate = Gate()
        finished = server.run(create_app(engine, api_key, max_body, gate), sock, ready, gate, drain_seconds, engine.stop)
    finally:
        engine.close()
    if not finished:
        raise KeyboardInterrupt
