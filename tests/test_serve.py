"""The OpenAI-compatible server, driven by the official openai client (and httpx for raw
requests): outputs equal lmforge's own generate(), streaming equals non-streaming, 32 concurrent
streams equal single requests, adapters by model name, every error with its status and type,
auth, 429 on a full queue, timeouts, disconnects freeing KV blocks, metrics, a load test and a
SIGTERM drain of a real `lmforge serve` process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from test_serve_utils import ServerThread, make_checkpoint, wait_until

from lmforge import peft
from lmforge.checkpoint import load_model, load_tokenizer_if_any
from lmforge.infer.generate import generate
from lmforge.serve import ServeConfig
from lmforge.serve.text import TextStream, end_of_turn_ids

torch.set_num_threads(1)
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(ckpt):
    model_dir, adapter_dir = ckpt
    with ServerThread(ServeConfig(model=str(model_dir), adapters={"lora": str(adapter_dir)})) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(ckpt):
    """Greedy continuations from lmforge.infer.generate: base model, and base + the LoRA adapter."""
    model_dir, adapter_dir = ckpt
    base = load_model(model_dir)
    tuned = peft.load_adapter(load_model(model_dir), adapter_dir, adapter_name="lora").eval()
    tok = load_tokenizer_if_any(model_dir)

    def run(ids, n, adapter=False):
        return generate(tuned if adapter else base, ids, max_new_tokens=n)[0].tolist()

    return tok, run


def _chat_ids(tok, messages=MSGS):
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def _metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ----------------------------------------------------------------------------- happy paths


def test_models_lists_base_and_adapters(client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat", "lora"]
    assert client.models.retrieve("lora").id == "lora"


def test_completion_equals_generate(client, reference):
    tok, run = reference
    ids = tok.encode("The quick brown")
    r = client.completions.create(model="tiny-chat", prompt="The quick brown", max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == tok.decode(run(ids, 24))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 24, len(ids) + 24)
    # token-id prompts (one list, and a batch) give the same text
    r2 = client.completions.create(model="tiny-chat", prompt=[ids, ids[:2]], max_tokens=24, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    assert r2.choices[1].text == tok.decode(run(ids[:2], 24))


def test_chat_uses_the_checkpoint_template(client, reference):
    tok, run = reference
    ids = _chat_ids(tok)
    r = client.chat.completions.create(model="tiny-chat", messages=MSGS, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(run(ids, 16))
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 16


def test_generation_stops_at_the_templates_end_of_turn(reference, server):
    tok, _ = reference
    assert end_of_turn_ids(tok) == [tok.eos_id, tok.token_to_id("<|im_end|>")]
    assert server.state.chat_stop_ids == end_of_turn_ids(tok)  # what chat requests stop at


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_equals_non_streaming(client, chat):
    kw = dict(model="lora", max_tokens=20, temperature=0)
    if chat:
        full = client.chat.completions.create(messages=MSGS, **kw).choices[0].message.content
        chunks = list(
            client.chat.completions.create(messages=MSGS, stream=True, stream_options={"include_usage": True}, **kw)
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        full = client.completions.create(prompt="Paged attention", **kw).choices[0].text
        chunks = list(
            client.completions.create(
                prompt="Paged attention", stream=True, stream_options={"include_usage": True}, **kw
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full and len([c for c in chunks if c.choices]) > 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_adapter_selected_by_model_name(client, reference):
    tok, run = reference
    ids = tok.encode("A server streams")
    lora = client.completions.create(model="lora", prompt="A server streams", max_tokens=16, temperature=0)
    base = client.completions.create(model="tiny-chat", prompt="A server streams", max_tokens=16, temperature=0)
    assert lora.choices[0].text == tok.decode(run(ids, 16, adapter=True))
    assert base.choices[0].text == tok.decode(run(ids, 16))
    assert lora.choices[0].text != base.choices[0].text


def test_logprobs_match_the_model(client, reference, ckpt):
    tok, run = reference
    ids = tok.encode("Hello there")
    r = client.completions.create(model="tiny-chat", prompt="Hello there", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    expected = load_model(ckpt[0])(torch.tensor([ids]))[0, -1].log_softmax(-1)
    assert lp.token_logprobs[0] == pytest.approx(expected.max().item(), abs=1e-4)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 4
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)  # distinct strings (byte pieces may collide)
    c = client.chat.completions.create(
        model="tiny-chat", messages=MSGS, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = c.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy = top-1


def _pick_stop(text: str) -> str:
    for i in range(6, len(text) - 2):
        if text[i : i + 2].isascii() and text[i : i + 2].isprintable() and text[i : i + 2].strip():
            return text[i : i + 2]
    pytest.skip("no printable stop candidate in this output")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text(client, stream):
    full = client.completions.create(model="tiny-chat", prompt="The lazy", max_tokens=32, temperature=0).choices[0].text
    stop = _pick_stop(full)
    kw = dict(model="tiny-chat", prompt="The lazy", max_tokens=32, temperature=0, stop=[stop, "never-seen"])
    if stream:
        chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
        text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(**kw).choices[0]
        text, reason = r.text, r.finish_reason
    assert (text, reason) == (full[: full.find(stop)], "stop")


def test_seeded_sampling_and_n(client):
    kw = dict(model="tiny-chat", prompt="The quick", max_tokens=12, temperature=1.0, seed=7)
    a = client.completions.create(n=2, **kw)
    b = client.completions.create(n=2, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1] and a.choices[0].text != a.choices[1].text
    assert a.usage.completion_tokens == 24


def test_chat_stream_with_n_choices(client):
    kw = dict(model="tiny-chat", messages=MSGS, max_tokens=6, temperature=1.0, seed=3, n=2)
    full = client.chat.completions.create(**kw)
    texts = ["", ""]
    for c in client.chat.completions.create(stream=True, **kw):
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
    assert texts == [ch.message.content for ch in full.choices]


def test_32_concurrent_streams_equal_single_requests(client, server):
    prompts = [f"Request {i}: the quick brown fox" + " jumps" * (i % 5) for i in range(32)]
    models = ["lora" if i % 3 == 0 else "tiny-chat" for i in range(32)]
    single = [
        client.completions.create(model=m, prompt=p, max_tokens=12, temperature=0).choices[0].text
        for p, m in zip(prompts, models)
    ]
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    async def one(p, m):
        stream = await aclient.completions.create(model=m, prompt=p, max_tokens=12, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_():
        try:
            return await asyncio.gather(*(one(p, m) for p, m in zip(prompts, models)))
        finally:
            await aclient.close()

    assert asyncio.run(all_()) == single
    assert wait_until(lambda: server.state.runner.stats["steps"] > 0)


def test_chat_page_is_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "getReader" in r.text


# ----------------------------------------------------------------------------- errors


def _long_prompt(n: int) -> list[int]:
    return [5] * n


ERRORS = [  # (body or raw bytes, status, error type, code, a word in the message)
    (b"{not json", 400, "invalid_request_error", None, "JSON"),
    (b"[1, 2]", 400, "invalid_request_error", None, "object"),
    ({"prompt": "hi"}, 400, "invalid_request_error", None, "model"),
    ({"model": "nope", "prompt": "hi"}, 404, "invalid_request_error", "model_not_found", "nope"),
    ({"model": "tiny-chat", "prompt": "hi", "max_tokens": -1}, 400, "invalid_request_error", None, "max_tokens"),
    (
        {"model": "tiny-chat", "prompt": "hi", "max_tokens": 10**9},
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "context",
    ),
    (
        {"model": "tiny-chat", "prompt": _long_prompt(600)},
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "context",
    ),
    ({"model": "tiny-chat", "prompt": "hi", "max_tokens": "ten"}, 400, "invalid_request_error", None, "max_tokens"),
    ({"model": "tiny-chat", "prompt": "hi", "temperature": "hot"}, 400, "invalid_request_error", None, "temperature"),
    ({"model": "tiny-chat", "prompt": "hi", "stream": "yes"}, 400, "invalid_request_error", None, "stream"),
    ({"model": "tiny-chat", "prompt": "hi", "top_p": 2}, 400, "invalid_request_error", None, "top_p"),
    ({"model": "tiny-chat", "prompt": "hi", "n": 0}, 400, "invalid_request_error", None, "n"),
    (
        {"model": "tiny-chat", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]},
        400,
        "invalid_request_error",
        None,
        "stop",
    ),
    ({"model": "tiny-chat", "prompt": 42}, 400, "invalid_request_error", None, "prompt"),
    ({"model": "tiny-chat", "prompt": ""}, 400, "invalid_request_error", None, "empty"),
    ({"model": "tiny-chat", "prompt": [1, 99999]}, 400, "invalid_request_error", None, "vocabulary"),
    ({"model": "tiny-chat", "prompt": "hi", "suffix": "!"}, 400, "invalid_request_error", None, "suffix"),
    ({"model": "tiny-chat", "prompt": "hi", "presence_penalty": 2.5}, 400, "invalid_request_error", None, "penalty"),
    ({"model": "tiny-chat", "prompt": "hi", "unknown_field": 1}, 400, "invalid_request_error", None, "unknown_field"),
    ({"model": "tiny-chat", "prompt": "x" * (2 << 20)}, 413, "invalid_request_error", "request_too_large", "limit"),
]
CHAT_ERRORS = [
    ({"model": "tiny-chat", "messages": []}, 400, "invalid_request_error", None, "messages"),
    ({"model": "tiny-chat", "messages": "hi"}, 400, "invalid_request_error", None, "messages"),
    (
        {"model": "tiny-chat", "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "invalid_request_error",
        None,
        "role",
    ),
    (
        {
            "model": "tiny-chat",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:,"}},
                    ],
                }
            ],
        },
        400,
        "invalid_request_error",
        None,
        "does not accept images",
    ),
    ({"model": "tiny-chat", "messages": MSGS, "top_logprobs": 2}, 400, "invalid_request_error", None, "logprobs"),
    (
        {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi " * 600}]},
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "context",
    ),
    ({"model": "lora2", "messages": MSGS}, 404, "invalid_request_error", "model_not_found", "lora2"),
]


@pytest.mark.parametrize(
    "path,case", [("/v1/completions", c) for c in ERRORS] + [("/v1/chat/completions", c) for c in CHAT_ERRORS]
)
def test_client_mistakes_get_openai_errors(server, path, case):
    body, status, type_, code, word = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == type_ and err["code"] == code and set(err) == {"message", "type", "param", "code"}
    assert word.lower() in err["message"].lower()


def test_routing_errors_and_server_survives(server, client):
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="tiny-chat", prompt=_long_prompt(600))
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert client.completions.create(model="tiny-chat", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    assert _metric(server.url, 'lmforge_requests_total{endpoint="/v1/completions",status="400"}') >= 1


def test_api_key(ckpt):
    with ServerThread(ServeConfig(model=str(ckpt[0]), api_key="sekrit", max_seqs=4)) as s:
        assert httpx.get(s.url + "/health").status_code == 200  # health and metrics stay open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
        assert good.completions.create(model="tiny-chat", prompt="hi", max_tokens=3).usage.completion_tokens == 3


# ----------------------------------------------------------------------------- backpressure, disconnects, load


def _open_stream(url: str, max_tokens: int = 450, first_chunk: bool = True):
    """A raw streaming request left open (after its first chunk): (client, response)."""
    c = httpx.Client(timeout=30)
    body = {"model": "tiny-chat", "prompt": "hi", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    r = c.send(c.build_request("POST", url + "/v1/completions", json=body), stream=True)
    assert r.status_code == 200
    if first_chunk:
        next(r.iter_lines())
    return c, r


def _idle(state) -> bool:
    s = state.runner.stats  # the engine process's snapshot, or the engine thread's live figures
    return (
        state.runner.in_flight == 0
        and s["blocks_used"] == 0
        and s["running"] == 0
        and s["queue_depth"] == 0
        and s["held_requests"] == 0
    )


def test_disconnect_cancels_and_frees_blocks_in_the_engine_process(server):
    before = server.state.runner.stats["generated_tokens"]
    c, r = _open_stream(server.url, max_tokens=450)
    r.close()
    c.close()
    assert wait_until(lambda: _idle(server.state)), server.state.runner.stats
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming request whose client gives up
        httpx.post(
            server.url + "/v1/completions",
            timeout=0.3,
            json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 450, "temperature": 0},
        )
    assert wait_until(lambda: _idle(server.state)), server.state.runner.stats
    assert server.state.runner.stats["generated_tokens"] - before < 2 * 450  # cut short, not run to the end
    assert _metric(server.url, "lmforge_kv_blocks_used") == 0


def test_disconnect_cancels_and_frees_blocks(ckpt):
    with ServerThread(ServeConfig(model=str(ckpt[0]), engine_process=False)) as server:
        _check_disconnect_in_thread(server)


def _check_disconnect_in_thread(server):
    state, engine = server.state, server.state.runner.engine
    step = engine.step

    def slow_step():  # >= 2 s for 450 tokens: a loaded machine cannot finish them before the checks
        time.sleep(0.005)
        return step()

    engine.step = slow_step
    try:
        before = engine.counters["generated_tokens"]
        c, r = _open_stream(server.url)
        assert engine.stats["blocks_used"] > 0
        r.close()
        c.close()
        assert wait_until(lambda: _idle(state)), engine.stats
        # a non-streaming request whose client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                server.url + "/v1/completions",
                timeout=0.3,
                json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 450, "temperature": 0},
            )
        assert wait_until(lambda: _idle(state)), engine.stats
        assert engine.counters["generated_tokens"] - before < 2 * 450  # cut short, not run to the end
        assert _metric(server.url, "lmforge_kv_blocks_used") == 0
    finally:
        del engine.step


def test_full_queue_answers_429_and_timeout_504(ckpt):
    with ServerThread(ServeConfig(model=str(ckpt[0]), max_seqs=1, max_queue=1)) as s:
        # one running, one queued: the limit (max_seqs + max_queue); headers come after the submit
        streams = [_open_stream(s.url, first_chunk=False), _open_stream(s.url, first_chunk=False)]
        assert s.state.runner.in_flight == 2  # the limit: max_seqs + max_queue
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny-chat", "prompt": ["a", "b"], "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # 4 > the limit: never admissible
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).completions.create(
                model="tiny-chat", prompt="hi", max_tokens=2
            )
        for c, resp in streams:
            resp.close()
            c.close()
        assert wait_until(lambda: _idle(s.state))
        s.state.request_timeout = 0.05
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 480})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with pytest.raises(openai.APIError, match="timeout"):  # mid-stream: an error event ends the stream
            list(
                openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).completions.create(
                    model="tiny-chat", prompt="hi", max_tokens=480, stream=True
                )
            )
        assert wait_until(lambda: _idle(s.state))


def _rss_mb(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _engine_rss_mb(state) -> float:
    """The engine process's resident memory (0 with the engine on a thread of this process)."""
    proc = getattr(state.runner, "_proc", None)
    return _rss_mb(proc.pid) if proc is not None else 0.0


