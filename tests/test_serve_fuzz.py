"""Property-based fuzzing of the server's request bodies (Hypothesis) against a real engine on a
tiny random model: random JSON of the wrong type or range in every field of /v1/completions and
/v1/chat/completions, random Unicode (lone surrogates included), raw byte soup. Each answer is a
valid 200 or one clear 4xx OpenAI error JSON; never a 500, never an error logged, and the engine
keeps serving. A second property: every body whose values are in range is answered 200 (or a
400 that the prompt does not fit the context)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve_utils import make_checkpoint

from lmforge.serve import ServeConfig
from lmforge.serve.app import create_app
from lmforge.serve.server import build_state

torch.set_num_threads(1)
# 60 examples per property in the suite; LMFORGE_FUZZ_EXAMPLES=2000 for a deeper run by hand.
FUZZ = settings(
    max_examples=int(os.environ.get("LMFORGE_FUZZ_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
MSGS = [{"role": "user", "content": "Hello there"}]

# ----------------------------------------------------------------------------- strategies

unicode_text = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=12)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [
            0,
            -1,
            1,
            2,
            3,
            16,
            17,
            20,
            21,
            64,
            2**31,
            2**63 - 1,
            2**63,
            2**64,
            -(2**63),
            -(2**63) - 1,
            0.0,
            1e-300,
            5e-324,
            -1e-308,
            1e-5,
            0.01,
            0.5,
            1.0,
            2.0,
            2.0000001,
            100.0,
            1e308,
        ]
    ),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, unicode_text),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(unicode_text, inner, max_size=4)),
    max_leaves=10,
)
token_ids = st.lists(st.integers(min_value=-5, max_value=500), max_size=8)
prompts = st.one_of(unicode_text, st.lists(unicode_text, max_size=3), token_ids, st.lists(token_ids, max_size=3))
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(unicode_text, json_values)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": json_values}),
    st.dictionaries(st.sampled_from(["type", "text", "image_url"]), json_values, max_size=3),
)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "wizard"]),
                "content": st.one_of(unicode_text, st.none(), st.lists(parts, max_size=3), json_values),
            },
            optional={"name": json_values},
        ),
        json_values,
    ),
    max_size=3,
)
stops = st.one_of(unicode_text, st.lists(unicode_text, max_size=6))
FIELDS = {  # field -> values of its own kind (in range or not); every field also gets any JSON value
    "model": st.sampled_from(["tiny", "other", ""]),
    "max_tokens": numbers,
    "temperature": numbers,
    "top_p": numbers,
    "n": numbers,
    "stream": st.booleans(),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": json_values}), json_values),
    "stop": stops,
    "seed": numbers,
    "presence_penalty": numbers,
    "frequency_penalty": numbers,
    "user": unicode_text,
    "top_k": numbers,
    "repetition_penalty": numbers,
    "logit_bias": st.dictionaries(unicode_text, numbers, max_size=2),
    "best_of": numbers,
    "min_tokens": numbers,
    "min_p": numbers,
}
COMPLETION_FIELDS = {**FIELDS, "prompt": prompts, "logprobs": numbers, "echo": st.booleans(), "suffix": unicode_text}
CHAT_FIELDS = {
    **FIELDS,
    "messages": messages,
    "max_completion_tokens": numbers,
    "logprobs": st.booleans(),
    "top_logprobs": numbers,
    "tools": json_values,
    "tool_choice": json_values,
    "response_format": json_values,
}


def bodies(base: dict, fields: dict) -> st.SearchStrategy:
    """The valid `base` with up to 4 fields replaced by values of their kind or any JSON value, or
    removed."""
    missing = object()

    @st.composite
    def build(draw):
        body = dict(base)
        for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
            value = draw(st.one_of(fields[name], json_values, st.just(missing)))
            if value is missing:
                body.pop(name, None)
            else:
                body[name] = value
        return body

    return build()


def in_range(required: dict, extra: dict) -> st.SearchStrategy:
    """Bodies whose every value is valid: they must be answered (200, or the context is too short)."""
    valid_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12)
    common = dict(
        temperature=st.one_of(st.floats(0, 2), st.sampled_from([0.0, 5e-324, 1e-300, 1e-5, 2.0])),
        top_p=st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([5e-324, 1e-300, 1.0])),
        top_k=st.one_of(st.integers(0, 500), st.just(2**62)),
        n=st.integers(1, 3),
        repetition_penalty=st.one_of(st.floats(0.01, 100), st.sampled_from([0.01, 100.0])),
        seed=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
        max_tokens=st.integers(0, 6),
        stop=st.one_of(st.none(), valid_text, st.lists(valid_text, max_size=4)),
        stream=st.booleans(),
    )
    return st.fixed_dictionaries({"model": st.just("tiny"), **required}, optional={**common, **extra})


# ----------------------------------------------------------------------------- the server


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model_dir, _ = make_checkpoint(tmp_path_factory.mktemp("fuzz"))
    cfg = ServeConfig(
        model=str(model_dir), served_model_name="tiny", engine_process=False, max_seqs=8, max_queue=64, max_model_len=64
    )
    errors = _Errors()
    logging.getLogger("lmforge").addHandler(errors)
    with TestClient(create_app(build_state(cfg))) as c:
        c.errors = errors.records
        yield c
    logging.getLogger("lmforge").removeHandler(errors)


def check(client: TestClient, path: str, content: bytes, only_context_errors: bool = False) -> None:
    r = client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, f"{r.status_code} for {content[:300]!r}: {r.text[:500]}"
    logged = list(client.errors)
    client.errors.clear()  # (so one failing example does not fail the next)
    assert not logged, f"an error was logged for {content[:300]!r}: {logged[0].getMessage()}"
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
        assert err["type"] == "invalid_request_error", err
        assert "Traceback" not in err["message"]
        if only_context_errors:
            assert err["code"] == "context_length_exceeded" or "empty" in err["message"], err
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]", r.text[-300:]
        for e in events[:-1]:
            assert "error" not in json.loads(e), e  # an engine failure travels in the stream
    else:
        answer = r.json()
        assert answer["choices"] and all(c["finish_reason"] in ("stop", "length") for c in answer["choices"])
        assert answer["usage"]["total_tokens"] >= answer["usage"]["prompt_tokens"] > 0


def _encode(body) -> bytes:
    return json.dumps(body, ensure_ascii=True).encode()  # lone surrogates travel as \\udXXX escapes


COMPLETION = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 3}
CHAT = {"model": "tiny", "messages": MSGS, "max_tokens": 3}


@FUZZ
@given(body=bodies(COMPLETION, COMPLETION_FIELDS))
def test_completions_fuzz(client, body):
    check(client, "/v1/completions", _encode(body))


@FUZZ
@given(body=bodies(CHAT, CHAT_FIELDS))
def test_chat_fuzz(client, body):
    check(client, "/v1/chat/completions", _encode(body))


@FUZZ
@given(body=json_values, chat=st.booleans())
def test_any_json_body(client, body, chat):
    check(client, "/v1/chat/completions" if chat else "/v1/completions", _encode(body))


@FUZZ
@given(
    raw=st.one_of(
        st.binary(max_size=64),
        st.builds(lambda b, cut: b[:cut], st.just(_encode(CHAT)), st.integers(0, 80)),  # truncated JSON
        st.builds(lambda d, k: d * b"[" + k + d * b"]", st.integers(20, 3000), st.sampled_from([b"", b"1", b'"x"'])),
        st.builds(
            lambda s: b'{"model": "tiny", "prompt": "hi", "seed": ' + s + b"}",
            st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1" * 4300, b"1" * 4301, b"1e999", b"-0"]),
        ),
    ),
    chat=st.booleans(),
)
def test_raw_bytes(client, raw, chat):
    check(client, "/v1/chat/completions" if chat else "/v1/completions", raw)


@FUZZ
@given(
    body=in_range(
        dict(
            prompt=st.one_of(
                st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20),
                st.lists(st.integers(0, 399), min_size=1, max_size=8),
            )
        ),
        dict(logprobs=st.one_of(st.none(), st.integers(0, 5)), echo=st.booleans()),
    )
)
def test_completions_in_range_are_answered(client, body):
    check(client, "/v1/completions", _encode(body), only_context_errors=True)


@FUZZ
@given(
    body=in_range(
        dict(
            messages=st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.sampled_from(["system", "user", "assistant"]),
                        "content": st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
                    }
                ),
                min_size=1,
                max_size=2,
            ),
            logprobs=st.booleans(),
        ),
        dict(top_logprobs=st.integers(0, 5)),
    )
)
def test_chat_in_range_is_answered(client, body):
    if not body["logprobs"]:
        body.pop("top_logprobs", None)  # top_logprobs needs logprobs: true
    check(client, "/v1/chat/completions", _encode(body), only_context_errors=True)


def test_the_engine_still_serves_after_the_fuzz(client):
    r = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert client.get("/health").json() == {"status": "ok", "in_flight": 0}
