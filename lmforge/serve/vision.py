"""Images in chat requests, for a vision-language model (lmforge/multimodal's LLaVA-style VLM).

    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                 {"type": "text", "text": "what colour is the circle?"}]}

Text-only requests to a VLM server go through the continuous-batching engine, which runs the
VLM's language model. A request with images needs its image features spliced into the prompt
embeddings, which the engine (token ids in, paged KV cache) does not take, so it runs here
instead: one sequence at a time on a worker thread, a plain KV-cache prefill of the spliced
embeddings and then token-by-token decoding, each forward under the engine's lock (the two
threads share the language model's weights). Its events are the engine's `Event`s on the same
asyncio queues as `EngineRunner`'s, so streaming, stop strings, timeouts, cancelling and usage
work exactly as for text.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from lmforge.common import LmforgeError, get_dtype, get_logger
from lmforge.infer.engine import Event, logprob_entry
from lmforge.infer.sampling import sample
from lmforge.multimodal import (VisionLanguageModel, is_multimodal, load_multimodal, pixels_for, render_ids,
                                split_images, stream)

from .protocol import APIError, ChatMessage
from .runner import EngineFailed, Handle, Submission, _post, check_room

log = get_logger(__name__)


def split_vision(model) -> tuple[torch.nn.Module, VisionLanguageModel | None]:
    """(the text model the engine runs, the VLM or None): a VLM serves text through its LM."""
    if isinstance(model, VisionLanguageModel):
        return model.language_model, model
    return model, None


def load_vlm_if_any(path: str, device, dtype: str) -> VisionLanguageModel | None:
    """The VLM in `path` (an `lmforge vlm train` folder), or None for any other model folder."""
    if not is_multimodal(path):
        return None
    return load_multimodal(path, device, kind="vlm").to(get_dtype(dtype))


def has_images(messages: list[ChatMessage]) -> bool:
    return any(isinstance(m.content, list) and any(p.type == "image_url" for p in m.content) for m in messages)


@dataclass
class VisionSubmission(Submission):
    pixel_values: torch.Tensor | None = None  # [num_images, 3, H, W], in the prompt's order


class VisionRunner:
    """The image path of a VLM server: `prepare` turns messages into (ids, pixels); `submit`,
    `cancel` and `max_in_flight` behave as `EngineRunner`'s."""

    def __init__(self, model: VisionLanguageModel, tokenizer, lock: threading.RLock, max_in_flight: int,
                 max_model_len: int):
        self.model, self.tokenizer, self.lock = model.eval(), tokenizer, lock
        self.max_in_flight, self.max_model_len = max_in_flight, max_model_len
        self._queue: queue.Queue[Handle | None] = queue.Queue()
        self._live: set[Handle] = set()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the event loop's side

    def prepare(self, messages: list[ChatMessage]) -> tuple[list[int], torch.Tensor]:
        """Chat messages with image parts -> (prompt ids, each image's placeholder expanded to its
        feature slots; pixel values). A bad image is a 400 naming the message part."""
        plain = [{"role": m.role, "content": m.content if not isinstance(m.content, list)
                  else [p.model_dump() for p in m.content]} for m in messages]
        try:
            plain, images = split_images(plain)
        except LmforgeError as e:
            raise APIError(400, f"bad image in the messages: {e}", param="messages") from None
        c = self.model.vlm_config
        try:
            ids, _ = render_ids(self.tokenizer, plain, c.image_token_id, c.num_image_tokens, add_generation_prompt=True)
        except LmforgeError as e:
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        return ids, pixels_for(self.model, images)

    def submit(self, items: Sequence[VisionSubmission]) -> tuple[list[Handle], asyncio.Queue]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        handles = [Handle(it, i, loop, events) for i, it in enumerate(items)]
        with self._guard:
            check_room(len(self._live), len(handles), self.max_in_flight, "image requests")
            self._live.update(handles)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="lmforge-vision", daemon=True)
                self._thread.start()
        for h in handles:
            self._queue.put(h)
        return handles, events

    def cancel(self, handle: Handle) -> None:
        with self._guard:
            self._live.discard(handle)
            handle.cancelled = True

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        return len(self._live)

    # ------------------------------------------------------------------ the worker thread

    def _loop(self) -> None:
        while (h := self._queue.get()) is not None:
            if h.cancelled:
                continue
            try:
                self._run(h)
            except Exception as e:  # a bug, not the client's: report it on this request, keep serving
                log.exception("vision request failed")
                _post(h.loop, [(h.queue, EngineFailed(str(e)))])
            with self._guard:
                self._live.discard(h)

    @torch.inference_mode()
    def _run(self, h: Handle) -> None:
        s: VisionSubmission = h.submission
        p = s.params
        device = next(self.model.parameters()).device
        ids = torch.tensor([s.prompt_ids], device=device)
        generator = torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None
        seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=device)
        seen[0, ids[0]] = True  # the repetition penalty counts the prompt too, as the engine does
        stops = set(p.stop_token_ids) | ({self.tokenizer.eos_id} - {None})
        budget = min(p.max_new_tokens, self.max_model_len - len(s.prompt_ids))
        if budget <= 0:
            _post(h.loop, [(h.queue, (h.index, Event(0, [], True, "length")))])
            return
        with self.lock:
            embeds = self.model.embed(ids, s.pixel_values)
        tokens = stream(self.model, embeds, budget, lambda logits: sample(logits, p, generator, seen))
        for step in range(budget):
            if h.cancelled:
                return
            with self.lock:
                token, logits = next(tokens)
            t = int(token[0])
            seen[0, t] = True
            reason = "stop" if t in stops else ("length" if step == budget - 1 else None)
            _post(h.loop, [(h.queue, (h.index, Event(0, [t], reason is not None, reason, _logprobs(t, logits, s))))])
            if reason is not None:
                return


def _logprobs(token: int, logits: torch.Tensor, s: Submission) -> list | None:
    """The engine's entry shape: [(token, logprob, [(top token, logprob), ...])]."""
    return None if s.logprobs is None else [logprob_entry(logits[0].float(), token, s.logprobs)]
