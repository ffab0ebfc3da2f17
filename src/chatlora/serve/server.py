"""Run an ASGI app with uvicorn on a socket we bind ourselves, so `--port 0` works and the printed
address is the real one (tests read it), and refuse to expose an unauthenticated model."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from chatlora.errors import ChatloraError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Raises ChatloraError for a non-loopback address without an API key."""
    if api_key is not None and not api_key.strip():
        raise ChatloraError("the API key is empty; pass a real one with --api-key or CHATLORA_API_KEY")
    if not is_loopback(host) and api_key is None:
        raise ChatloraError(
            f"refusing to listen on {host} without an API key: anyone who can reach that address could use the "
            "model. Pass --api-key KEY (or set CHATLORA_API_KEY), or listen on 127.0.0.1 (the default).")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; raises ChatloraError when the address cannot be used."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # connections made right after the address is printed wait in the backlog
    except OSError as e:
        raise ChatloraError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(app, sock: socket.socket, ready: Callable[[str], None] = print) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM), then return."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    ready(url(sock))
    server.run(sockets=[sock])
