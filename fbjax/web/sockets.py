"""The listening socket, bound before the slow start-up so a taken port fails at once."""

from __future__ import annotations

import socket

from fbjax.config import ConfigError


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound, listening, non-blocking socket; ``port`` 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock
