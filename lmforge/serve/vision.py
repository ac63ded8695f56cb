"""Images in chat requests, for a vision-language model (lmforge/multimodal's LLaVA-style VLM),
and the same path for audio in requests to an audio-language model (serve/audio.py prepares those).

    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                 {"type": "text", "text": "what colour is the circle?"}]}

Text-only requests to a VLM server go through the continuous-batching engine, which runs the
VLM's language model. A request with images needs its image features spliced into the prompt
embeddings, which the engine (token ids in, paged KV cache) does not take, so it runs here
instead: one sequence at a time on a worker thread, through the single-sequence decode driver
(lmforge.infer.decode: a prefill of the spliced embeddings, then token by token), each forward
under the engine's lock (the two threads share the language model's weights). Its events are the
engine's `Event`s on the same asyncio queues as `EngineRunner`'s, so streaming, stop strings,
timeouts, cancelling and usage work exactly as for text.

An image comes only as a base64 `data:image/...` URL. Anything else (a path, file://) is refused,
so a request can neither feed the server's files to the model nor probe their existence; http(s)
URLs are refused too (the server never goes to the network). Its size is bounded twice before
decoding: the encoded bytes (max_image_bytes) and the width x height PIL reads from the header
(max_image_pixels), so an 8000x8000 PNG of a few kilobytes is refused before it takes 200 MB.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from lmforge.common import LmforgeError, get_dtype, get_logger
from lmforge.infer.decode import decode
from lmforge.infer.engine import Event
from lmforge.infer.logprobs import logprob_entry
from lmforge.multimodal import (
    VisionLanguageModel,
    is_multimodal,
    load_image,
    load_multimodal,
    pixels_for,
    render_ids,
    split_images,
)
from lmforge.multimodal.alm import AudioLanguageModel

from .audio import has_audio, prepare_audio
from .protocol import APIError, ChatMessage
from .runner import EngineFailed, Handle, Submission, _post, check_room

log = get_logger(__name__)


MediaModel = VisionLanguageModel | AudioLanguageModel


def split_vision(model) -> tuple[torch.nn.Module, MediaModel | None]:
    """(the text model the engine runs, the VLM/ALM or None): a multimodal model serves text through its LM."""
    if isinstance(model, (VisionLanguageModel, AudioLanguageModel)):
        return model.language_model, model
    return model, None


def load_vlm_if_any(path: str, device, dtype: str) -> MediaModel | None:
    """The VLM or ALM in `path` (an `lmforge vlm|audio train` folder), or None for any other model folder."""
    if not is_multimodal(path):
        return None
    model = load_multimodal(path, device)
    if not isinstance(model, (VisionLanguageModel, AudioLanguageModel)):
        raise LmforgeError(f"{path} holds a CLIP model, which does not generate text; serve a VLM or an LM")
    return model.to(get_dtype(dtype))


def has_images(messages: list[ChatMessage]) -> bool:
    """Image or audio parts: the request needs the media path."""
    media = ("image_url", "input_audio")
    return any(isinstance(m.content, list) and any(p.type in media for p in m.content) for m in messages)


@dataclass
class VisionSubmission(Submission):
    # [num_images, 3, H, W] pixels (VLM) or [num_clips, n_mels, frames] log-mel (ALM), in the prompt's order
    pixel_values: torch.Tensor | None = None


class VisionRunner:
    """The image path of a VLM server: `prepare` turns messages into (ids, pixels); `submit`,
    `cancel` and `max_in_flight` behave as `EngineRunner`'s."""

    def __init__(
        self,
        model: VisionLanguageModel,
        tokenizer,
        lock: threading.RLock,
        max_in_flight: int,
        max_model_len: int,
        max_image_bytes: int = 8 << 20,
        max_image_pixels: int = 4096 * 4096,
    ):
        self.model, self.tokenizer, self.lock = model.eval(), tokenizer, lock
        self.max_in_flight, self.max_model_len = max_in_flight, max_model_len
        self.max_image_bytes, self.max_image_pixels = max_image_bytes, max_image_pixels
        self._queue: queue.Queue[Handle | None] = queue.Queue()
        self._live: set[Handle] = set()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the event loop's side

    def prepare(self, messages: list[ChatMessage]) -> tuple[list[int], torch.Tensor]:
        """Chat messages with image parts -> (prompt ids, each image's placeholder expanded to its
        feature slots; pixel values). A bad image is a 400 naming the message part. For an
        audio-language model: (ids, log-mel of the input_audio parts), serve/audio.py."""
        if isinstance(self.model, AudioLanguageModel):
            return prepare_audio(self.model, self.tokenizer, messages, self.max_image_bytes)
        if has_audio(messages):
            raise APIError(400, "this model does not accept audio", param="messages")
        plain = [
            {
                "role": m.role,
                "content": m.content
                if not isinstance(m.content, list)
                else [self._part(p, f"messages.{i}.content.{j}") for j, p in enumerate(m.content)],
            }
            for i, m in enumerate(messages)
        ]
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

    def _part(self, part, where: str) -> dict:
        """A content part as split_images takes it; an image_url part decoded here, within bounds
        (a template {"type": "image"} part with the pixels, so nothing downstream reads a path)."""
        if part.type != "image_url":
            return part.model_dump()
        url = part.image_url.get("url") if isinstance(part.image_url, dict) else part.image_url
        return {"type": "image", "image": decode_image_url(url, where, self.max_image_bytes, self.max_image_pixels)}

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

    def _run(self, h: Handle) -> None:
        s: VisionSubmission = h.submission
        budget = min(s.params.max_new_tokens, self.max_model_len - len(s.prompt_ids))
        if budget <= 0:
            _post(h.loop, [(h.queue, (h.index, Event(0, [], True, "length")))])
            return
        # The engine's options: the prompt counts for the repetition penalty, EOS stops.
        params = replace(s.params, max_new_tokens=budget)
        eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        stops = set(params.stop_token_ids) | set(eos)
        with self.lock, torch.inference_mode():
            ids = torch.tensor([s.prompt_ids], device=next(self.model.parameters()).device)
            tokens = decode(
                self.model,
                params,
                ids,
                inputs_embeds=self.model.embed(ids, s.pixel_values),
                eos_token_ids=eos,
                return_logits=True,
            )
        for step in range(budget):
            if h.cancelled:
                return
            with self.lock:
                token, logits = next(tokens)
            t = int(token[0])
            reason = "stop" if t in stops else ("length" if step == budget - 1 else None)
            _post(h.loop, [(h.queue, (h.index, Event(0, [t], reason is not None, reason, _logprobs(t, logits, s))))])
            if reason is not None:
                return


