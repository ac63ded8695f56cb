"""Helpers for the serve tests: a tiny real checkpoint (model + trained tokenizer + a LoRA
adapter) and a server running in a thread on a free port of 127.0.0.1. No tests here."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import torch

from lmforge import peft
from lmforge.checkpoint import save_model
from lmforge.model import build_model
from lmforge.serve import ServeConfig, build_state, make_server
from lmforge.tokenizer import train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Language models predict the next token from the ones before it.",
    "A server streams tokens to many clients at once.",
    "Hello there, how are you today? I am fine, thank you.",
    "Paged attention keeps keys and values in fixed-size blocks.",
] * 20


def make_checkpoint(root: Path) -> tuple[Path, Path]:
    """(model folder, LoRA adapter folder). Special tokens' embeddings are zero, so (tied) their
    logits are 0 and greedy decoding never picks them: every generation runs to max_tokens."""
    tok = train_tokenizer(CORPUS, vocab_size=400)
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=tok.vocab_size, initializer_range=0.2).eval()
    specials = [t.content for t in tok.backend.get_added_tokens_decoder().values() if t.special]
    with torch.no_grad():
        for s in specials:
            model.model.embed_tokens.weight[tok.token_to_id(s)] = 0
    model_dir = save_model(model, root / "tiny-chat", tokenizer=tok)
    tuned = copy.deepcopy(model)
    peft.apply(tuned, peft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():  # a non-zero B so the adapter changes the output
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter_dir = peft.save_adapter(tuned, root / "lora")
    return Path(model_dir), Path(adapter_dir)


class ServerThread:
    """`with ServerThread(cfg) as s:` -> s.url, s.state (the ServerState, engine included)."""

    def __init__(self, cfg: ServeConfig):
        cfg.port = 0
        self.state = build_state(cfg)
        self.server = make_server(cfg, self.state)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
