"""Issue 17's server holes, each with a real engine over a tiny random model: a request that fails
must fail alone (the others in the same step finish), out-of-range sampling values are a 400 or
sample safely, malformed bodies (lone surrogates, deep nesting, huge integers, NaN) are a 400 on a
connection that stays open, a body shorter than its Content-Length gets a 408, a chat template
cannot build gigabytes, and max_tokens past the context is a 400."""

from __future__ import annotations

import copy
import json
import socket
import threading
import time

import httpx
import pytest
import torch
from test_serve_utils import ServerThread, make_checkpoint

from lmforge.checkpoint import load_model, load_tokenizer_if_any
from lmforge.common import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams, probabilities, sample
from lmforge.serve import ServeConfig
from lmforge.tokenizer.chat import MAX_RENDER_CHARS, render

torch.set_num_threads(1)
BASE = {"model": "tiny-chat", "prompt": "The quick brown", "max_tokens": 6}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("harden"))


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(ckpt[0]), load_tokenizer_if_any(ckpt[0])


@pytest.fixture(scope="module")
def server(ckpt):  # the default engine: a child process
    with ServerThread(ServeConfig(model=str(ckpt[0]), max_seqs=8, body_timeout=1.0)) as s:
        yield s


def _post(url: str, body, path: str = "/v1/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60, **kw)


# ----------------------------------------------------------------------------- the sampler


def test_tiny_temperatures_are_greedy_and_finite():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 30
    for t in (1e-300, 1e-30, 1e-6):
        assert sample(logits, SamplingParams(temperature=t)).tolist() == logits.argmax(-1).tolist()
    for t in (1e-5, 1e-3, 0.5, 2.0):  # sampled: a real distribution, no NaN
        p = probabilities(logits, SamplingParams(temperature=t))
        assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(4))
    # a top_p under float32's smallest number keeps the top token (it used to drop every token: NaN)
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=1e-300))
    assert p.argmax(-1).tolist() == logits.argmax(-1).tolist() and torch.allclose(p.sum(-1), torch.ones(4))


@pytest.mark.parametrize("penalty", [1e-308, 1e-30, 1e30, 1e308])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_repetition_penalties_sample_a_token(penalty, dtype):
    logits = (torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 5).to(dtype)
    seen = torch.zeros(3, 64, dtype=torch.bool)
    seen[:, ::2] = True
    for t in (0.0, 0.7):
        tokens = sample(logits, SamplingParams(temperature=t, repetition_penalty=penalty), seen=seen)
        assert tokens.shape == (3,) and ((tokens >= 0) & (tokens < 64)).all()


def test_a_row_without_a_finite_logit_raises_a_clear_error():
    logits = torch.randn(2, 10)
    logits[1] = float("nan")
    with pytest.raises(LmforgeError, match="no finite logit"):
        sample(logits, SamplingParams(temperature=1.0))
    for bad in (dict(temperature=float("nan")), dict(temperature=float("inf")), dict(repetition_penalty=float("nan"))):
        with pytest.raises(LmforgeError):
            SamplingParams(**bad)


# ----------------------------------------------------------------------------- a failing row fails alone