def decode_image_url(url, where: str, max_bytes: int, max_pixels: int):
    """A base64 `data:image/...` URL -> uint8 [H, W, 3], or APIError(400) naming the part: not a
    data URL, bad base64, more than max_bytes, more than max_pixels, not an image."""

    def bad(message: str) -> APIError:
        return APIError(400, f"bad image in the messages: {where}: {message}", param=where)

    if not isinstance(url, str):
        raise bad("image_url needs {'url': 'data:image/<type>;base64,...'}")
    if url.startswith(("http://", "https://")):
        raise bad(
            "remote image URLs are not fetched by this server (it makes no network requests); "
            "send the image as a base64 data URL"
        )
    if not url.startswith("data:"):
        raise bad(
            f"image_url must be a base64 data URL (data:image/<type>;base64,...), got {url[:40]!r}; "
            "this server does not open paths or other URLs"
        )
    head, _, payload = url.partition(",")
    if ";base64" not in head or not head.startswith("data:image/"):
        raise bad(f"image data URL must be 'data:image/<type>;base64,...', got {head[:40]!r}")
    if len(payload) > 4 * (max_bytes // 3 + 1):  # checked before decoding: base64 is 4 chars per 3 bytes
        raise bad(f"the image is larger than the server's limit of {max_bytes} bytes")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad("image data URL has invalid base64 data") from None
    from PIL import Image

    try:  # the header only: width and height before a single pixel is decoded
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
    except Exception as e:  # PIL raises many types for corrupt data
        raise bad(f"not a readable image ({type(e).__name__}: {e})") from None
    if width * height > max_pixels:
        raise bad(f"the image is {width}x{height} = {width * height} pixels; the server's limit is {max_pixels}")
    try:
        return load_image(raw)
    except LmforgeError as e:
        raise bad(str(e)) from None


def _logprobs(token: int, logits: torch.Tensor, s: Submission) -> list | None:
    """The engine's entry shape: [(token, logprob, [(top token, logprob), ...])]."""
    return None if s.logprobs is None else [logprob_entry(logits[0].float(), token, s.logprobs)]
