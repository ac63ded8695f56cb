"""Speech in requests, for an audio-language model (lmforge/multimodal/alm.py): OpenAI's
`input_audio` content parts in /v1/chat/completions, and /v1/audio/transcriptions.

    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}},
                                 {"type": "text", "text": "transcribe."}]}

Requests with audio run on the media path of serve/vision.py (spliced embeddings, one sequence at a
time), exactly as images do for a VLM. Audio is bounded before it is decoded (max_audio_bytes of
base64) and after (a clip longer than the model hears, `clip_seconds`, is refused rather than cut
silently); empty, corrupt or non-finite audio is a 400 naming the content part.

/v1/audio/transcriptions takes OpenAI's multipart form (file, model, response_format json|text,
temperature) and answers {"text": ...}: the clip goes through the chat path with the prompt the
model was trained to transcribe with. Form fields this server does not implement (language, prompt,
timestamp_granularities, other response formats) are a 400 naming the field, never ignored.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from email.parser import BytesParser
from email.policy import HTTP

import numpy as np
import torch

from lmforge.common import LmforgeError
from lmforge.multimodal.alm import AUDIO_TOKEN, AudioLanguageModel
from lmforge.multimodal.audio import SAMPLE_RATE, decode_samples
from lmforge.multimodal.vlm import expand_image_tokens

from .protocol import APIError

FORMATS = ("wav", "mp3", "flac", "ogg")
TRANSCRIPTION_FIELDS = {"file", "model", "response_format", "temperature"}


def decode_audio(data, fmt, where: str, max_bytes: int, max_seconds: float) -> torch.Tensor:
    """Base64 audio -> mono float32 at 16 kHz, or APIError(400) naming the part."""

    def bad(message: str) -> APIError:
        return APIError(400, f"bad audio in the request: {where}: {message}", param=where)

    if not isinstance(data, str) or not data:
        raise bad("input_audio needs {'data': '<base64>', 'format': 'wav'}")
    if fmt not in FORMATS:
        raise bad(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if len(data) > 4 * (max_bytes // 3 + 1):
        raise bad(f"the audio is larger than the server's limit of {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad("invalid base64 data") from None
    return read_audio_bytes(raw, where, max_seconds, bad)


def read_audio_bytes(raw: bytes, where: str, max_seconds: float, bad=None) -> torch.Tensor:
    bad = bad or (lambda message: APIError(400, f"bad audio in the request: {where}: {message}", param=where))
    try:
        import soundfile
    except ImportError:
        raise APIError(501, "this server cannot read audio: pip install 'lmforge[audio]' (soundfile)") from None
    try:
        data, rate = soundfile.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises its own error types for corrupt data
        raise bad(f"not readable audio ({type(e).__name__}: {e})") from None
    if data.shape[0] / max(rate, 1) > max_seconds:
        raise bad(f"the audio lasts {data.shape[0] / rate:.2f} s; this model hears at most {max_seconds:g} s")
    try:
        return decode_samples(np.asarray(data), rate, SAMPLE_RATE, where)
    except LmforgeError as e:
        raise bad(str(e)) from None


def prepare_audio(model: AudioLanguageModel, tokenizer, messages, max_bytes: int) -> tuple[list[int], torch.Tensor]:
    """Chat messages with input_audio parts -> (prompt ids, each <audio> expanded to its slots;
    log-mel [num_clips, n_mels, frames] in the prompt's order)."""
    c = model.alm_config
    plain, waves = [], []
    for i, m in enumerate(messages):
        if not isinstance(m.content, list):
            plain.append({"role": m.role, "content": m.content})
            continue
        text = ""
        for j, part in enumerate(m.content):
            where = f"messages.{i}.content.{j}"
            if part.type == "input_audio":
                audio = part.input_audio
                waves.append(decode_audio(audio.data, audio.format, where, max_bytes, c.clip_seconds))
                text += AUDIO_TOKEN + "\n"  # the layout the model was trained on: <audio>, newline, words
            elif part.type == "text":
                text += part.text
            else:
                raise APIError(400, f"{where}: an audio-language model takes text and input_audio parts", param=where)
        plain.append({"role": m.role, "content": text.rstrip("\n") if text.endswith(AUDIO_TOKEN + "\n") else text})
    try:
        ids, mask = tokenizer.render_chat(plain, add_generation_prompt=True)
    except LmforgeError as e:
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
    ids, _ = expand_image_tokens(ids, mask, c.audio_token_id, c.num_audio_tokens)
    return ids, model.mel(waves)


def has_audio(messages) -> bool:
    return any(isinstance(m.content, list) and any(p.type == "input_audio" for p in m.content) for m in messages)


def parse_form(body: bytes, content_type: str) -> dict[str, tuple[bytes, str | None]]:
    """A multipart/form-data body -> {field: (bytes, filename or None)} (the stdlib's MIME parser)."""
    if not content_type.startswith("multipart/form-data"):
        raise APIError(400, "send the audio as multipart/form-data (a 'file' field), as OpenAI's client does")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise APIError(400, "the multipart/form-data body could not be parsed (missing or wrong boundary)")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        fields[name] = (part.get_payload(decode=True) or b"", part.get_filename())
    return fields


def transcription_body(fields: dict[str, tuple[bytes, str | None]], prompt: str) -> tuple[bytes, str]:
    """The form -> (a chat completion request body with the clip as an input_audio part, the
    response format). Unknown or unimplemented fields are 400s naming them."""
    for name in fields:
        if name not in TRANSCRIPTION_FIELDS:
            raise APIError(400, f"{name}: not supported by this server's transcriptions", param=name)
    if "file" not in fields or not fields["file"][0]:
        raise APIError(400, "file: the audio file is required", param="file")
    if "model" not in fields:
        raise APIError(400, "model: required", param="model")
    text = {k: v.decode("utf-8", "replace") for k, (v, _) in fields.items() if k != "file"}
    response_format = text.get("response_format", "json")
    if response_format not in ("json", "text"):
        raise APIError(400, f"response_format: json or text, got {response_format!r}", param="response_format")
    fmt = (fields["file"][1] or "audio.wav").rsplit(".", 1)[-1].lower()
    request = {
        "model": text["model"],
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_audio",
                        "input_audio": {"data": base64.b64encode(fields["file"][0]).decode(), "format": fmt},
                    },
                    {"type": "text", "text": prompt},
                ],
            }
        ],
    }
    if "temperature" in text:
        try:
            request["temperature"] = float(text["temperature"])
        except ValueError:
            raise APIError(400, f"temperature: a number, got {text['temperature']!r}", param="temperature") from None
    return json.dumps(request).encode(), response_format