@pytest.mark.parametrize("spec", [{}, {"lookup": True}], ids=["plain", "speculative"])
def test_a_failing_row_fails_alone_and_the_others_finish_unchanged(loaded, spec):
    model, tok = loaded
    good = [
        ([5, 6, 7, 8, 9], SamplingParams(max_new_tokens=12)),
        ([9, 8, 7], SamplingParams(max_new_tokens=12, temperature=0.9, seed=3)),
        ([5, 6, 7, 8, 9, 10, 11] * 3, SamplingParams(max_new_tokens=12, temperature=0.7, seed=4, top_k=20)),
    ]
    alone = Engine(model, tok, **spec).generate_batch([p for p, _ in good], [s for _, s in good])
    engine = Engine(model, tok, **spec)
    ids = [engine.add_request(p, copy.deepcopy(s)) for p, s in good[:2]]
    bad_sampling = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=12, temperature=0.8, seed=1))
    bad_forward = engine.add_request([5, 6, 9], SamplingParams(max_new_tokens=12), adapter="nope")
    events = engine.step() + engine.step()
    # Mid-decode, one row's distribution breaks (what temperature 1e-300 did): set past validation.
    engine.requests[bad_sampling].params.temperature = float("nan")
    ids.append(engine.add_request(*good[2]))  # prefilled in a step where the broken row decodes
    while engine.has_unfinished():
        events += engine.step()
    done = {ev.request_id: ev for ev in events if ev.finished}
    assert done[bad_sampling].finish_reason == "error" and "probability" in done[bad_sampling].error
    assert len(engine.output(bad_sampling)) == 2  # it did decode before it broke
    assert done[bad_forward].finish_reason == "error" and "unknown LoRA adapter" in done[bad_forward].error
    assert [done[i].finish_reason for i in ids] == ["length"] * 3
    assert [engine.output(i) for i in ids] == alone  # the same tokens as without the failing rows
    for rid in list(engine.requests):
        engine.release(rid)
    assert engine.stats["blocks_used"] == 0  # the failed rows' blocks came back too
    with pytest.raises(LmforgeError, match="prompt 1 failed: unknown LoRA"):
        Engine(model, tok).generate_batch([[5, 6], [7, 8]], SamplingParams(max_new_tokens=3), [None, "nope"])


def test_a_failing_prompt_in_a_prompts_file_fails_alone_and_says_so(loaded, tmp_path):
    from lmforge.infer.batch import run_prompts_file

    rows = [
        {"id": "a", "prompt": "The quick"},
        {"id": "b", "prompt": "Hello", "adapter": "nope"},
        {"id": "c", "prompt_ids": [5, 6, 7]},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LmforgeError, match=r"1 of 3 prompts failed \(first, .*in.jsonl:2: unknown LoRA adapter"):
        run_prompts_file(*loaded, tmp_path / "in.jsonl", tmp_path / "out.jsonl", SamplingParams(max_new_tokens=4))
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(o["id"], o["finish_reason"], o["completion_tokens"]) for o in out] == [
        ("a", "length", 4),
        ("b", "error", 0),
        ("c", "length", 4),
    ]
    assert "unknown LoRA adapter" in out[1]["error"]


def test_the_engine_process_loop_fails_only_the_failing_request(loaded):
    """The child's loop over real pipes: a request whose row fails ends with an error event; the
    request beside it in the same steps finishes."""
    import multiprocessing as mp

    from lmforge.serve.engine_process import _serve_forever
    from lmforge.serve.runner import Submission

    engine = Engine(*loaded)
    cmd_read, cmd_write = mp.Pipe(duplex=False)
    event_read, event_write = mp.Pipe(duplex=False)
    loop = threading.Thread(target=_serve_forever, args=(engine, cmd_read, event_write), daemon=True)
    loop.start()
    cmd_write.send(("add", 0, Submission([5, 6, 7], SamplingParams(max_new_tokens=8))))
    cmd_write.send(("add", 1, Submission([5, 6, 7], SamplingParams(max_new_tokens=8), adapter="nope")))
    finished, tokens = {}, 0
    while len(finished) < 2 and event_read.poll(20):
        msg = event_read.recv()
        assert msg[0] != "failed", msg  # the old behaviour: the whole step, both requests
        for key, ev in msg[1] if msg[0] == "events" else []:
            tokens += len(ev.new_token_ids) if key == 0 else 0
            if ev.finished:
                finished[key] = ev
    cmd_write.send(("stop",))
    loop.join(10)
    assert finished[0].finish_reason == "length" and tokens == 8
    assert finished[1].finish_reason == "error" and "unknown LoRA adapter" in finished[1].error


