"""The serving configuration and the engine it builds: the model (plus LoRA adapters, a draft) loaded
into an `Engine`. Both the server and the engine's child process (engine_process.py) build from here,
so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.common import LmforgeError, get_device

from .routing import RouteConfig


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
    route: RouteConfig | None = None  # --fallback: escalate low-confidence answers to another endpoint (routing.py)
    embedding_model: str | None = None  # a model folder for /v1/embeddings (None: the served model's hidden states)
    enable_lora_runtime: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter allowed
    rag: str | None = None  # an `lmforge rag index` folder: answers as model "<name>-rag" (serve/rag.py)
    rag_top_k: int = 3  # passages retrieved per RAG request


def embedding_name(cfg: ServeConfig) -> str | None:
    """The name /v1/embeddings answers to for --embedding-model (its folder's name), or None."""
    return Path(cfg.embedding_model).resolve().name if cfg.embedding_model else None


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
    if vlm is not None and (cfg.adapters or cfg.enable_lora_runtime):
        raise LmforgeError("adapters cannot be served with a vision-language model (--adapter, --enable-lora-runtime)")
    load_adapters(model, cfg.adapters)
    draft = None
    if cfg.draft is not None:
        from lmforge.infer.batch import load_draft

        draft = load_draft(cfg.draft, model, tokenizer)
    if getattr(model, "tp_mesh", None) is not None:  # sharded by `serve --tp` (serve/tp.py): rank 0 schedules
        from lmforge.infer.engine_tp import TPEngine as Engine
    engine = Engine(
        model,
        tokenizer,
        max_seqs=cfg.max_seqs,
        max_batch_tokens=cfg.max_batch_tokens,
        block_size=cfg.block_size,
        num_blocks=cfg.num_blocks,
        max_model_len=cfg.max_model_len,
        draft=draft,
        lookup=cfg.lookup,
        num_speculative=cfg.num_speculative,
        max_prefill_tokens=cfg.max_prefill_tokens,
    )
    return engine, tokenizer, vlm
