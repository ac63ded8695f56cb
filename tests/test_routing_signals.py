"""Edge-cloud routing's richer signals: self-consistency agreement (answer keys, sampled submissions,
the decision on scripted results) and the learned router over prompt features and hashed n-grams
(fit, held-out ranking, file round trip, refusals)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmforge.common import LmforgeError
from lmforge.infer.sampling import SamplingParams
from lmforge.serve.protocol import APIError
from lmforge.serve.router_model import (
    ANSWER_FEATURES,
    PROMPT_FEATURES,
    LearnedRouter,
    agreement,
    answer_key,
    ngram_counts,
    prompt_features,
    query,
)
from lmforge.serve.routing import RouteConfig, Router, cost_quality_curve
from lmforge.serve.runner import Submission


def test_answer_key_compares_final_answers():
    assert answer_key("4 * 2 = 8\n3 + 8 = 11\nA: 11\n") == answer_key("A: 11") == "11"
    assert answer_key("so it is 2.50") == answer_key("2.5") and answer_key("-3") == "-3"
    assert answer_key("  Paris. ") == answer_key("paris") != answer_key("Lyon")
    assert agreement("A: 11", ["x = 11", "A: 12", "11", "no"]) == 0.5
    assert agreement("anything", []) == 1.0


def test_prompt_features_and_ngrams():
    f = prompt_features("Q: 12 * 345\n")
    assert f["prompt_log_numbers"] == pytest.approx(np.log1p(2)) and f["prompt_log_digits"] == pytest.approx(
        np.log1p(5)
    )
    assert f["prompt_max_number"] == pytest.approx(np.log1p(345))
    a, b = ngram_counts("Q: 3 * 4", 64), ngram_counts("Q: 3 * 4", 64)
    assert np.array_equal(a, b) and a.shape == (64,) and a.sum() > 0  # crc32: the same in every process
    assert not np.array_equal(a, ngram_counts("Q: 3 + 4", 64))


def _scripted(n: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """Queries whose local answer is wrong exactly when the prompt multiplies (a rule only the
    prompt's n-grams can see: lengths and digit counts are the same either way)."""
    rng = random.Random(seed)
    qs, keep = [], []
    for _ in range(n):
        op = rng.choice("+-*")
        qs.append(query(f"Q: {rng.randint(1, 9)} {op} {rng.randint(1, 9)}\n"))
        keep.append(op != "*")
    return qs, np.array(keep)


def test_learned_router_reads_the_prompt(tmp_path):
    train, keep = _scripted(200, 0)
    test, test_keep = _scripted(100, 1)
    plain = LearnedRouter.fit(train, keep, PROMPT_FEATURES)  # lengths and counts: no signal
    ngram = LearnedRouter.fit(train, keep, PROMPT_FEATURES, ngram_dims=64)
    p = ngram.predict_many(test)
    assert p[test_keep].min() > p[~test_keep].max()  # held out: every multiplication ranked below
    assert abs(plain.predict_many(test)[test_keep].mean() - plain.predict_many(test)[~test_keep].mean()) < 0.1
    assert ngram.l2 in (0.01, 0.1, 1.0, 10.0, 100.0)  # chosen by cross-validation
    ngram.save(tmp_path / "r.json")
    again = LearnedRouter.load(tmp_path / "r.json")
    assert np.allclose(again.predict_many(test), p) and again.ngram_dims == 64
    # with a fallback that is always right, its curve beats random routing at every budget
    rows = cost_quality_curve(p, test_keep, np.ones(len(test_keep), bool))
    assert all(r["accuracy"] > r["random_accuracy"] for r in rows[1:-1])


def test_router_file_refusals(tmp_path):
    train, keep = _scripted(40, 0)
    with pytest.raises(LmforgeError, match="unknown router features"):
        LearnedRouter.fit(train, keep, ("vibes",))
    with pytest.raises(LmforgeError, match="samples"):
        LearnedRouter.fit([{**q, "agreement": 1.0} for q in train], keep, ("agreement",))
    with pytest.raises(LmforgeError, match="does not carry"):
        LearnedRouter.fit(train, keep, ANSWER_FEATURES)  # these queries have no answer entries
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(LmforgeError, match="list.json"):
        LearnedRouter.load(tmp_path / "list.json")
    r = LearnedRouter.fit(train, keep, PROMPT_FEATURES, ngram_dims=8)
    r.save(tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text().replace('"ngram_dims": 8', '"ngram_dims": 9')
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(LmforgeError, match="bad.json.*do not match"):
        LearnedRouter.load(tmp_path / "bad.json")


def test_agreement_probe_adds_seeded_samples_and_refuses_too_many():
    router = Router(RouteConfig("http://x", signal="agreement", samples=3, temperature=0.9))
    subs = [Submission([1, 2], SamplingParams(temperature=0.0), None, None), Submission([3], SamplingParams(seed=10))]
    probed = router.probe(subs, max_in_flight=8)
    assert len(probed) == 2 + 2 * 3 and [s.logprobs for s in probed[:2]] == [5, 5]
    samples = probed[2:]
    assert [s.prompt_ids for s in samples] == [[1, 2]] * 3 + [[3]] * 3
    assert all(s.params.temperature == 0.9 and s.logprobs is None for s in samples)
    assert [s.params.seed for s in samples] == [1, 2, 3, 11, 12, 13]  # the same request, the same decision
    with pytest.raises(APIError, match="at most 7"):
        router.probe(subs, max_in_flight=7)


def test_agreement_decides_on_scripted_results():
    router = Router(RouteConfig("http://x", signal="agreement", samples=4))
    assert router.cfg.threshold == 0.5 and router.temperature == 0.7

    def result(text):
        return {"text": text, "logprobs": [(0, -0.1, None)]}

    answers = [result("A: 7"), result("A: 9")]
    samples = [result(t) for t in ("A: 7", "7", "A: 7", "8")] + [result(t) for t in ("9", "A: 1", "A: 2", "A: 3")]
    qs = router.queries(answers + samples, 2, ["p1", "p2"])
    assert [q["agreement"] for q in qs] == [0.75, 0.25] and qs[0]["prompt"] == "p1"
    d = router.decide(qs)
    assert d.route == "fallback" and d.value == 0.25  # the second choice's answer is not trusted
    assert router.decide(qs[:1]).route == "local"


def test_agreement_config_errors():
    with pytest.raises(LmforgeError, match="--route-samples"):
        RouteConfig("http://x", signal="agreement", samples=0)
    with pytest.raises(LmforgeError, match="--route-temperature"):
        RouteConfig("http://x", signal="agreement", temperature=0.0)
    with pytest.raises(LmforgeError, match="agreement only"):
        RouteConfig("http://x", samples=3)  # mean_logprob does not sample: refused, not ignored


def test_serve_flags_for_agreement():
    from lmforge.cli import command_parser
    from lmforge.recipes.serve import route_config

    parser = command_parser("serve")
    args = ["m", "--fallback", "http://h:1", "--route-signal", "agreement", "--route-samples", "3"]
    cfg = route_config(parser.parse_args([*args, "--route-temperature", "1.2"]))
    assert (cfg.signal, cfg.samples, cfg.temperature, cfg.threshold) == ("agreement", 3, 1.2, 0.5)
    with pytest.raises(LmforgeError, match="--route-samples"):
        route_config(parser.parse_args(["m", "--route-samples", "3"]))  # no --fallback
    with pytest.raises(LmforgeError, match="agreement only"):
        route_config(parser.parse_args(["m", "--fallback", "http://h:1", "--route-samples", "3"]))