def test_a_request_failing_in_the_server_fails_alone(ckpt):
    """Thread engine: one request's row raises inside the engine step; it gets a 500 naming the
    failure, the concurrent requests get their full answers, the server stays healthy."""
    with ServerThread(ServeConfig(model=str(ckpt[0]), engine_process=False, max_seqs=8)) as s:
        engine = s.state.runner.engine
        choose = engine._choose
        marker = s.state.tokenizer.encode("Paged attention")

        def choose_or_fail(seq, *args):
            if seq.prompt[: len(marker)] == marker:
                raise RuntimeError("this row is broken")
            return choose(seq, *args)

        engine._choose = choose_or_fail
        results = {}

        def run(i: int, prompt: str, stream: bool) -> None:
            r = _post(s.url, {**BASE, "prompt": prompt, "max_tokens": 24, "stream": stream})
            results[i] = (r.status_code, r.text)

        prompts = ["The quick brown"] * 4 + ["Paged attention keeps"]
        threads = [threading.Thread(target=run, args=(i, p, i % 2 == 1)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        status, text = results[4]
        assert status == 500 and "this row is broken" in json.loads(text)["error"]["message"]
        for i in range(4):
            status, text = results[i]
            assert status == 200 and "error" not in text, text
            if i % 2 == 0:
                assert json.loads(text)["usage"]["completion_tokens"] == 24
        assert httpx.get(s.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "field,value,status",
    [
        ("temperature", 1e-300, 200),
        ("temperature", 5e-324, 200),
        ("repetition_penalty", 1e-308, 400),
        ("repetition_penalty", 1e308, 400),
        ("repetition_penalty", 0.01, 200),
        ("top_p", 1e-300, 200),
        ("seed", 2**63 - 1, 200),
        ("seed", -(2**63), 200),
        ("seed", 2**63, 400),
        ("top_k", 2**62, 200),
    ],
)
def test_extreme_sampling_values_next_to_good_requests(server, field, value, status):
    """The issue's values among concurrent good requests: the bad one is a 400 naming the field or
    a valid answer; the good ones always finish."""
    results = {}

    def run(i: int, body: dict) -> None:
        results[i] = _post(server.url, body)

    bodies = [{**BASE, "temperature": 0.8, "max_tokens": 16}] * 3 + [{**BASE, field: value, "max_tokens": 16}]
    threads = [threading.Thread(target=run, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(3):
        assert results[i].status_code == 200 and results[i].json()["usage"]["completion_tokens"] == 16
    r = results[3]
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == field


# ----------------------------------------------------------------------------- malformed bodies


NESTED = b'{"model": "tiny-chat", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
MALFORMED = [  # (raw body, path, a word in the message)
    (b'{"model": "tiny-chat", "prompt": "\\ud800 lone"}', "/v1/completions", "surrogate"),
    (b'{"model": "tiny-chat", "prompt": ["ok", "\\udfff"]}', "/v1/completions", "surrogate"),
    (b'{"model": "tiny-chat", "prompt": "hi", "\\ud800": 1}', "/v1/completions", "surrogate"),
    (
        b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\udc00"}]}',
        "/v1/chat/completions",
        "surrogate",
    ),
    (
        b'{"model": "tiny-chat", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
        "/v1/chat/completions",
        "surrogate",
    ),
    (b'{"model": "tiny-chat", "stop": "\\ud800", "prompt": "hi"}', "/v1/completions", "surrogate"),
    (NESTED, "/v1/completions", "nested"),
    (b'{"model": "tiny-chat", "prompt": "hi", "user": ' + b"[" * 40 + b"]" * 40 + b"}", "/v1/completions", "nested"),
    (b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": ' + b"9" * 4300 + b"}", "/v1/completions", "bits"),
    (b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": ' + b"9" * 4301 + b"}", "/v1/completions", "JSON"),
    (b'{"model": "tiny-chat", "prompt": "hi", "seed": -' + b"9" * 4300 + b"}", "/v1/completions", "bits"),
    (b'{"model": "tiny-chat", "prompt": [1, ' + b"7" * 4000 + b"]}", "/v1/completions", "bits"),
    (
        b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": '
        + b"1" * 4300
        + b"}",
        "/v1/chat/completions",
        "bits",
    ),
    (b'{"model": "tiny-chat", "prompt": "hi", "temperature": NaN}', "/v1/completions", "NaN"),
    (b'{"model": "tiny-chat", "prompt": "hi", "top_p": Infinity}', "/v1/completions", "Infinity"),
    (b'{"model": "tiny-chat", "prompt": "\xff\xfe"}', "/v1/completions", "JSON"),
    (b'{"model": "tiny-chat", "prompt": "hi", "logit_bias": {"99999": 100}}', "/v1/completions", "logit_bias"),
    (
        b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}',
        "/v1/chat/completions",
        "tools",
    ),
    (
        b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}',
        "/v1/chat/completions",
        "response_format",
    ),
    (b'{"model": "tiny-chat", "prompt": "hi", "min_tokens": 5}', "/v1/completions", "min_tokens"),
]


def _raw_exchange(url: str, requests: list[bytes], timeout: float = 20) -> list[bytes]:
    """Send HTTP/1.1 requests one after another on ONE connection; each response's head + body."""
    host, port = url.removeprefix("http://").split(":")
    out = []
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        f = sock.makefile("rb")
        for req in requests:
            sock.sendall(req)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                byte = f.read(1)
                if not byte:
                    raise AssertionError(f"the server closed the connection (after {len(out)} responses)")
                head += byte
            length = int(
                next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            )
            out.append(head + f.read(length))
    return out


def _request(path: str, body: bytes, method: str = "POST") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize("body,path,word", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_bodies_get_a_400_on_a_connection_that_stays_open(server, body, path, word):
    bad, health = _raw_exchange(server.url, [_request(path, body), _request("/health", b"", "GET")])
    head, _, payload = bad.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), bad[:300]
    err = json.loads(payload)["error"]
    assert err["type"] == "invalid_request_error" and word.lower() in err["message"].lower(), err
    assert health.startswith(b"HTTP/1.1 200")  # the same keep-alive connection still answers


def test_a_body_shorter_than_its_content_length_times_out_with_408(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model"'
        )
        reply = b""
        while b"}}" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    assert time.monotonic() - start < 8  # body_timeout is 1 s here
    assert httpx.get(server.url + "/health").status_code == 200


# ----------------------------------------------------------------------------- unbounded work


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'A' * 200000000 }}",
        "{{ ['x'] * 200000000 }}",
        "{{ 'a'|center(1000000000) }}",
        "{{ 'a'.ljust(10**9) }}",
        "{{ '%1000000000s' % 'a' }}",
        "{{ '{:>999999999}'.format('a') }}",
        "{{ 10 ** 100000000 }}",
        "{{ ('A' * 100000).replace('A', 'B' * 100000) }}",
        "{{ ('a\n' * 100000)|indent(100000) }}",
        "{% set ns = namespace(s='A') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
        "{{ lipsum(10**9) }}",
        "{{ ''.join(['a' * 10000000] * 10) }}",
    ],
)
def test_chat_templates_cannot_build_gigabytes(template):
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(LmforgeError, match=f"at most {MAX_RENDER_CHARS}"):
        render(template, [{"role": "user", "content": "hi"}])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * MAX_RENDER_CHARS  # the bound holds before the value is built (was 7 GB)


