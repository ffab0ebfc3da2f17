"""The addresses `chatlora serve` prints: 0.0.0.0 is where the server listens, not an address a
client can connect to."""

from __future__ import annotations

import socket

import psutil


def test_an_address_on_every_interface_prints_the_addresses_clients_can_use():
    """0.0.0.0 is where the server listens, not an address a client can connect to."""
    from chatlora.serve import server

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # bound, never listening: only its address is read
        port = s.getsockname()[1]
        found = server.urls(s)
    mine = {a.address for addresses in psutil.net_if_addrs().values() for a in addresses if a.family == socket.AF_INET}
    assert found[0] == f"http://127.0.0.1:{port}"
    assert {u.removeprefix("http://").rsplit(":", 1)[0] for u in found} == mine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        assert server.urls(s) == [server.url(s)]
