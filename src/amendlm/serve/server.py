"""Run the server: :class:`ServeConfig` -> load the models once -> engine + app -> uvicorn.

Shutdown: on SIGTERM (or Ctrl-C) uvicorn stops accepting connections, lets the responses in flight
end for at most ``shutdown_timeout`` seconds (then cancels them), and the app's lifespan stops the
engine with what is left of those seconds (a running batch past them has its rows cancelled at its
next step); :func:`serve` then returns, so the command exits 0 after a SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import threading
from dataclasses import asdict, dataclass, field

from amendlm.modeling import parse_dtype
from amendlm.ram.decoding import DecodeConfig


@dataclass
class ServeConfig:
    """Options of ``amendlm serve``.

    Attributes:
        model: embedded name, local directory or hub id of the proposal (served alone as ``name``).
        adapter: PEFT adapter directory applied to ``model`` (e.g. a BiasUnlearn run); served unmerged.
        aligners: ``{NAME: DIR}``; each is served as ``name+NAME`` with the one proposal.
        name: the id of the model alone (default: ``model``).
        decode: default RAM rule of the pairs (requests override fields).
        max_batch_size: rows decoded together (1 = one request at a time). 8.
        max_wait_ms: how long the oldest waiting request waits for others before its batch starts. 10.
        max_queue: waiting prompts at most; more get 503 with Retry-After. 256.
        default_max_tokens: completion length when a request sets none (cut to the context left). 128.
        shutdown_timeout: seconds in-flight requests get after SIGTERM. 30.
        dtype: ``fp32``, ``bf16`` autocast or ``auto``.
    """

    model: str
    adapter: str | None = None
    aligners: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 256
    default_max_tokens: int = 128
    shutdown_timeout: float = 30.0
    dtype: str = "fp32"
    device: str = "cpu"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.shutdown_timeout < 0:
            raise ValueError(f"max_wait_ms ({self.max_wait_ms}) and shutdown_timeout ({self.shutdown_timeout}) must be >= 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        parse_dtype(self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


def build_app(config: ServeConfig, served=None):
    """The FastAPI app of ``config`` (models loaded here unless ``served`` is given) and its engine."""
    from amendlm.serve.app import create_app
    from amendlm.serve.engine import Engine
    from amendlm.serve.models import load_served

    if served is None:
        served = load_served(config.model, config.adapter, config.aligners, config.decode, config.name, config.device,
                             config.trust_remote_code)
    engine = Engine(config.max_batch_size, config.max_wait_ms, config.max_queue, config.dtype)
    return create_app(served, engine, config.default_max_tokens, config.shutdown_timeout), engine


def uvicorn_server(app, config: ServeConfig):
    """A ``uvicorn.Server`` for ``app`` with the graceful-shutdown bound of ``config``; it records when
    the first signal arrived in ``app.state.shutdown_began`` so the engine gets only what is left."""
    import time

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if getattr(app.state, "shutdown_began", None) is None:
                app.state.shutdown_began = time.monotonic()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                 timeout_graceful_shutdown=config.shutdown_timeout, access_log=False))


def serve(config: ServeConfig, on_ready=None) -> None:
    """Load the models, then serve until SIGTERM / Ctrl-C; returns after a graceful shutdown.

    ``on_ready(host, port)`` is called once the socket listens (the port actually bound when ``config.port`` is 0).
    """
    app, _ = build_app(config)
    server = uvicorn_server(app, config)
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.set_inheritable(True)
    host, port = sock.getsockname()[:2]
    if on_ready is not None:
        threading.Thread(target=_when_started, args=(server, on_ready, host, port), daemon=True).start()
    # uvicorn re-raises the signal that stopped it once it has shut down; a SIGTERM handler that does
    # nothing then lets the command return normally (exit 0) instead of dying by that signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)


def _when_started(server, on_ready, host, port) -> None:
    import time

    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        on_ready(host, port)
