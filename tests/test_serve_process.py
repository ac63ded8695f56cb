"""The engine in a child process (serve/engine_process.py, `lmforge serve`'s default): the same
answers as the engine thread, clear start-up errors, a dead engine process reported (not a hang),
and SIGTERM draining with the child process gone afterwards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
from test_serve_utils import ServerThread, make_checkpoint, wait_until

from lmforge.common import LmforgeError
from lmforge.serve import ServeConfig, build_state
from lmforge.serve.engine_process import EngineProcess


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve_process"))


def _answers(url: str) -> list:
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    out = []
    for prompt in ("The quick brown fox", "def main():"):
        r = c.completions.create(model="tiny-chat", prompt=prompt, max_tokens=10, temperature=0, logprobs=2, echo=True)
        out.append((r.choices[0].text, r.choices[0].logprobs.token_logprobs, r.usage.completion_tokens))
    r = c.completions.create(model="lora", prompt="adapter", max_tokens=8, temperature=1.0, seed=3, n=2)
    out.append([ch.text for ch in r.choices])
    r = c.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True
    )
    out.append("".join(ch.choices[0].delta.content or "" for ch in r if ch.choices))
    return out


def test_the_process_and_thread_engines_answer_alike(ckpt):
    model_dir, adapter_dir = ckpt
    answers = []
    for in_process in (True, False):
        with ServerThread(
            ServeConfig(model=str(model_dir), adapters={"lora": str(adapter_dir)}, engine_process=in_process)
        ) as s:
            assert isinstance(s.state.runner, EngineProcess) == in_process
            answers.append(_answers(s.url))
            assert wait_until(lambda: s.state.runner.stats["held_requests"] == 0)
            assert s.state.runner.stats["generated_tokens"] > 0
    # Same text and tokens; log-probabilities to float rounding (the engine process may run with
    # another torch thread count than this test process, which reorders fp32 sums at the 1e-7 level).
    for (text_a, logprobs_a, n_a), (text_b, logprobs_b, n_b) in zip(answers[0][:2], answers[1][:2]):
        assert text_a == text_b and n_a == n_b and logprobs_a[0] is None and logprobs_b[0] is None
        assert logprobs_a[1:] == pytest.approx(logprobs_b[1:], abs=1e-5)
    assert answers[0][2:] == answers[1][2:]


def test_start_up_errors_come_back_from_the_engine_process(ckpt, tmp_path, capsys):
    with pytest.raises(LmforgeError, match="no-such-adapter"):
        build_state(ServeConfig(model=str(ckpt[0]), adapters={"x": str(tmp_path / "no-such-adapter")}))
    from lmforge.cli import main

    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (ckpt[0] / name).exists():
            (bad / name).write_text((ckpt[0] / name).read_text())
    assert main(["serve", "--model", str(bad)]) == 2
    assert "config.json" in capsys.readouterr().err
    with socket.socket() as taken:  # a port in use is refused before the model loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(ckpt[0]), "--port", str(port)]) == 2
    assert f"--port {port}" in capsys.readouterr().err


def test_a_dead_engine_process_fails_its_requests_and_health(ckpt):
    with ServerThread(ServeConfig(model=str(ckpt[0]))) as s:
        result = {}

        def stream():
            with httpx.stream(
                "POST",
                s.url + "/v1/completions",
                timeout=30,
                json={"model": "tiny-chat", "prompt": "x", "max_tokens": 450, "temperature": 0, "stream": True},
            ) as r:
                result["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        t = threading.Thread(target=stream)
        t.start()
        assert wait_until(lambda: s.state.runner.in_flight == 1)
        os.kill(s.state.runner._proc.pid, signal.SIGKILL)
        t.join(30)
        assert not t.is_alive()
        assert result["lines"][-1] == "data: [DONE]"
        assert "engine" in json.loads(result["lines"][-2][6:])["error"]["message"]  # an error event ends it
        assert wait_until(lambda: httpx.get(s.url + "/health").status_code == 503)
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_sigterm_to_the_process_group_drains_and_the_engine_process_exits(ckpt):
    """Ctrl-C or a supervisor signals the whole group: the engine process ignores it and keeps
    stepping while the server drains, then exits when told."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", "--model", str(ckpt[0]), "--port", str(port)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _healthy(url), timeout=60), "server did not come up"
        children = _children(proc.pid)
        assert [b"lmforge.serve.engine_process" in Path(f"/proc/{c}/cmdline").read_bytes() for c in children] == [True]
        with httpx.stream(
            "POST",
            url + "/v1/completions",
            timeout=60,
            json={"model": "tiny-chat", "prompt": "drain", "max_tokens": 200, "temperature": 0, "stream": True},
        ) as r:
            lines = iter(r.iter_lines())
            first = next(line for line in lines if line.startswith("data: "))
            os.killpg(proc.pid, signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert proc.wait(60) == 0
        assert rest[-1] == "data: [DONE]" and json.loads(first[6:])["choices"]
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert wait_until(lambda: not any(Path(f"/proc/{c}").exists() for c in children), timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_engine_loop_reports_a_failing_step_and_keeps_serving(ckpt):
    """The child's loop (run here on a thread, over real pipes): a step that raises fails what is in
    flight with a "failed" message, frees it, and the next request is served; "stop" ends it."""
    import multiprocessing as mp

    from lmforge.checkpoint import load_model, load_tokenizer_if_any
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.serve.engine_process import _serve_forever
    from lmforge.serve.runner import Submission

    engine = Engine(load_model(ckpt[0]), load_tokenizer_if_any(ckpt[0]))
    step, calls = engine.step, []

    def failing_once():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return step()

    engine.step = failing_once
    cmd_read, cmd_write = mp.Pipe(duplex=False)
    event_read, event_write = mp.Pipe(duplex=False)
    loop = threading.Thread(target=_serve_forever, args=(engine, cmd_read, event_write), daemon=True)
    loop.start()

    def until(kind):
        while event_read.poll(10):
            msg = event_read.recv()
            if msg[0] == kind and (kind != "events" or any(ev.finished for _, ev in msg[1])):
                return msg
        raise AssertionError(f"no {kind!r} message")

    cmd_write.send(("add", 0, Submission([5, 6, 7], SamplingParams(max_new_tokens=20))))
    assert until("failed")[1] == "boom"
    cmd_write.send(("add", 1, Submission([5, 6, 7], SamplingParams(max_new_tokens=4))))
    ((key, ev),) = [(k, e) for k, e in until("events")[1] if e.finished]
    assert key == 1 and ev.finish_reason == "length"
    assert until("stats")[1]["held_requests"] == 0  # idle, nothing kept: the failed request was freed
    cmd_write.send(("stop",))
    loop.join(10)
    assert not loop.is_alive()


def _serve_forever_in(model_dir: str, port: int) -> None:
    from lmforge.serve import serve

    serve(ServeConfig(model=model_dir, port=port))


def test_a_server_started_from_code_without_a_main_guard_or_in_a_daemonic_process(ckpt, tmp_path):
    """The engine process is a fresh interpreter that never re-imports the caller's main module
    (multiprocessing's spawn would: a script without `if __name__ == "__main__":`, or code piped to
    `python -`, then fails), and it may be started from a daemonic process, which multiprocessing
    forbids to have children."""
    import multiprocessing as mp

    port = _free_port()
    code = f"from lmforge.serve import ServeConfig, serve\nserve(ServeConfig(model={str(ckpt[0])!r}, port={port}))\n"
    proc = subprocess.Popen(
        [sys.executable, "-"],
        stdin=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proc.stdin.write(code.encode())
    proc.stdin.close()
    daemon_port = _free_port()
    daemon = mp.get_context("spawn").Process(target=_serve_forever_in, args=(str(ckpt[0]), daemon_port), daemon=True)
    daemon.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for u, pid in ((url, proc.pid), (f"http://127.0.0.1:{daemon_port}", daemon.pid)):
            assert wait_until(lambda: _healthy(u), timeout=60), f"server {u} did not come up"
            assert len(_children(pid)) == 1  # its engine process
            r = httpx.post(u + "/v1/completions", json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.kill()
        proc.wait()
        daemon.kill()
        daemon.join(10)
