"""The HTTP-limit flags the server and the router both take, defined once."""

from __future__ import annotations

from absl import flags

from fbjax.config import ConfigError
from fbjax.web.limits import HttpLimits

FLAGS = flags.FLAGS


def define_http_limit_flags() -> None:
    """``--header_timeout_s``, ``--max_connections``, ``--max_body_bytes``."""
    flags.DEFINE_float("header_timeout_s", HttpLimits.header_timeout_s, "Close a connection "
                       "whose request headers have not all arrived within this many seconds.")
    flags.DEFINE_integer("max_connections", HttpLimits.max_connections, "Open connections "
                         "at most; more are closed at once.")
    flags.DEFINE_integer("max_body_bytes", HttpLimits.max_body_bytes, "Largest request "
                         "body; larger ones get 413 before they are read.")


def http_limits_from_flags(shutdown_timeout_s: float) -> HttpLimits:
    """The limits the flags give; a bad value is a ConfigError naming the flag."""
    try:
        return HttpLimits(header_timeout_s=FLAGS.header_timeout_s,
                          max_connections=FLAGS.max_connections,
                          max_body_bytes=FLAGS.max_body_bytes,
                          shutdown_timeout_s=shutdown_timeout_s)
    except ValueError as e:
        raise ConfigError(f"--{e}") from None
