"""Edge-cloud routing: confidence signals and decisions on scripted log-probabilities, the learned
router, the cost-quality curve against random routing, flag validation, and the fallback path
end to end: a server with --fallback in front of a second `lmforge serve` process on 127.0.0.1."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest

from lmforge.common import LmforgeError
from lmforge.serve.router_model import LearnedRouter, query, token_entropy
from lmforge.serve.routing import HEADER, RouteConfig, Router, cost_quality_curve, features


def entries(logprobs, alts=None):
    """Scripted engine entries: (token, logprob, alternatives) per token."""
    return [(i, lp, None if alts is None else alts[i]) for i, lp in enumerate(logprobs)]


def test_signals():
    assert token_entropy(0.0, [(1, 0.0)]) == pytest.approx(0.0)  # certain
    uniform = [(t, math.log(0.25)) for t in range(4)]
    assert token_entropy(math.log(0.25), uniform) == pytest.approx(math.log(4))
    half = [(0, math.log(0.5))]  # the other half of the mass is one bucket
    assert token_entropy(math.log(0.5), half) == pytest.approx(math.log(2))
    f = features(entries([-0.1, -2.0, -0.3]))
    assert f["mean_logprob"] == pytest.approx(-0.8) and f["min_logprob"] == -2.0
    assert f["log_tokens"] == pytest.approx(math.log(4))


def test_decisions_on_scripted_logprobs():
    def q(*args):
        return query(entries=entries(*args))

    router = Router(RouteConfig("http://127.0.0.1:1", threshold=-1.0))
    assert router.decide([q([-0.2, -0.5])]).route == "local"
    assert router.decide([q([-0.2, -3.0])]).route == "fallback"  # mean -1.6
    d = router.decide([q([-0.1]), q([-2.5])])  # the least confident choice decides
    assert d.route == "fallback" and d.value == -2.5
    ent = Router(RouteConfig("http://127.0.0.1:1", threshold=0.5, signal="entropy"))
    sure = q([-0.01], [[(0, -0.01)]])
    unsure = q([math.log(0.25)], [[(t, math.log(0.25)) for t in range(4)]])
    assert ent.decide([sure]).route == "local" and ent.decide([unsure]).route == "fallback"
    assert router.decide([query(entries=[])]).route == "fallback"  # an empty answer is not trusted


def test_probe_and_trim_give_the_client_what_it_asked():
    from lmforge.serve.runner import Submission

    subs = [Submission([1, 2], None, None, None), Submission([1], None, None, 2)]
    probed = Router(RouteConfig("http://x")).probe(subs)
    assert [s.logprobs for s in probed] == [5, 5] and subs[0].logprobs is None
    alts = [(7, -0.1), (8, -2.0), (9, -3.0)]
    results = [{"logprobs": [(7, -0.1, alts)]}, {"logprobs": [(7, -0.1, alts)]}]
    trimmed = Router.trim(results, [s.logprobs for s in subs])
    assert trimmed[0]["logprobs"] == [] and trimmed[1]["logprobs"] == [(7, -0.1, alts[:2])]


def test_config_errors():
    with pytest.raises(LmforgeError, match="http"):
        RouteConfig("localhost:8000")
    with pytest.raises(LmforgeError, match="route-signal"):
        RouteConfig("http://x", signal="vibes")
    with pytest.raises(LmforgeError, match="--router"):
        RouteConfig("http://x", signal="learned")
    with pytest.raises(LmforgeError, match="finite"):
        RouteConfig("http://x", threshold=float("nan"))


def _synthetic(n=400, seed=0):
    """Queries whose local answer is right more often when its mean logprob is high."""
    rng = np.random.default_rng(seed)
    mean_lp = rng.uniform(-3, 0, n)
    local = rng.random(n) < 1 / (1 + np.exp(-(3 * mean_lp + 4)))
    fallback = rng.random(n) < 0.9
    feats = [
        {"mean_logprob": m, "min_logprob": m - 1, "entropy": -m + rng.normal(0, 0.3), "log_tokens": 2.0}
        for m in mean_lp
    ]
    return mean_lp, local, fallback, feats


def test_cost_quality_curve_beats_random_routing():
    mean_lp, local, fallback, _ = _synthetic()
    rows = cost_quality_curve(mean_lp, local, fallback)
    assert rows[0]["accuracy"] == pytest.approx(local.mean()) and rows[-1]["accuracy"] == pytest.approx(fallback.mean())
    assert all(r["accuracy"] > r["random_accuracy"] for r in rows[1:-1])
    noise = cost_quality_curve(np.zeros(len(local)), local, fallback)  # no signal: no better than random
    assert abs(np.mean([r["accuracy"] - r["random_accuracy"] for r in noise])) < 0.05


def test_learned_router_fit_save_load(tmp_path):
    _, local, _, feats = _synthetic()
    router = LearnedRouter.fit(feats, local)
    p = np.array([router.predict(f) for f in feats])
    assert p[local].mean() > p[~local].mean() + 0.2
    router.save(tmp_path / "router.json")
    again = LearnedRouter.load(tmp_path / "router.json")
    assert again.predict(feats[0]) == pytest.approx(router.predict(feats[0]))
    (tmp_path / "bad.json").write_text('{"weights": [1]}')
    with pytest.raises(LmforgeError, match="bad.json"):
        LearnedRouter.load(tmp_path / "bad.json")
    with pytest.raises(LmforgeError, match="worth keeping"):
        LearnedRouter.fit(feats[:5], [True] * 5)


# ----------------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(local ServerThread, fallback URL): the fallback is a second `lmforge serve` process on
    127.0.0.1 serving the same checkpoint as model "big"."""
    from test_serve_utils import ServerThread, make_checkpoint, wait_until

    from lmforge.serve import ServeConfig

    model_dir, _ = make_checkpoint(tmp_path_factory.mktemp("routing"))
    port = _free_port()
    cmd = [sys.executable, "-m", "lmforge", "serve", str(model_dir), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--served-model-name", "big", "--engine", "thread"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        route = RouteConfig(url, threshold=0.0)
        with ServerThread(
            ServeConfig(model=str(model_dir), served_model_name="small", engine_process=False, route=route)
        ) as s:
            assert wait_until(healthy, timeout=180), "the fallback server did not come up"  # a loaded machine
            yield s, url
    finally:
        proc.terminate()
        proc.wait(30)


def _ask(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def test_low_confidence_goes_to_the_fallback(servers, tmp_path):
    local, fallback = servers
    log_file = tmp_path / "routes.jsonl"
    local.state.router = Router(
        RouteConfig(fallback, threshold=0.0, route_log=str(log_file))
    )  # mean logprob < 0 always
    body = {"model": "small", "prompt": "Hello there", "max_tokens": 6, "temperature": 0}
    r = _ask(local.url, "/v1/completions", body)
    assert r.status_code == 200 and r.headers[HEADER] == "fallback"
    data = r.json()
    direct = _ask(fallback, "/v1/completions", {**body, "model": "big"}).json()
    assert data["model"] == "big" and data["choices"][0]["text"] == direct["choices"][0]["text"]
    assert data["lmforge_route"]["decision"] == "fallback" and data["lmforge_route"]["value"] < 0
    chat = _ask(
        local.url,
        "/v1/chat/completions",
        {"model": "small", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert chat.headers[HEADER] == "fallback" and chat.json()["object"] == "chat.completion"
    logged = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [x["decision"] for x in logged] == ["fallback", "fallback"] and logged[0]["signal"] == "mean_logprob"


def test_confident_answers_stay_local_and_look_unrouted(servers):
    local, fallback = servers
    local.state.router = Router(RouteConfig(fallback, threshold=-1e9))  # never escalate
    body = {"model": "small", "prompt": "Hello there", "max_tokens": 6, "temperature": 0}
    r = _ask(local.url, "/v1/completions", body)
    assert r.headers[HEADER] == "local" and r.json()["model"] == "small"
    assert r.json()["choices"][0]["logprobs"] is None  # probed for routing, not shown unasked
    lp = _ask(local.url, "/v1/completions", {**body, "logprobs": 2}).json()["choices"][0]["logprobs"]
    assert all(len(top) <= 2 for top in lp["top_logprobs"])  # the client's 2, not the router's 5
    local.state.router = None
    plain = _ask(local.url, "/v1/completions", body).json()
    assert plain["choices"][0]["text"] == r.json()["choices"][0]["text"] and "lmforge_route" not in plain


def test_agreement_samples_stay_behind_the_response(servers, tmp_path):
    local, fallback = servers
    log_file = tmp_path / "routes.jsonl"
    body = {"model": "small", "prompt": "Hello there", "max_tokens": 5, "temperature": 0, "n": 2}
    values = []
    for threshold, route in ((1.01, "fallback"), (0.0, "local")):  # agreement is in [0, 1]
        cfg = RouteConfig(fallback, signal="agreement", samples=3, threshold=threshold, route_log=str(log_file))
        local.state.router = Router(cfg)
        r = _ask(local.url, "/v1/completions", body)
        assert r.status_code == 200 and r.headers[HEADER] == route
        data = r.json()
        assert len(data["choices"]) == 2 and data["lmforge_route"]["signal"] == "agreement"
        values.append(data["lmforge_route"]["value"])
    assert data["usage"]["completion_tokens"] == 10  # the client's two choices, not the six samples
    assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in values)
    assert [json.loads(x)["decision"] for x in log_file.read_text().splitlines()] == ["fallback", "local"]
    too_many = local.state.runner.max_in_flight // 2  # 2 + 2 x too_many: more than the server runs at once
    local.state.router = Router(RouteConfig(fallback, signal="agreement", samples=too_many))
    r = _ask(local.url, "/v1/completions", body)
    assert r.status_code == 400 and "samples per choice" in r.json()["error"]["message"]


def test_a_learned_router_reads_the_prompt_text_in_serve(servers, tmp_path):
    from lmforge.serve.router_model import PROMPT_FEATURES, query

    local, fallback = servers
    qs = [query(f"Q: {a} {op} {b}") for a in range(1, 10) for b in range(1, 10) for op in "+*"]
    router = LearnedRouter.fit(qs, ["*" not in q["prompt"] for q in qs], PROMPT_FEATURES, ngram_dims=64)
    router.save(tmp_path / "router.json")
    local.state.router = Router(RouteConfig(fallback, signal="learned", router=str(tmp_path / "router.json")))
    routes = {
        op: _ask(local.url, "/v1/completions", {"model": "small", "prompt": f"Q: 4 {op} 7", "max_tokens": 3})
        for op in "+*"
    }
    assert routes["+"].headers[HEADER] == "local" and routes["*"].headers[HEADER] == "fallback"


def test_a_failed_fallback_keeps_the_local_answer(servers):
    local, _ = servers
    local.state.router = Router(RouteConfig(f"http://127.0.0.1:{_free_port()}", threshold=0.0))  # nobody there
    r = _ask(local.url, "/v1/completions", {"model": "small", "prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200 and r.headers[HEADER] == "local-fallback-failed" and r.json()["model"] == "small"


def test_serve_flags_refuse_routing_without_a_fallback():
    from lmforge.cli import command_parser
    from lmforge.recipes.serve import route_config

    parser = command_parser("serve")
    with pytest.raises(LmforgeError, match="--route-threshold"):
        route_config(parser.parse_args(["m", "--route-threshold", "-2"]))
    cfg = route_config(parser.parse_args(["m", "--fallback", "http://h:1", "--route-signal", "entropy"]))
    assert cfg.signal == "entropy" and cfg.threshold == 1.0