def test_ordinary_template_arithmetic_still_renders():
    out = render(
        "{{ 'ab' * 3 }}|{{ 'x' ~ 1 }}|{{ '%5s' % 'a' }}|{{ '{:>3}'.format('b') }}|{{ 2 ** 10 }}|"
        "{{ 'a b'|replace(' ', '-')|center(5) }}|{{ ['p', 'q']|join(',') }}|{{ messages[0]['content'] }}",
        [{"role": "user", "content": "hi"}],
    )
    assert out == "ababab|x1|    a|  b|1024| a-b |p,q|hi"


def test_a_server_whose_template_explodes_answers_400(loaded):
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app
    from lmforge.serve.server import build_state

    model, tok = loaded
    tok = copy.copy(tok)
    tok.chat_template = "{{ messages[0]['content'] * 200000000 }}"
    state = build_state(ServeConfig(model="unused", engine_process=False, max_seqs=2), model, tok)
    with TestClient(create_app(state)) as client:
        r = client.post(
            "/v1/chat/completions", json={"model": "unused", "messages": [{"role": "user", "content": "A"}]}
        )
    assert r.status_code == 400 and "at most" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {**BASE, "max_tokens": 2**63 - 1},
        {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**15},
        {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000},
    ],
)
def test_max_tokens_past_the_context_is_a_400(server, body):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = _post(server.url, body, path)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
