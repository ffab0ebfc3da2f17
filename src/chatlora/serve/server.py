"""Run an ASGI app with uvicorn on a socket we bind ourselves, so `--port 0` works and the printed
addresses are real ones (tests read them); refuse to expose an unauthenticated model; keep the
start-up output to what a server's log needs."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable, Iterator

from chatlora.errors import ChatloraError


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Without transformers' "Loading weights" bar, which fills a server's start-up log (its download
    bars stay: a first download takes minutes). Through transformers' tqdm hook, where it has one."""
    from transformers.utils import logging as hf_logging

    if not hasattr(hf_logging, "set_tqdm_hook"):
        yield
        return

    def hook(factory, args, kwargs):
        return factory(*args, **{**kwargs, "disable": True}) if kwargs.get("desc") == "Loading weights" else factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_bind(host: str, api_key: str | None) -> str | None:
    """The API key to serve with: None for none, which an empty one (CHATLORA_API_KEY set but empty)
    also means. Raises ChatloraError for a non-loopback address without one."""
    key = api_key.strip() if api_key is not None else None
    if not is_loopback(host) and not key:
        empty = " (the one given is empty)" if api_key is not None else ""
        raise ChatloraError(
            f"refusing to listen on {host} without an API key{empty}: anyone who can reach that address could use "
            "the model. Pass --api-key KEY (or set CHATLORA_API_KEY), or listen on 127.0.0.1 (the default).")
    return key or None


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


def http(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return http(host, port)


def urls(sock: socket.socket) -> list[str]:
    """The addresses clients can connect to, loopback first. For a socket on every address (0.0.0.0,
    ::) these are this machine's interface addresses, as 0.0.0.0 itself cannot be connected to."""
    host, port = sock.getsockname()[:2]
    if not ipaddress.ip_address(host).is_unspecified:
        return [http(host, port)]
    import psutil  # a dependency of accelerate, which chatlora needs

    families = {socket.AF_INET} if sock.family == socket.AF_INET else {socket.AF_INET, socket.AF_INET6}
    found = [a.address for addresses in psutil.net_if_addrs().values() for a in addresses if a.family in families]
    # Link-local IPv6 addresses need the interface in the URL, which clients handle badly: left out.
    found = [a for a in found if not ipaddress.ip_address(a.split("%")[0]).is_link_local]
    found.sort(key=lambda a: (not ipaddress.ip_address(a).is_loopback, ":" in a))
    return [http(a, port) for a in dict.fromkeys(found)]


def run(app, sock: socket.socket, ready: Callable[[str], None] = print, gate=None, drain_seconds: float = 0,
        cut: Callable[[str], None] = lambda reason: None) -> bool:
    """Serve until SIGTERM or Ctrl-C, then drain (serve/drain.py: requests running get `drain_seconds`
    to finish, then `cut` ends them) and return. `ready` gets the address once listening. Returns
    False when a second Ctrl-C cut the drain short."""
    import uvicorn

    from chatlora.serve.access import setup_logging
    from chatlora.serve.drain import FLUSH_SECONDS, DrainingServer, Gate

    setup_logging()
    # uvicorn's own grace time, after the drain, is for a client that stopped reading.
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=FLUSH_SECONDS)
    server = DrainingServer(config, gate or Gate(), drain_seconds, cut)
    ready(url(sock))
    server.run(sockets=[sock])
    return not server.forced
