"""Serving an audio-language model: OpenAI `input_audio` parts and /v1/audio/transcriptions through
the official openai client against a server on 127.0.0.1 that loaded a tiny random ALM folder;
bad audio (empty, corrupt, too long, wrong format) and unimplemented fields are 400s."""

import base64
import io

import httpx
import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
soundfile = pytest.importorskip("soundfile")

from test_serve_utils import ServerThread  # noqa: E402
from vlm_utils import tiny_alm  # noqa: E402

from lmforge.infer.decode import decode_ids  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.multimodal import load_multimodal, save_multimodal  # noqa: E402
from lmforge.multimodal.alm import render_audio as render  # noqa: E402
from lmforge.serve import ServeConfig  # noqa: E402
from lmforge.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from lmforge.tokenizer.bpe import DEFAULT_SPECIAL_TOKENS  # noqa: E402


def _wav(seconds: float = 0.5, rate: int = 22050, seed: int = 0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (200 + 100 * seed) * t).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def alm_dir(tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok = train_tokenizer(["3 1 4 1 5 9 2 6", "transcribe."] * 8, 300, DEFAULT_SPECIAL_TOKENS + ["<audio>"])
    model = tiny_alm(tok)
    out = tmp_path_factory.mktemp("alm") / "tiny-alm"
    save_multimodal(model, out, tok)
    return out


@pytest.fixture(scope="module")
def server(alm_dir):
    with ServerThread(ServeConfig(model=str(alm_dir), max_seqs=4)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _audio_message(data: bytes, fmt: str = "wav", text: str = "transcribe.") -> list[dict]:
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def _reference(alm_dir, wav: bytes, max_tokens: int) -> str:
    """Greedy transcript computed directly: the recipe's prompt layout + the ALM's own decode."""
    model, tok = load_multimodal(alm_dir, kind="alm"), load_tokenizer(alm_dir)
    data, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    from lmforge.multimodal.audio import resample

    wave = resample(torch.from_numpy(data), rate, 16000)
    ids, _ = render(tok, model.alm_config, "transcribe.")
    input_ids = torch.tensor([ids])
    stops = [tok.token_to_id("<|im_end|>"), tok.eos_id]
    out = decode_ids(
        model,
        SamplingParams(max_new_tokens=max_tokens, stop_token_ids=stops),
        input_ids,
        inputs_embeds=model.embed(input_ids, model.mel([wave])),
    )[0]
    return tok.decode([t for t in out if t not in stops])


def test_input_audio_chat_equals_direct_generation(client, alm_dir):
    wav = _wav()
    reply = client.chat.completions.create(model="tiny-alm", messages=_audio_message(wav), max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == _reference(alm_dir, wav, 6)
    stream = client.chat.completions.create(
        model="tiny-alm", messages=_audio_message(wav), max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content


def test_transcriptions_endpoint(client, server, alm_dir):
    wav = _wav(seed=1)
    got = client.audio.transcriptions.create(model="tiny-alm", file=("clip.wav", wav), temperature=0)
    expected = _reference(alm_dir, wav, 128).strip()
    assert got.text == expected
    text = client.audio.transcriptions.create(model="tiny-alm", file=("clip.wav", wav), response_format="text")
    assert isinstance(text, str)
    with pytest.raises(openai.BadRequestError, match="language"):
        client.audio.transcriptions.create(model="tiny-alm", file=("clip.wav", wav), language="en")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.audio.transcriptions.create(model="tiny-alm", file=("clip.wav", wav), response_format="srt")
    r = httpx.post(server.url + "/v1/audio/transcriptions", json={"model": "tiny-alm"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "data, fmt, message",
    [
        (b"", "wav", "input_audio"),
        (b"RIFF\x00\x00garbage" * 20, "wav", "not readable audio"),
        (None, "wav", "at most 1 s"),  # 2 s of audio; the model hears 1 s
        (None, "aiff", "format"),
    ],
)
def test_bad_audio_is_a_400_naming_the_part(client, data, fmt, message):
    data = _wav(seconds=2.0) if data is None else data
    with pytest.raises(openai.BadRequestError, match=message) as e:
        client.chat.completions.create(model="tiny-alm", messages=_audio_message(data, fmt), max_tokens=2)
    assert "messages" in str(e.value)


def test_images_to_an_audio_model_are_refused(client):
    url = "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(openai.BadRequestError, match="text and input_audio"):
        client.chat.completions.create(model="tiny-alm", messages=msgs, max_tokens=2)


def test_audio_to_a_text_model_is_refused(tmp_path):
    from lmforge.serve.protocol import APIError, ChatMessage
    from lmforge.serve.text import chat_prompt_ids

    tok = train_tokenizer(["hello world"] * 4, 300)
    msg = ChatMessage.model_validate(_audio_message(_wav())[0])
    with pytest.raises(APIError, match="does not accept audio"):
        chat_prompt_ids(tok, [msg])
