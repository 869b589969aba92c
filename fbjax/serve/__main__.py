"""OpenAI-compatible server: ``python -m fbjax.serve [--model PATH|NAME] [--port 8000]``.

Builds the engine (compiling every bucket), then serves the endpoints of
fbjax.serve.app with uvicorn on one event loop while the engine steps on its own
thread. ``--port 0`` picks a free port; the address is logged either way. SIGTERM
(or Ctrl-C) drains: no new requests, in-flight ones get ``--shutdown_grace_s`` to
finish and are then aborted with a final event (finish_reason ``"abort"``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import uvicorn
from absl import app, flags, logging

from fbjax import cli_flags
from fbjax.catalog import resolve_model
from fbjax.cli_flags import engine_config_from_flags
from fbjax.config import ConfigError, ModelConfig
from fbjax.engine.engine import LLMEngine
from fbjax.model.chat_template import ChatTemplate
from fbjax.resources import BUILTIN_MODEL_CONFIG
from fbjax.sched.request import InvalidRequestError, check_slo
from fbjax.serve.app import ServerSettings, ServerState, build_app
from fbjax.web.cli import define_http_limit_flags, http_limits_from_flags
from fbjax.web.sockets import listen_socket

API_KEY_ENV = "FBJAX_API_KEY"
# Beyond --shutdown_grace_s, the time the aborted requests' final events get to reach
# their clients before uvicorn closes what is left.
SHUTDOWN_MARGIN_S = 2.0

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(cli_flags)  # --model, --dtype, --scheduler... in --help
FLAGS.set_default("scheduler", "fairbatching")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on; 0 picks a free one (logged).")
flags.DEFINE_string("api_key", None, "If set, /v1 requests need 'Authorization: Bearer KEY'. "
                    "Visible in ps: prefer $FBJAX_API_KEY or --api_key_file.")
flags.DEFINE_string("api_key_file", None, "Read the API key from this file (first line).")
flags.DEFINE_integer("max_queue", 256, "Requests accepted but without a first token yet; "
                     "beyond this the server answers 429 with Retry-After.")
flags.DEFINE_float("slo_ttft_ms", None, "Default TTFT SLO per request (ms); a request may "
                   "override it with the extra field slo_ttft_ms.")
flags.DEFINE_float("slo_tpot_ms", None, "Default TPOT SLO per request (ms); a request may "
                   "override it with the extra field slo_tpot_ms.")
flags.DEFINE_string("served_model_name", None, "Model name clients use (default: the model "
                    "directory's name, or the built-in model's).")
flags.DEFINE_string("chat_template", None, "Jinja chat template file (default: the model's, "
                    "or the simple one documented in fbjax/model/chat_template.py).")
flags.DEFINE_bool("ray", False, "Serve from --replicas Ray Serve replicas (a local Ray "
                  "instance, or the cluster RAY_ADDRESS names), routed by load estimate.")
flags.DEFINE_integer("replicas", 2, "Replicas with --ray.")
flags.DEFINE_float("shutdown_grace_s", 10.0, "On SIGTERM, how long in-flight requests may "
                   "run before they are aborted; the whole exit takes at most this plus "
                   f"{SHUTDOWN_MARGIN_S:g} s, whatever the clients do.")
define_http_limit_flags()
flags.DEFINE_float("engine_stall_timeout_s", 120.0, "With requests in flight and no engine "
                   "step for this long, the engine counts as failed (/health 503).")


class _Server(uvicorn.Server):
    """uvicorn's server, draining the engine when a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.event_loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self.event_loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.event_loop is not None:
            self.event_loop.call_soon_threadsafe(self.state.begin_drain)
        super().handle_exit(sig, frame)


def main(argv: list[str]) -> int:
    del argv
    try:
        if FLAGS.max_queue < 1:
            raise ConfigError(f"--max_queue must be >= 1, got {FLAGS.max_queue}")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            try:
                check_slo(f"--{name}", FLAGS[name].value, unit_s=1e-3)
            except InvalidRequestError as e:
                raise ConfigError(str(e)) from None
        config = engine_config_from_flags()
        settings = _settings(config)
        template = ChatTemplate.for_model(config.model, FLAGS.chat_template)
        if FLAGS.ray:
            return _serve_on_ray(config, settings)
        sock = listen_socket(FLAGS.host, FLAGS.port)
        engine = LLMEngine(config)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    buckets = " ".join(f"{t}x{s}" for t, s in engine.runner.executables.keys())
    logging.info("scheduler %s; compiled %d buckets (tokens x seqs): %s",
                 config.scheduler.policy, len(engine.runner.executables), buckets)
    state = ServerState(engine, settings, template)
    host, port = sock.getsockname()[:2]
    state.address = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    server = _Server(uvicorn.Config(build_app(state), log_level="info", lifespan="on",
                                    timeout_keep_alive=30,
                                    **state.settings.limits.uvicorn_kwargs()), state)
    # uvicorn re-raises the signal that stopped it once it is done; make that a no-op
    # so the process ends through main's return.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    logging.info("server stopped")
    return 0


def _settings(config) -> ServerSettings:
    builtin = resolve_model(config.model) is None
    name = FLAGS.served_model_name or (ModelConfig.from_json(BUILTIN_MODEL_CONFIG).name
                                       if builtin else Path(config.model).name)
    limits = http_limits_from_flags(FLAGS.shutdown_grace_s + SHUTDOWN_MARGIN_S)
    if FLAGS.engine_stall_timeout_s <= 0:
        raise ConfigError("--engine_stall_timeout_s must be > 0")
    return ServerSettings(model_name=name, api_key=_api_key(), max_queue=FLAGS.max_queue,
                          slo_ttft_ms=FLAGS.slo_ttft_ms, slo_tpot_ms=FLAGS.slo_tpot_ms,
                          shutdown_grace_s=FLAGS.shutdown_grace_s, limits=limits,
                          engine_stall_timeout_s=FLAGS.engine_stall_timeout_s)


def _api_key() -> str | None:
    """--api_key, else the first line of --api_key_file, else $FBJAX_API_KEY."""
    sources = [s for s in (FLAGS.api_key is not None, FLAGS.api_key_file is not None) if s]
    if len(sources) > 1:
        raise ConfigError("give the API key once: --api_key or --api_key_file")
    if FLAGS.api_key_file is not None:
        try:
            key = Path(FLAGS.api_key_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError) as e:
            raise ConfigError(f"--api_key_file {FLAGS.api_key_file}: cannot read a key "
                              f"({getattr(e, 'strerror', None) or 'empty file'})") from None
    else:
        key = FLAGS.api_key if FLAGS.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ConfigError("the API key is empty")
    return key


def _serve_on_ray(config, settings: ServerSettings) -> int:
    """``--ray``: the same app in ``--replicas`` Ray Serve replicas behind the PAB router,
    until SIGTERM or Ctrl-C."""
    try:
        from fbjax.serve import ray_app
    except ImportError:
        raise ConfigError("--ray needs Ray Serve: pip install -e '.[ray]'") from None
    if FLAGS.replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {FLAGS.replicas}")
    ray_app.run_forever(config, settings, FLAGS.replicas, FLAGS.host, FLAGS.port,
                        chat_template=FLAGS.chat_template)
    return 0


if __name__ == "__main__":
    app.run(main)