def test_load_no_request_lost_and_memory_back_to_idle(server):
    n, concurrency = 120, 24
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    ok_before = _metric(server.url, 'lmforge_requests_total{endpoint="/v1/completions",status="200"}')

    async def one(i, sem):
        async with sem:
            kw = dict(
                model="lora" if i % 4 == 0 else "tiny-chat",
                prompt=f"load {i} " * (1 + i % 7),
                max_tokens=4 + i % 13,
                temperature=0,
            )
            if i % 2:
                stream = await aclient.completions.create(stream=True, **kw)
                return sum([1 async for c in stream if c.choices and c.choices[0].text is not None]) > 0
            r = await aclient.completions.create(**kw)
            return r.usage.completion_tokens == kw["max_tokens"]

    async def run():
        sem = asyncio.Semaphore(concurrency)
        try:
            return await asyncio.gather(*(one(i, sem) for i in range(n)))
        finally:
            await aclient.close()

    asyncio.run(run())  # warm-up round: allocator and caches reach their steady size
    idle_rss, idle_engine_rss = _rss_mb(), _engine_rss_mb(server.state)
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    start = time.perf_counter()
    results = asyncio.run(run())
    assert time.perf_counter() - start < 60
    assert all(results) and len(results) == n
    done = _metric(server.url, 'lmforge_requests_total{endpoint="/v1/completions",status="200"}') - ok_before
    assert done == 2 * n
    assert wait_until(lambda: _idle(server.state))  # held_requests == 0: finished requests are not kept
    assert _rss_mb() - idle_rss < 50
    assert _engine_rss_mb(server.state) - idle_engine_rss < 50


