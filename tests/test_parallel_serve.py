"""`torchrun --nproc_per_node 2 -m lmforge serve --tp 2` answers the OpenAI API (the official openai
client, concurrent greedy chat requests, a stream among them) exactly as a single-process server
does; SIGTERM to rank 0 drains it, releases the follower and every process exits 0; the flags a
sharded server cannot honour are refused."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from parallel_guard import start_guarded, stop_guarded, tagged
from test_serve_utils import ServerThread, make_checkpoint

openai = pytest.importorskip("openai")

QUESTIONS = ["hello", "what is two plus two?", "name a colour", "tell me a story about a cat", "why?", "ok"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask_all(url: str) -> list[tuple]:
    """Every question at once (greedy, varied lengths); the last one streamed."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(i: int) -> tuple:
        kw = dict(model="tiny-chat", messages=[{"role": "user", "content": QUESTIONS[i]}], temperature=0)
        kw["max_tokens"] = 6 + 2 * i
        if i == len(QUESTIONS) - 1:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        r = client.chat.completions.create(logprobs=True, top_logprobs=2, **kw)
        lps = [t.logprob for t in r.choices[0].logprobs.content]
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens, lps

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        return list(pool.map(ask, range(len(QUESTIONS))))


def _rank0_pid(guard: subprocess.Popen) -> int | None:
    """The pid of the torchrun worker with RANK=0 among the guard's processes (found by environment)."""
    for pid in tagged(guard.tag):
        try:
            if b"RANK=0" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            pass
    return None


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"serve --tp 2 did not come up in {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tp-serve"))[0]


# ~40 s quiet, 60 s loaded: two torchrun ranks plus a reference server (in CI: the issue asks every TP test to run)
def test_serve_tp_answers_like_one_process_and_stops_cleanly(model_dir, tmp_path):
    from lmforge.serve import ServeConfig

    port, log = _free_port(), tmp_path / "serve.log"
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "lmforge", "serve", "--tp", "2", "--model", str(model_dir), "--port", str(port), "--max-seqs", "4"]
    with log.open("w") as out:
        proc = start_guarded(cmd, env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # The single-process answers while the sharded server starts (max-seqs 4 < 6 requests: some wait).
        with ServerThread(ServeConfig(model=str(model_dir), engine_process=False, max_seqs=4)) as one:
            expected = _ask_all(one.url)
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        answers = _ask_all(url)
        assert [a[:3] for a in answers] == [a[:3] for a in expected]
        for a, b in zip(answers[:-1], expected[:-1]):  # the logprobs, to float32 noise (sums in another order)
            assert len(a[3]) == len(b[3]) and max(abs(x - y) for x, y in zip(a[3], b[3])) <= 1e-4
        assert len({a[0] for a in expected}) > 3  # different answers: a wrong shard would show
        rank0 = _rank0_pid(proc)
        assert rank0 is not None
        os.kill(rank0, signal.SIGTERM)  # rank 0 drains, releases the follower; torchrun sees two clean exits
        assert proc.wait(60) == 0, log.read_text()[-4000:]
    finally:
        stop_guarded(proc)


@pytest.mark.parametrize(
    "argv, why",
    [
        (["--adapter", "a=b"], "--adapter cannot be combined with --tp 2"),
        (["--engine", "process"], "--engine process cannot be combined with --tp 2"),
        ([], "--tp 2 needs exactly 2 processes"),
    ],
)
def test_serve_tp_refuses_what_it_cannot_do(model_dir, argv, why, capsys):
    from lmforge.cli import main

    assert main(["serve", "--tp", "2", "--model", str(model_dir), *argv]) != 0
    assert why in capsys.readouterr().err
