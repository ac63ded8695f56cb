"""Load a model (plus LoRA adapters) into an engine and run the app under uvicorn.

SIGTERM/SIGINT: uvicorn stops accepting connections, the app answers 503 to new requests on
open connections, in-flight requests (streams included) run to the end within `drain_timeout`,
then the engine thread stops and the process exits 0.
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

from lmforge.common import LmforgeError, get_logger

from .build import ServeConfig, _require_tokenizer, build_engine, embedding_name, load_adapters  # noqa: F401  (re-exported)

log = get_logger(__name__)


def build_state(cfg: ServeConfig, model=None, tokenizer=None):
    """The ServerState for `cfg` (model and tokenizer loaded from cfg.model unless given). With
    cfg.engine_process the engine runs in a child process that loads the model itself (not for
    a model passed in, nor a vision-language model: its image path shares the engine's weights)."""
    from lmforge.checkpoint import load_tokenizer_if_any
    from lmforge.multimodal import is_multimodal

    from .app import ServerState
    from .defaults import load_generation_defaults
    from .routing import Router
    from .runner import EngineRunner
    from .vision import VisionRunner

    name = cfg.served_model_name or Path(cfg.model).resolve().name
    if name in cfg.adapters:
        raise LmforgeError(f"adapter name {name!r} is also the base model's name; pick another")
    rag = None
    if cfg.rag is not None:  # loaded first: a bad index is an error before the model loads
        from .rag import RagModel

        rag = RagModel.load(cfg.rag, f"{name}-rag", cfg.rag_top_k)
        if rag.name in cfg.adapters:
            raise LmforgeError(f"adapter name {rag.name!r} is also the --rag model's name; pick another")
    max_in_flight = cfg.max_seqs + cfg.max_queue
    common = dict(
        api_key=cfg.api_key,
        request_timeout=cfg.request_timeout,
        max_body_bytes=cfg.max_body_bytes,
        body_timeout=cfg.body_timeout,
        defaults=load_generation_defaults(cfg.model),
        router=None if cfg.route is None else Router(cfg.route),
        rag=rag,
    )
    if cfg.engine_process and model is None and Path(cfg.model).is_dir() and not is_multimodal(cfg.model):
        from .engine_process import EngineProcess

        tokenizer = _require_tokenizer(cfg, load_tokenizer_if_any(cfg.model))
        return ServerState(EngineProcess(cfg, max_in_flight), tokenizer, name, list(cfg.adapters), **common)
    from .engine_ops import EngineOps

    engine, tokenizer, vlm = build_engine(cfg, model, tokenizer)
    ops = EngineOps.build(engine, cfg.embedding_model, cfg.device, cfg.dtype)
    runner = EngineRunner(engine, max_in_flight, ops, cfg.enable_lora_runtime, embedding_name(cfg))
    vision = (
        None
        if vlm is None
        else VisionRunner(
            vlm,
            tokenizer,
            engine._lock,
            runner.max_in_flight,
            engine.max_model_len,
            cfg.max_image_bytes,
            cfg.max_image_pixels,
        )
    )
    return ServerState(runner, tokenizer, name, list(cfg.adapters), vision=vision, **common)


def make_server(cfg: ServeConfig, state=None):
    """A uvicorn.Server for the app (call `.run()`; in a non-main thread it installs no signal handlers)."""
    import uvicorn

    from .app import create_app

    state = state or build_state(cfg)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.draining = True  # new requests on open connections get 503 while the rest finish
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutting down (the process then dies of it); a
            # SIGTERM that drained cleanly is a normal exit, status 0.
            captured = getattr(self, "_captured_signals", [])
            if sig == signal.SIGTERM and sig in captured:
                captured.remove(sig)

    config = uvicorn.Config(
        create_app(state),
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        timeout_graceful_shutdown=cfg.drain_timeout,
        access_log=False,
    )
    return Server(config)


def check_address(host: str, port: int) -> None:
    """LmforgeError unless host:port can be listened on, checked before the model loads (minutes,
    for a big one) rather than after."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(address)
    except OSError as e:
        raise LmforgeError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}") from None


def serve(cfg: ServeConfig) -> None:
    # With --engine thread, the engine runs Python between torch ops; by default it keeps the GIL
    # for 5 ms slices, and every socket write on the event loop then waits for one. Shorter slices
    # keep streaming latency low (measured with bench/serve.py).
    sys.setswitchinterval(0.0005)
    check_address(cfg.host, cfg.port)
    server = make_server(cfg)
    log.info("serving %s on http://%s:%d", cfg.model, cfg.host, cfg.port)
    server.run()
