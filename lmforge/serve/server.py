"""Load a model (plus LoRA adapters) into an engine and run the app under uvicorn.

SIGTERM/SIGINT: uvicorn stops accepting connections, the app answers 503 to new requests on
open connections, in-flight requests (streams included) run to the end within `drain_timeout`,
then the engine thread stops and the process exits 0.
"""

from __future__ import annotations

import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.common import LmforgeError, get_device, get_logger

log = get_logger(__name__)


@dataclass
class ServeConfig:
    model: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter folder
    served_model_name: str | None = None  # default: the model folder's name
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "float32"
    max_seqs: int = 32  # sequences decoded together
    max_queue: int = 64  # requests waiting beyond max_seqs before 429
    max_batch_tokens: int = 2048
    block_size: int = 16
    num_blocks: int | None = None
    max_model_len: int | None = None
    request_timeout: float = 600.0
    max_body_bytes: int = 1 << 20
    body_timeout: float = 30.0  # seconds for a request body to arrive in full (else 408)
    max_image_bytes: int = 8 << 20  # a vision model's image (base64 data URLs only), encoded
    max_image_pixels: int = 4096 * 4096  # and its width x height, read before decoding
    drain_timeout: float = 30.0
    draft: str | None = None  # a smaller model folder with the same tokenizer: speculative decoding
    lookup: bool = False  # speculative decoding with prompt-lookup drafts (no draft model)
    num_speculative: int = 4  # tokens the draft (or lookup) proposes per decode step
    max_prefill_tokens: int | None = None  # prompt tokens per step while others decode (None: no cap)
    engine_process: bool = True  # the engine in a child process (no GIL shared with HTTP); False: a thread


def load_adapters(model, adapters: dict[str, str]) -> list[str]:
    """Load each LoRA adapter under its serving name; all start inactive (per-row selection)."""
    from lmforge import peft

    for name, folder in adapters.items():
        if not Path(folder).is_dir():
            raise LmforgeError(f"--adapter {name}={folder}: no such folder")
        peft.load_adapter(model, folder, adapter_name=name)
    others = sorted({c.method for c in peft.peft_configs(model)} - {"lora"})
    if others:
        raise LmforgeError(f"only LoRA/DoRA adapters can be served per request, got {others}")
    if adapters:
        peft.set_adapter(model, [])  # base output unless a request's row selects an adapter
        model.eval()
    return list(adapters)


def _require_tokenizer(cfg: ServeConfig, tokenizer):
    if tokenizer is None:
        raise LmforgeError(f"{cfg.model} has no tokenizer.json: the server needs the model's tokenizer")
    return tokenizer


def build_engine(cfg: ServeConfig, model=None, tokenizer=None):
    """(the Engine, the tokenizer, the vision-language model or None) for `cfg`: model and tokenizer
    loaded from cfg.model unless given, adapters and draft loaded, checked against each other."""
    from lmforge.checkpoint import load_model, load_tokenizer_if_any
    from lmforge.infer.engine import Engine

    from .vision import load_vlm_if_any, split_vision

    if model is None:
        model = load_vlm_if_any(cfg.model, get_device(cfg.device), cfg.dtype)
        if model is None:
            model = load_model(cfg.model, device=get_device(cfg.device), dtype=cfg.dtype)
        tokenizer = load_tokenizer_if_any(cfg.model)
    _require_tokenizer(cfg, tokenizer)
    model, vlm = split_vision(model)  # a vision-language model's LM serves text; images: serve/vision.py
    if vlm is not None and cfg.adapters:
        raise LmforgeError("adapters cannot be served with a vision-language model")
    load_adapters(model, cfg.adapters)
    draft = None
    if cfg.draft is not None:
        from lmforge.infer.batch import load_draft

        draft = load_draft(cfg.draft, model, tokenizer)
    engine = Engine(model, tokenizer, max_seqs=cfg.max_seqs, max_batch_tokens=cfg.max_batch_tokens,
                    block_size=cfg.block_size, num_blocks=cfg.num_blocks, max_model_len=cfg.max_model_len,
                    draft=draft, lookup=cfg.lookup, num_speculative=cfg.num_speculative,
                    max_prefill_tokens=cfg.max_prefill_tokens)
    return engine, tokenizer, vlm


def build_state(cfg: ServeConfig, model=None, tokenizer=None):
    """The ServerState for `cfg` (model and tokenizer loaded from cfg.model unless given). With
    cfg.engine_process the engine runs in a child process that loads the model itself (not for
    a model passed in, nor a vision-language model: its image path shares the engine's weights)."""
    from lmforge.checkpoint import load_tokenizer_if_any
    from lmforge.multimodal import is_multimodal

    from .app import ServerState
    from .runner import EngineRunner
    from .vision import VisionRunner

    name = cfg.served_model_name or Path(cfg.model).resolve().name
    if name in cfg.adapters:
        raise LmforgeError(f"adapter name {name!r} is also the base model's name; pick another")
    max_in_flight = cfg.max_seqs + cfg.max_queue
    common = dict(api_key=cfg.api_key, request_timeout=cfg.request_timeout, max_body_bytes=cfg.max_body_bytes,
                  body_timeout=cfg.body_timeout)
    if cfg.engine_process and model is None and Path(cfg.model).is_dir() and not is_multimodal(cfg.model):
        from .engine_process import EngineProcess

        tokenizer = _require_tokenizer(cfg, load_tokenizer_if_any(cfg.model))
        return ServerState(EngineProcess(cfg, max_in_flight), tokenizer, name, list(cfg.adapters), **common)
    engine, tokenizer, vlm = build_engine(cfg, model, tokenizer)
    runner = EngineRunner(engine, max_in_flight=max_in_flight)
    vision = None if vlm is None else VisionRunner(vlm, tokenizer, engine._lock, runner.max_in_flight,
                                                   engine.max_model_len, cfg.max_image_bytes, cfg.max_image_pixels)
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

    config = uvicorn.Config(create_app(state), host=cfg.host, port=cfg.port, log_level="warning",
                            timeout_graceful_shutdown=cfg.drain_timeout, access_log=False)
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
