"""The cluster's front door: ``python -m fbjax.router --replica URL --replica URL``.

An OpenAI-compatible server (the endpoints of ``fbjax.serve``) that forwards each
request to one replica chosen by ``--policy``: ``pab`` (FairBatching's Prefill
Admission Budget from each replica's /load), ``least_requests`` or ``round_robin``.
"""

from __future__ import annotations

import signal
import sys

import uvicorn
from absl import app, flags, logging

from fbjax.config import ConfigError
from fbjax.router.prompt import prompt_token_counter
from fbjax.router.server import Router, RouterSettings, build_router_app
from fbjax.routing.dispatch import DEFAULT_MAX_HOLD_S, DEFAULT_POLL_INTERVAL_S
from fbjax.routing.policy import POLICY_NAMES
from fbjax.web.cli import define_http_limit_flags, http_limits_from_flags
from fbjax.web.limits import HttpLimits
from fbjax.web.sockets import listen_socket

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("replica", [], "Base URL of a replica (repeat the flag).")
flags.DEFINE_enum("policy", "pab", list(POLICY_NAMES), "How to pick a replica.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8080, "Port to listen on; 0 picks a free one (logged).")
flags.DEFINE_string("model", None, "The replicas' model directory, for its tokenizer and "
                    "chat template (omitted: the built-in model).")
flags.DEFINE_float("poll_interval_s", DEFAULT_POLL_INTERVAL_S,
                   "How often each replica's /load is read.")
flags.DEFINE_float("max_hold_s", DEFAULT_MAX_HOLD_S,
                   "Longest a request waits for a replica's budget to fit.")
flags.DEFINE_integer("max_queue", 1024, "Held requests beyond this get 429.")
flags.DEFINE_float("shutdown_timeout_s", HttpLimits.shutdown_timeout_s, "On SIGTERM, the "
                   "longest the router waits for open requests before it exits.")
define_http_limit_flags()


def main(argv: list[str]) -> int:
    del argv
    try:
        if not FLAGS.replica:
            raise ConfigError("give at least one --replica URL")
        if FLAGS.poll_interval_s <= 0:
            raise ConfigError("--poll_interval_s must be > 0")
        if FLAGS.max_hold_s < 0 or FLAGS.max_queue < 0:
            raise ConfigError("--max_hold_s and --max_queue must be >= 0")
        settings = RouterSettings(FLAGS.replica, FLAGS.policy, FLAGS.poll_interval_s,
                                  FLAGS.max_hold_s, FLAGS.max_queue,
                                  limits=http_limits_from_flags(FLAGS.shutdown_timeout_s))
        router = Router(settings, prompt_token_counter(FLAGS.model))
        sock = listen_socket(FLAGS.host, FLAGS.port)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    logging.info("routing with %s over %d replicas: %s", FLAGS.policy, len(FLAGS.replica),
                 " ".join(FLAGS.replica))
    logging.info("listening on http://%s:%d", host, port)
    server = uvicorn.Server(uvicorn.Config(build_router_app(router), log_level="warning",
                                           lifespan="on", **settings.limits.uvicorn_kwargs()))
    # uvicorn re-raises the signal that stopped it once it is done; make that a no-op so
    # a graceful stop exits 0 through main's return.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    logging.info("router stopped")
    return 0


if __name__ == "__main__":
    app.run(main)
