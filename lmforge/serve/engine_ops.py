"""What the engine's owner runs between two steps besides generation: pooled embeddings, and LoRA
adapters loaded and unloaded at run time.

Both owners of the engine (the thread of runner.py and the child process of engine_process.py)
hold one `EngineOps` beside their `Engine` and apply a call between two steps, never during one:
a load wraps linears of the live model, which must not change under a forward, and an embedding
forward uses the same weights as the KV-cached decode. Requests in flight simply wait one short
call; they are not paused or restarted.

Embeddings run here rather than on a copy of the model in the server process: one copy of the
weights, and the HTTP process never runs torch (the reason the engine has a process of its own).
A batch of inputs is cut into forwards of at most one step's token budget (--max-batch-tokens, as
chunked prefill), and the engine steps between two of them, so streams in flight wait one chunk,
not the whole batch.

An adapter loaded at run time enters the model under a fresh internal name (`NAME@k`): prefix-cache
blocks are keyed by that name, so blocks computed with an earlier adapter of the same served name
(unloaded, then a different folder loaded as NAME) can never be hit by the new one.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError, get_device, get_logger

log = get_logger(__name__)


class AdapterBusy(LmforgeError):
    """An adapter cannot be unloaded while requests use it (the server answers 409)."""


class CallFailed(Exception):
    """A call raised something that is not the client's mistake (the server answers 500)."""


@dataclass
class Embedder:
    """The model whose pooled hidden states /v1/embeddings returns, with its tokenizer and length limit."""

    model: object
    tokenizer: object
    max_len: int


