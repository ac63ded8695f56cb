"""response_format, the OpenAI sampling fields and generation_config.json defaults through the
official openai client: JSON Schema outputs from an untrained model at temperature 1.0 all parse
and validate, a max_tokens cut-off says "length", logit_bias/min_p/penalties change what is
sampled, every field the server once ignored is now honoured or a 400 naming it, and unknown
fields are a 400 naming them."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import jsonschema
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from test_serve_utils import ServerThread, make_checkpoint

from lmforge.checkpoint import load_model, load_tokenizer_if_any
from lmforge.common import LmforgeError
from lmforge.infer.generate import generate
from lmforge.serve import ServeConfig, build_state
from lmforge.serve.app import create_app

torch.set_num_threads(1)
MSGS = [{"role": "user", "content": "Describe a person as JSON."}]

SCHEMAS = [
    {  # nested objects, required fields, an enum, bounded integers
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 5}, "zip": {"type": "integer", "minimum": 1000}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "role", "address"],
        "additionalProperties": False,
    },
    {  # arrays with bounds, booleans, a bounded number
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
            "ok": {"type": "boolean"},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
        },
        "required": ["tags", "ok", "score"],
        "additionalProperties": False,
    },
    {  # an array of objects at the top level, with a const and a $ref
        "type": "array",
        "items": {"$ref": "#/$defs/point"},
        "minItems": 1,
        "maxItems": 2,
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "kind": {"const": "pt"}},
                "required": ["x", "kind"],
                "additionalProperties": False,
            }
        },
    },
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("structured"))[0]


@pytest.fixture(scope="module")
def server(ckpt):  # the engine on a thread: it starts in a second, a child process in ten
    with ServerThread(ServeConfig(model=str(ckpt), max_seqs=16, engine_process=False)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _post(server, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def _chat_stream(stream) -> tuple[list[str], list[str]]:
    texts, reasons = {}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return [texts[i] for i in sorted(texts)], [reasons[i] for i in sorted(reasons)]


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_outputs_always_validate(client, stream):
    """An untrained model sampling at temperature 1.0: 100% of the outputs parse and validate."""
    for k, schema in enumerate(SCHEMAS):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": schema, "strict": True}}
        kw = dict(model="tiny-chat", messages=MSGS, temperature=1.0, n=4, seed=k, max_tokens=200, response_format=fmt)
        if stream:
            texts, reasons = _chat_stream(client.chat.completions.create(stream=True, **kw))
        else:
            r = client.chat.completions.create(**kw)
            texts, reasons = [c.message.content for c in r.choices], [c.finish_reason for c in r.choices]
        assert reasons == ["stop"] * 4, (schema, texts)
        for text in texts:
            jsonschema.validate(json.loads(text), schema)


def test_concurrent_constrained_and_free_requests_equal_each_alone(server):
    """16 greedy requests at once, half under a schema, half free: each answer is the one it gets alone."""
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    fmts = [{"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": s}} for k, s in enumerate(SCHEMAS)]
    kws = [dict(response_format=fmts[i % len(fmts)]) if i % 2 else dict(logit_bias={str(i): 5.0}) for i in range(16)]

    async def ask(kw):
        r = await aclient.chat.completions.create(
            model="tiny-chat", messages=MSGS, temperature=0, max_tokens=40 + len(kw), **kw
        )
        return r.choices[0].message.content

    async def both():
        together = await asyncio.gather(*(ask(kw) for kw in kws))
        return together, [await ask(kw) for kw in kws]

    together, alone = asyncio.run(both())
    assert together == alone


def test_json_object_mode_and_logit_bias_together(client, server):
    tok = server.state.tokenizer
    close = tok.encode("}")
    assert len(close) == 1
    fmt = {"type": "json_object"}
    r = client.chat.completions.create(
        model="tiny-chat",
        messages=MSGS,
        temperature=1.0,
        max_tokens=50,
        response_format=fmt,
        logit_bias={str(close[0]): 100},
    )
    # The grammar makes "{" first; the bias then picks "}" the moment it is allowed.
    assert r.choices[0].message.content == "{}" and r.choices[0].finish_reason == "stop"
    out = client.completions.create(
        model="tiny-chat", prompt="hi", max_tokens=40, temperature=1.0, extra_body={"response_format": fmt}
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].text), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_a_max_tokens_cut_off_says_length(client, stream):
    schema = {"type": "object", "properties": {"essay": {"type": "string", "minLength": 200}}, "required": ["essay"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "long", "schema": schema}}
    kw = dict(model="tiny-chat", messages=MSGS, temperature=1.0, seed=3, max_tokens=20, response_format=fmt)
    if stream:
        texts, reasons = _chat_stream(client.chat.completions.create(stream=True, **kw))
        text, reason = texts[0], reasons[0]
    else:
        c = client.chat.completions.create(**kw).choices[0]
        text, reason = c.message.content, c.finish_reason
    assert reason == "length" and text.startswith('{"essay": "')


def test_sampling_fields_change_the_sampling(client, server):
    base = dict(model="tiny-chat", prompt="The quick brown", max_tokens=12)
    greedy = client.completions.create(temperature=0, **base).choices[0].text
    # min_p 1.0 keeps only the most likely token: sampling at temperature 1 is then greedy.
    assert [
        client.completions.create(temperature=1.0, seed=s, extra_body={"min_p": 1.0}, **base).choices[0].text
        for s in (1, 2)
    ] == [greedy] * 2
    # A +100 bias on one token makes it the only one sampled.
    token = server.state.tokenizer.encode(" fox")[0]
    biased = client.completions.create(temperature=1.0, seed=1, logit_bias={str(token): 100}, **base)
    assert biased.choices[0].text == server.state.tokenizer.decode([token] * 12)
    # Penalties on tokens already generated move greedy decoding off its repeats.
    ids = server.state.tokenizer.encode(greedy)
    assert len(set(ids)) < len(ids), "the greedy output should repeat a token for this check"
    for field in ("presence_penalty", "frequency_penalty"):
        assert client.completions.create(temperature=0, **{field: 2.0}, **base).choices[0].text != greedy


UNKNOWN = [
    ({"model": "tiny-chat", "prompt": "hi", "frobnicate": 1}, "/v1/completions", "frobnicate"),
    ({"model": "tiny-chat", "messages": MSGS, "reasoning_effort": "low"}, "/v1/chat/completions", "reasoning_effort"),
    ({"model": "tiny-chat", "messages": MSGS, "service_tier": "auto"}, "/v1/chat/completions", "service_tier"),
    (
        {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi", "mood": "happy"}]},
        "/v1/chat/completions",
        "messages.0.mood",
    ),
    (
        {"model": "tiny-chat", "messages": MSGS, "stream": True, "stream_options": {"include_usage": True, "x": 1}},
        "/v1/chat/completions",
        "stream_options.x",
    ),
    (
        {"model": "tiny-chat", "messages": MSGS, "response_format": {"type": "json_object", "schema": {}}},
        "/v1/chat/completions",
        "response_format.schema",
    ),
]


@pytest.mark.parametrize("body,path,field", UNKNOWN)
def test_unknown_fields_are_a_400_naming_them(server, body, path, field):
    r = _post(server, body, path)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and "unknown field" in err["message"]


def _fmt(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
ONCE_IGNORED = [  # every field the server once refused or ignored: (extra fields, status, the field named)
    ({"logit_bias": {"7": -5.5}}, 200, None),
    ({"logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ({"logit_bias": {"seven": 1}}, 400, "logit_bias"),
    ({"logit_bias": {"7": 101}}, 400, "logit_bias"),
    ({"min_p": 0.1}, 200, None),
    ({"min_p": 1.5}, 400, "min_p"),
    ({"presence_penalty": 0.5, "frequency_penalty": -0.5}, 200, None),
    ({"presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"min_tokens": 0}, 200, None),
    ({"min_tokens": 5}, 400, "min_tokens"),
    ({"response_format": {"type": "text"}}, 200, None),
    ({"response_format": {"type": "json_object"}}, 200, None),
    ({"response_format": _fmt({"type": "object"})}, 200, None),
    ({"response_format": _fmt({"type": "object", "required": "a"})}, 400, "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, 400, "response_format.type"),
    ({"tools": [TOOL]}, 200, None),
    ({"tools": [TOOL], "tool_choice": "none"}, 200, None),
    ({"tools": [{"type": "function"}]}, 400, "tools.0.function"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ({"functions": [{"name": "f"}]}, 400, "functions"),
    ({"function_call": "auto"}, 400, "function_call"),
    ({"user": "u1", "metadata": {"k": "v"}, "store": False}, 200, None),
    ({"store": True}, 400, "store"),
]


@pytest.mark.parametrize("extra,status,field", ONCE_IGNORED)
def test_once_ignored_fields_are_honoured_or_refused(server, extra, status, field):
    r = _post(server, {"model": "tiny-chat", "messages": MSGS, "max_tokens": 4, **extra})
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == field, r.text
        assert field.split(".")[0] in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "extra,status",
    [({"suffix": ""}, 200), ({"suffix": "!"}, 400), ({"best_of": 2, "n": 2}, 200), ({"best_of": 3, "n": 2}, 400)],
)
def test_completion_only_fields(server, extra, status):
    r = _post(server, {"model": "tiny-chat", "prompt": "hi", "max_tokens": 2, **extra}, "/v1/completions")
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == next(iter(extra))


# ----------------------------------------------------------------------------- generation_config.json


def _client_for(folder) -> TestClient:
    return TestClient(
        create_app(build_state(ServeConfig(model=str(folder), served_model_name="m", engine_process=False)))
    )


def test_generation_config_gives_the_defaults(ckpt, tmp_path):
    folder = shutil.copytree(ckpt, tmp_path / "m")
    tok = load_tokenizer_if_any(folder)
    prompt = tok.encode("The quick brown")
    ask = {"model": "m", "prompt": prompt}
    greedy_ids = generate(load_model(folder), prompt, max_new_tokens=12)[0].tolist()
    pos = next(i for i in range(5, 12) if greedy_ids[i] not in greedy_ids[:i])
    stop_at = greedy_ids[pos]  # a token greedy decoding produces: as an EOS id it ends generation there
    (folder / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "max_new_tokens": 5, "eos_token_id": [stop_at], "top_k": 40})
    )
    with _client_for(folder) as c:
        short = c.post("/v1/completions", json={**ask, "seed": 1}).json()["choices"][0]  # greedy, 5 tokens
        assert short["text"] == tok.decode(greedy_ids[:5]) and short["finish_reason"] == "length"
        stopped = c.post("/v1/completions", json={**ask, "max_tokens": 10}).json()
        assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] <= pos + 1
        assert stopped["choices"][0]["text"].startswith(tok.decode(greedy_ids[:pos]).rstrip("\ufffd"))
        # what the request sets wins: sampling at temperature 1 with its own max_tokens
        sampled = c.post("/v1/completions", json={**ask, "temperature": 1.0, "seed": 5, "max_tokens": 3}).json()
        assert sampled["usage"]["completion_tokens"] <= 3
        chat = c.post("/v1/chat/completions", json={"model": "m", "messages": MSGS}).json()
        assert chat["usage"]["completion_tokens"] <= 5


@pytest.mark.parametrize(
    "config,word",
    [({"temperature": -1}, "temperature"), ({"top_p": "high"}, "top_p"), ({"eos_token_id": "x"}, "eos_token_id")],
)
def test_a_bad_generation_config_is_refused_at_start(ckpt, tmp_path, config, word):
    folder = shutil.copytree(ckpt, tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(LmforgeError, match=f"generation_config.json: {word}"):
        build_state(ServeConfig(model=str(folder), engine_process=False))