def test_metrics_exposition(server, client):
    before = _metric(server.url, "lmforge_generation_tokens_total")
    ttft = _metric(server.url, "lmforge_time_to_first_token_seconds_count")
    r = client.completions.create(model="tiny-chat", prompt="metrics", max_tokens=7, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    assert _metric(server.url, "lmforge_generation_tokens_total") - before == r.usage.completion_tokens
    assert _metric(server.url, "lmforge_time_to_first_token_seconds_count") == ttft + 1
    for name in (
        "lmforge_queue_depth",
        "lmforge_kv_blocks_used",
        "lmforge_kv_blocks_total",
        'lmforge_inter_token_latency_seconds_bucket{le="+Inf"}',
        "lmforge_prompt_tokens_total",
    ):
        assert name in text
    assert "# TYPE lmforge_time_to_first_token_seconds histogram" in text


# ----------------------------------------------------------------------------- units and the real process


def test_text_stream_holds_back_a_possible_stop_string(reference):
    tok, _ = reference
    ids = tok.encode("Hello there, how are you")
    ts = TextStream(tok, ["re, h"])
    pieces = [ts.push([t]) for t in ids]
    assert "".join(pieces) == "Hello the" and ts.stopped
    ts = TextStream(tok, ["there!"])
    assert "".join(ts.push([t]) for t in ids) + ts.flush() == "Hello there, how are you"


def test_cli_rejects_a_bad_adapter_flag(ckpt, capsys):
    from lmforge.cli import main

    assert main(["serve", "--model", str(ckpt[0]), "--adapter", "no-equals-sign"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_drain_finishes_in_flight_streams_and_refuses_new_work(ckpt):
    """What SIGTERM triggers (uvicorn's handle_exit), in-process: the open stream runs to its end,
    a new request on an open connection gets 503, then the server stops."""
    s = ServerThread(ServeConfig(model=str(ckpt[0]), drain_timeout=30)).__enter__()
    try:
        keep_alive = httpx.Client(timeout=30)
        assert keep_alive.get(s.url + "/health").status_code == 200
        c, r = _open_stream(s.url, max_tokens=400, first_chunk=False)
        s.server.handle_exit(signal.SIGTERM, None)
        late = keep_alive.post(s.url + "/v1/completions", json={"model": "tiny-chat", "prompt": "hi"})
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        s.thread.join(30)
        assert not s.thread.is_alive()
        r.close()
        c.close()
        keep_alive.close()
    finally:
        s.__exit__()


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests(ckpt):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", "--model", str(ckpt[0]), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _healthy(url), timeout=40), "server did not come up"
        result = {}

        def stream():
            with httpx.stream(
                "POST",
                url + "/v1/completions",
                timeout=60,
                json={"model": "tiny-chat", "prompt": "drain", "max_tokens": 300, "temperature": 0, "stream": True},
            ) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            result["lines"] = lines

        t = threading.Thread(target=stream)
        t.start()
        assert wait_until(lambda: _metric(url, "lmforge_requests_in_flight") == 1, timeout=10)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(60) == 0
        lines = result["lines"]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
