"""Serving a vision-language model: OpenAI `image_url` parts (base64 data URLs) through the official
openai client against a server on 127.0.0.1 that loaded a tiny random VLM folder from disk."""

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
PIL = pytest.importorskip("PIL", reason="the vision extra (pillow) is not installed")

from test_serve_utils import ServerThread  # noqa: E402
from vlm_utils import save_tiny_vlm  # noqa: E402

from lmforge.infer.decode import decode_ids  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.multimodal import prepare_chat  # noqa: E402
from lmforge.serve import ServeConfig  # noqa: E402
from lmforge.tokenizer import load_tokenizer  # noqa: E402

QUESTION = "what colour is the circle?"


def _png(seed: int) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def _messages(url: str, question: str = QUESTION) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-vlm")


@pytest.fixture(scope="module")
def server(vlm_dir):
    with ServerThread(ServeConfig(model=str(vlm_dir), max_seqs=4)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _reference(vlm_dir, messages: list[dict], max_tokens: int) -> str:
    """Greedy answer computed directly: prepare_chat + the VLM's own generate."""
    from lmforge.multimodal import load_multimodal

    model, tok = load_multimodal(vlm_dir, kind="vlm"), load_tokenizer(vlm_dir)
    inputs = prepare_chat(model, tok, messages)
    stops = [tok.token_to_id("<|im_end|>"), tok.eos_id]
    ids = decode_ids(
        model, SamplingParams(max_new_tokens=max_tokens, stop_token_ids=stops), inputs_embeds=inputs["inputs_embeds"]
    )[0]
    return tok.decode([t for t in ids if t not in stops])


def test_image_chat_equals_direct_generation(client, vlm_dir):
    answers = []
    for seed in (0, 1):
        messages = _messages(_url(_png(seed)))
        r = client.chat.completions.create(model="tiny-vlm", messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == _reference(vlm_dir, messages, 12)
        assert r.usage.prompt_tokens > 4  # the image's feature slots count as prompt tokens
        answers.append(r.choices[0].message.content)
    assert answers[0] != answers[1], "two different images gave the same answer: the image is not used"


def test_image_chat_streams_the_same_text(client):
    messages = _messages(_url(_png(2)))
    full = client.chat.completions.create(model="tiny-vlm", messages=messages, max_tokens=10, temperature=0)
    chunks = client.chat.completions.create(
        model="tiny-vlm",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for c in chunks:
        text += "".join(ch.delta.content or "" for ch in c.choices)
        usage = c.usage or usage
    assert text == full.choices[0].message.content
    assert usage.completion_tokens == full.usage.completion_tokens


def test_seeded_sampling_with_an_image_repeats(client):
    kw = dict(model="tiny-vlm", messages=_messages(_url(_png(3))), max_tokens=8, temperature=1.0, seed=7, n=2)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_text_only_chat_on_a_vlm_runs_in_the_engine(client, server):
    before = server.state.runner.engine.counters["generated_tokens"]
    r = client.chat.completions.create(
        model="tiny-vlm", messages=[{"role": "user", "content": QUESTION}], max_tokens=5, temperature=0
    )
    assert r.usage.completion_tokens >= 1
    assert server.state.runner.engine.counters["generated_tokens"] > before


@pytest.mark.parametrize(
    "url,word",
    [
        ("data:image/png;base64,@@not-base64@@", "base64"),
        (_url(b"hello, I am not a picture"), "not a readable image"),
        ("data:text/plain;base64,aGVsbG8=", "data:image"),
        ("https://example.com/cat.png", "remote"),
    ],
)
def test_bad_images_get_a_400_naming_the_problem(server, url, word):
    body = {"model": "tiny-vlm", "messages": _messages(url)}
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=json.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and word in err["message"]


def test_bad_image_through_the_client_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="base64"):
        client.chat.completions.create(model="tiny-vlm", messages=_messages("data:image/png;base64,%%%"))


# ----------------------------------------------------------------------------- issue 17: only data URLs, bounded


def _post_image(server, url) -> httpx.Response:
    body = {
        "model": "tiny-vlm",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": url}, {"type": "text", "text": QUESTION}]}
        ],
        "max_tokens": 2,
    }
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)


def test_image_urls_that_are_not_data_urls_never_touch_the_disk(server, tmp_path):
    """A path (existing or not), file:// and other schemes are refused with the same answer, so the
    server's files can neither be fed to the model nor probed for existence."""
    picture = tmp_path / "secret.png"
    picture.write_bytes(_png(5))
    answers = []
    for url in (str(picture), str(tmp_path / "missing.png"), f"file://{picture}", "/etc/passwd", "ftp://x/y.png"):
        for form in ({"url": url}, url):
            r = _post_image(server, form)
            assert r.status_code == 400, r.text
            message = r.json()["error"]["message"]
            assert "data URL" in message and "does not open paths" in message
            answers.append(message.replace(url[:40], "URL"))
    assert len(set(answers)) == 1  # an existing file is answered exactly as a missing one
    r = _post_image(server, {"url": "http://127.0.0.1:1/cat.png"})
    assert r.status_code == 400 and "not fetched" in r.json()["error"]["message"]


def test_image_bytes_and_pixels_are_bounded_before_decoding(server):
    from PIL import Image

    vision = server.state.vision
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, format="PNG")  # 64M pixels in a few kilobytes
    assert len(buf.getvalue()) < 100_000
    r = _post_image(server, {"url": _url(buf.getvalue())})
    assert r.status_code == 400 and "8000x8000" in r.json()["error"]["message"], r.text
    saved = vision.max_image_bytes
    vision.max_image_bytes = 200  # a bigger payload is refused without decoding it
    try:
        r = _post_image(server, {"url": _url(_png(6))})
        assert r.status_code == 400 and "limit of 200 bytes" in r.json()["error"]["message"]
    finally:
        vision.max_image_bytes = saved
    assert _post_image(server, {"url": _url(_png(6))}).status_code == 200  # within the bounds: served
