"""Safety probes on scripted models with known answers: attack success rate per template, over-refusal,
CrowS-Pairs style bias on a hand-built pair set, regard gaps, typos and the accuracy drop they cause."""

import json
import random

import pytest

from lmforge.common import LmforgeError
from lmforge.eval import safety_data as D
from lmforge.eval.safety import (
    add_typos,
    crows_pairs,
    is_refusal,
    over_refusal,
    parse_yes_no,
    read_pairs,
    red_team,
    regard_gap,
    robustness,
)


class Scripted:
    def __init__(self, answer=None, rolling=None, ll=None):
        self.answer, self.rolling, self.ll = answer, rolling, ll

    def generate(self, prompts, max_new_tokens=64, stop=(), temperature=0.0, seed=None):
        return [self.answer(p) for p in prompts]

    def loglikelihood_rolling(self, texts):
        return [self.rolling(t) for t in texts]

    def loglikelihood(self, requests):
        return [(self.ll(c, x), False) for c, x in requests]


def test_red_team_attack_success_rate_per_template():
    model = Scripted(answer=lambda p: "Sure, here is how." if "DAN" in p else "I'm sorry, I can't help with that.")
    judge = Scripted(answer=lambda p: "[[NO]]" if "I'm sorry" in p.split("[Response]")[1] else "[[YES]]")
    m, records = red_team(model, judge)
    n_t, n_g = len(D.ATTACK_TEMPLATES), len(D.HARMFUL_GOALS)
    assert m["attacks"] == n_t * n_g and len(records) == n_t * n_g
    assert m["attack_success_rate"] == pytest.approx(1 / n_t)
    assert m["asr/roleplay"] == 1.0 and m["asr/direct"] == 0.0
    assert m["refusal_phrase_rate"] == pytest.approx(1 - 1 / n_t) and m["invalid"] == 0
    m, _ = red_team(model, Scripted(answer=lambda p: "unsure"), goals=["x"], templates={"t": "{goal}"})
    assert m["invalid"] == 1 and m["attack_success_rate"] != m["attack_success_rate"]  # nan: nothing judged


def test_over_refusal():
    model = Scripted(answer=lambda p: "I cannot help with violence." if "kill" in p or "shoot" in p else "Sure.")
    m, _ = over_refusal(model)
    assert m["over_refusal_rate"] == pytest.approx(2 / len(D.BENIGN_PROMPTS))
    judged, _ = over_refusal(model, ["a", "b"], judge=Scripted(answer=lambda p: "[[YES]]"))
    assert judged["over_refusal_rate"] == 1.0
    assert is_refusal("I’m sorry, but no.") and not is_refusal("Use os.kill(pid, signal.SIGTERM).")
    assert parse_yes_no("Verdict: [[yes]]") is True and parse_yes_no("No.") is False and parse_yes_no("?") is None


def test_crows_pairs_on_a_hand_built_set():
    pairs = [
        {"more": "aa", "less": "aaaa", "bias_type": "x"},  # the stereotype is shorter: preferred
        {"more": "bbb", "less": "b", "bias_type": "x"},
        {"more": "c", "less": "cc", "bias_type": "y"},
        {"more": "dd", "less": "d", "bias_type": "y"},
    ]
    m, records = crows_pairs(Scripted(rolling=lambda t: -float(len(t))), pairs)  # shorter = more likely
    assert m["stereotype_preference"] == 0.5 and m["stereotype_preference/x"] == 0.5
    assert [r["prefers_stereotype"] for r in records] == [True, False, True, False]
    assert records[0]["logp_more"] == -2.0 and records[0]["logp_less"] == -4.0


def test_regard_gap_finds_the_group_the_model_disfavours():
    def ll(context, word):
        bad = "poor" in context
        return (-5.0 if word in D.POSITIVE_WORDS else -1.0) if bad else (-1.0 if word in D.POSITIVE_WORDS else -5.0)

    m, _ = regard_gap(Scripted(ll=ll))
    assert m["lowest_regard_group"] == "poor person"
    assert m["regard/poor person"] == pytest.approx(-4.0) and m["regard/man"] == pytest.approx(4.0)
    assert m["regard_gap"] == pytest.approx(8.0)


def test_typos_and_robustness_drop():
    rng = random.Random(0)
    text = "The capital of France is"
    assert add_typos(text, 0.0, rng) == text
    noisy = add_typos(text, 1.0, random.Random(1))
    assert noisy != text and noisy.split()[1] != "capital" and add_typos(text, 1.0, random.Random(1)) == noisy

    def ll(context, choice):  # knows the answer only when the question is spelled right
        ex = next((e for e in D.ROBUSTNESS_MC if e["context"] == context), None)
        if ex is not None:
            return 0.0 if choice == ex["choices"][ex["gold"]] else -1.0
        return -1.0 + 0.01 * len(choice)  # a typo'd question: the longest choice, right or not

    m, records = robustness(Scripted(ll=ll), rate=1.0, seed=0)
    assert m["accuracy_clean"] == 1.0 and m["accuracy_perturbed"] < 1.0
    assert m["accuracy_drop"] == pytest.approx(1.0 - m["accuracy_perturbed"]) and len(records[0]["perturbed"]) == 3
    with pytest.raises(LmforgeError, match="typo rate"):
        robustness(Scripted(ll=ll), rate=2.0)


def test_user_pair_file(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"sent_more": "a", "sent_less": "b", "bias_type": "age"}) + "\n" + json.dumps({"more": 1}))
    with pytest.raises(LmforgeError, match="pairs.jsonl:2"):
        read_pairs(p)
    p.write_text(json.dumps({"sent_more": "a", "sent_less": "b", "bias_type": "age"}))
    assert read_pairs(p) == [{"more": "a", "less": "b", "bias_type": "age"}]


def test_safety_cli_on_a_tiny_model(tmp_path, capsys):
    from test_serve_utils import make_checkpoint

    from lmforge.cli import main

    model_dir, _ = make_checkpoint(tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"sent_more": "The dog barked.", "sent_less": "The cat barked."}) + "\n")
    out = tmp_path / "safety"
    argv = ["safety", str(model_dir), "--probe", "bias", "--probe", "robustness", "--pairs", str(pairs)]
    assert main([*argv, "--out", str(out), "--typo-rate", "0.5"]) == 0
    report = json.loads((out / "safety.json").read_text())
    assert set(report["metrics"]) == {"bias", "robustness"} and report["metrics"]["bias"]["pairs"] == 1
    assert report["metrics"]["robustness"]["typo_rate"] == 0.5 and "bias:" in capsys.readouterr().out
    assert main(["safety", str(model_dir), "--probe", "red_team", "--out", str(out)]) == 2  # no judge
    assert main(["safety", str(model_dir), "--probe", "bias", "--mc", str(pairs), "--out", str(out)]) == 2
