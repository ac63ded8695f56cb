"""`lmforge serve --tp N` under torchrun: one model sharded over N processes answers the OpenAI API.

    torchrun --nproc_per_node 2 -m lmforge serve --tp 2 --model runs/x/final --port 8000

Every rank loads the model and keeps its shard (lmforge.parallel). Rank 0 is the server: HTTP,
the continuous-batching engine's scheduler and sampling (infer/engine_tp.py's TPEngine, on the
engine thread of the server process). The other ranks run `follow`: each forward rank 0 sends,
on their shard. Stopping: SIGTERM or Ctrl-C reaches every rank (torchrun passes it on); rank 0
drains in-flight requests as a single-process server does, then releases the followers, which
ignore the signal and wait for that, so every rank exits 0. Should rank 0 die, torchrun ends
the others.

Not with --tp (refused, not ignored): LoRA adapters (a sharded Linear has no LoRA path yet),
a vision-language model, and `--engine process` (the engine must live in the rank-0 process,
which holds the shard and the process group).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from pathlib import Path

from lmforge.common import LmforgeError, get_device, get_logger

from .build import ServeConfig

log = get_logger(__name__)


def check_tp_serve(cfg: ServeConfig, tp: int, engine_flag: str | None) -> None:
    """Refuse what serving on a tensor-parallel model does not support, naming the flag."""
    from lmforge.multimodal import is_multimodal

    given = {
        "--adapter": bool(cfg.adapters),
        "--enable-lora-runtime": cfg.enable_lora_runtime,
        "--engine process": engine_flag == "process",
    }
    for flag, value in given.items():
        if value:
            raise LmforgeError(f"{flag} cannot be combined with --tp {tp}")
    if Path(cfg.model).is_dir() and is_multimodal(cfg.model):
        raise LmforgeError(f"--tp {tp}: {cfg.model} is a multimodal model; only text models are served sharded")


def serve_tp(cfg: ServeConfig, tp: int, engine_flag: str | None = None) -> None:
    """Serve `cfg` with the model sharded over torchrun's `tp` ranks (rank 0 answers HTTP)."""
    import torch.distributed as dist

    from lmforge.checkpoint import load_model, load_tokenizer_if_any
    from lmforge.common import dist_info
    from lmforge.infer.engine_tp import control_group, follow
    from lmforge.parallel import apply_tensor_parallel, init_process_group

    from .server import build_state, check_address, make_server

    check_tp_serve(cfg, tp, engine_flag)
    info = dist_info()
    if info.world_size != tp:
        raise LmforgeError(
            f"--tp {tp} needs exactly {tp} processes (torchrun --nproc_per_node {tp} -m lmforge serve ...); "
            f"this run has WORLD_SIZE={info.world_size}"
        )
    if info.rank == 0:
        check_address(cfg.host, cfg.port)  # before the model loads
    device = get_device(cfg.device)
    init_process_group(device)
    try:
        model = load_model(cfg.model, device=device, dtype=cfg.dtype)
        model = apply_tensor_parallel(model.requires_grad_(False), tp, device)
        group = control_group()
        if info.rank != 0:
            # torchrun passes SIGTERM/SIGINT to every rank; a follower waits for rank 0 to drain.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            follow(model, group)
            return
        state = build_state(dataclasses.replace(cfg, engine_process=False), model, load_tokenizer_if_any(cfg.model))
        try:
            sys.setswitchinterval(0.0005)  # as serve(): the engine thread shares the GIL with the event loop
            log.info("serving %s on http://%s:%d (tensor-parallel over %d ranks)", cfg.model, cfg.host, cfg.port, tp)
            make_server(cfg, state).run()
        finally:
            state.runner.stop()
            state.runner.engine.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