class EngineOps:
    def __init__(self, engine, embedder: Embedder | None = None):
        from lmforge import peft

        self.engine = engine
        # served name -> the adapter's name inside the model (the same for adapters loaded at start-up)
        self.names = {c.adapter_name: c.adapter_name for c in peft.peft_configs(engine.model) if c.method == "lora"}
        self._loads = itertools.count(1)
        self.embedder = embedder or Embedder(engine.model, engine.tokenizer, engine.max_model_len)

    @classmethod
    def build(cls, engine, embedding_model: str | None, device: str = "auto", dtype: str = "float32") -> EngineOps:
        """EngineOps for `engine`, embedding with the model folder `embedding_model` when given."""
        if embedding_model is None:
            return cls(engine)
        from lmforge.checkpoint import load_model, load_tokenizer_if_any

        model = load_model(embedding_model, device=get_device(device), dtype=dtype).eval()
        limit = model.config.max_position_embeddings
        return cls(engine, Embedder(model, load_tokenizer_if_any(embedding_model), limit))

    def adapter(self, name: str | None) -> str | None:
        """The name inside the model of the adapter a request asks for by its served name."""
        return None if name is None else self.names.get(name, name)

    def run(self, op: str, args: tuple) -> Generator[None, None, object]:
        """Call `op` in pieces: the owner steps the engine at each yield; the return value is the result."""
        if op == "embed":
            return (yield from self.embed(*args))
        fn = {"load_lora": self.load_lora, "unload_lora": self.unload_lora}.get(op)
        if fn is None:
            raise CallFailed(f"unknown engine call {op!r}")
        return fn(*args)

    # ------------------------------------------------------------------ embeddings

    def embed(self, inputs: list) -> Generator[None, None, tuple[bytes, int, list[int]]]:
        """Each input (a text or a list of token ids) -> the mean over its tokens of the model's final
        normed hidden state, L2-normalised: (the [N, dim] little-endian float32 array's bytes, dim,
        tokens per input). Plain bytes cross the pipe (a pickled tensor would go through shared memory).
        A generator: it yields between forwards of at most one engine step's token budget."""
        e, budget = self.embedder, self.engine.scheduler.max_batch_tokens
        ids = [self._ids(i, x) for i, x in enumerate(inputs)]
        out = torch.empty(len(ids), e.model.config.hidden_size)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end + 1 - start) * len(ids[order[end]]) <= budget:
                end += 1
            chunk = order[start:end]
            out[chunk] = self._pool([ids[i] for i in chunk])
            start = end
            if start < len(order):
                yield
        return out.numpy().astype("<f4").tobytes(), out.shape[1], [len(t) for t in ids]

    def _ids(self, i: int, x) -> list[int]:
        e, where = self.embedder, f"input.{i}"
        if isinstance(x, str):
            if e.tokenizer is None:
                raise LmforgeError(f"{where}: the embedding model has no tokenizer; send token ids")
            x = e.tokenizer.encode(x)
        if not x:
            raise LmforgeError(f"{where}: the input is empty")
        vocab = e.model.config.vocab_size
        bad = [t for t in x if not 0 <= t < vocab]
        if bad:
            raise LmforgeError(f"{where}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if len(x) > e.max_len:
            raise LmforgeError(f"{where}: {len(x)} tokens; the embedding model takes at most {e.max_len}")
        return list(x)

    @torch.inference_mode()
    def _pool(self, batch: list[list[int]]) -> torch.Tensor:
        model = self.embedder.model
        device = next(model.parameters()).device
        width = max(map(len, batch))
        # Right padding: in a causal model a real token never attends to the padding after it.
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        for r, t in enumerate(batch):
            ids[r, : len(t)] = torch.tensor(t, device=device)
            mask[r, : len(t)] = 1
        with self.engine._lock:  # a vision-language model's image path forwards the same weights on its own thread
            _, hidden = model(ids, attention_mask=mask, logits_to_keep=1, return_hidden=True)
        m = mask.unsqueeze(-1).to(torch.float32)
        mean = (hidden.float() * m).sum(1) / m.sum(1)
        return F.normalize(mean, dim=-1).cpu()

    # ------------------------------------------------------------------ LoRA adapters at run time

    def load_lora(self, name: str, path: str) -> None:
        """Load the LoRA/DoRA adapter in folder `path` as `name`; LmforgeError (the model unchanged)
        when the folder is not an adapter, not LoRA, or does not fit the model."""
        from lmforge import peft
        from lmforge.peft.io import NATIVE_JSON

        if name in self.names:
            raise LmforgeError(f"an adapter named {name!r} is already loaded")
        folder = Path(path)
        if not folder.is_dir():
            raise LmforgeError(f"lora_path {path!r}: no such folder")
        if (folder / NATIVE_JSON).is_file():  # refuse other methods before the model is touched
            try:
                methods = {d.get("method") for d in json.loads((folder / NATIVE_JSON).read_text())["adapters"]}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise LmforgeError(f"{folder / NATIVE_JSON}: not a readable adapter config ({e})") from None
            if methods != {"lora"}:
                raise LmforgeError(
                    f"{folder}: only LoRA/DoRA adapters can be served per request, got {sorted(methods)}"
                )
        model, internal = self.engine.model, f"{name}@{next(self._loads)}"
        try:
            peft.load_adapter(model, folder, adapter_name=internal)
        except Exception:
            if any(c.adapter_name == internal for c in peft.peft_configs(model)):
                peft.delete_adapter(model, internal)  # a half-loaded adapter (a tensor that did not fit)
            raise
        finally:
            peft.set_adapter(model, [])  # base output unless a request's row selects an adapter
            model.eval()
        self.names[name] = internal
        log.info("loaded LoRA adapter %s from %s", name, folder)

    def unload_lora(self, name: str) -> None:
        """Remove adapter `name`; AdapterBusy while a request that uses it is unfinished."""
        from lmforge import peft
        from lmforge.infer.scheduler import Status

        internal = self.names.get(name)
        if internal is None:
            raise LmforgeError(f"no adapter named {name!r} is loaded")
        busy = sum(s.adapter == internal and s.status is not Status.FINISHED for s in self.engine.requests.values())
        if busy:
            raise AdapterBusy(f"adapter {name!r} is in use by {busy} unfinished request(s); retry when they are done")
        peft.delete_adapter(self.engine.model, internal)
        del self.names[name]
        log.info("unloaded LoRA adapter %s", name)


class PendingCalls:
    """The calls an engine owner has been asked for, oldest first. `advance()` runs one piece of the
    oldest (the owner steps the engine between two pieces) and returns the finished ones' outcomes."""

    def __init__(self, ops: EngineOps):
        self.ops, self.todo = ops, deque()

    def add(self, key, op: str, args: tuple) -> None:
        self.todo.append((key, _outcome(self.ops, op, args)))

    def advance(self) -> list[tuple[object, tuple[bool, object]]]:
        if not self.todo:
            return []
        key, steps = self.todo[0]
        try:
            next(steps)
            return []
        except StopIteration as done:
            self.todo.popleft()
            return [(key, done.value)]


def _outcome(ops: EngineOps, op: str, args: tuple) -> Generator[None, None, tuple[bool, object]]:
    """(True, result) or (False, (kind, message)): what crosses the pipe back to the server."""
    try:
        return True, (yield from ops.run(op, args))
    except AdapterBusy as e:
        return False, ("busy", str(e))
    except LmforgeError as e:
        return False, ("invalid", str(e))
    except Exception as e:  # a bug: reported as a server error, the engine keeps serving
        log.exception("engine call %s failed", op)
        return False, ("failed", f"{type(e).__name__}: {e}")


def call_result(ok: bool, payload):
    """The result `run_call` reported, or its error raised again on the server's side."""
    if ok:
        return payload
    kind, message = payload
    raise {"busy": AdapterBusy, "invalid": LmforgeError}.get(kind, CallFailed)(message)
