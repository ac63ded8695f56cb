"""`lmforge serve --replicas 2` on Ray Serve (a local Ray cluster started by the command): a bounded load
test of 16 concurrent chat requests, every one answered (200) with what a single-process server answers,
the 95th-percentile latency bounded, then SIGTERM shuts the replicas and Ray down and the command exits 0.
The whole launch (Ray's own processes included) runs under tests/parallel_guard.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from parallel_guard import start_guarded, stop_guarded
from test_parallel_serve import _free_port, _wait_healthy
from test_serve_utils import ServerThread, make_checkpoint

REQUESTS, P95_BOUND_S = 16, 15.0  # measured p95: 1.25 s at load average 15 on 2 cores


def _chat(url: str, i: int) -> tuple[str, float]:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": f"question {i}"}], "temperature": 0}
    body["max_tokens"] = 8 + i % 5
    req = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        answer = json.loads(r.read())["choices"][0]["message"]["content"]
    return answer, time.perf_counter() - t0


def _load(url: str) -> list[tuple[str, float]]:
    with ThreadPoolExecutor(REQUESTS) as pool:
        return list(pool.map(lambda i: _chat(url, i), range(REQUESTS)))


def test_two_ray_serve_replicas_answer_a_bounded_load(tmp_path):
    from lmforge.serve import ServeConfig

    model_dir, _ = make_checkpoint(tmp_path)
    port, log = _free_port(), tmp_path / "serve.log"
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--replicas", "2", "--engine", "thread", "--max-seqs", "4"]
    with log.open("w") as out:
        proc = start_guarded(cmd, env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with ServerThread(ServeConfig(model=str(model_dir), engine_process=False, max_seqs=4)) as one:
            expected = [a for a, _ in _load(one.url)]
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log, timeout=240)
        results = _load(url)
        assert [a for a, _ in results] == expected
        latencies = sorted(t for _, t in results)
        p95 = latencies[int(0.95 * (len(latencies) - 1))]
        print(f"16 concurrent requests on 2 replicas: p50 {latencies[len(latencies) // 2]:.2f} s, p95 {p95:.2f} s")
        assert p95 <= P95_BOUND_S, latencies
        proc.send_signal(signal.SIGTERM)  # the guard passes it on: replicas and Ray shut down
        assert proc.wait(120) == 0, log.read_text()[-4000:]
    finally:
        stop_guarded(proc)


def test_replicas_flag_is_checked(tmp_path, capsys):
    from lmforge.cli import main

    model_dir, _ = make_checkpoint(tmp_path)
    assert main(["serve", "--model", str(model_dir), "--replicas", "0"]) != 0
    assert "--replicas must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--replicas", "2", "--tp", "2"]) != 0
    assert "--replicas cannot be combined with --tp" in capsys.readouterr().err
