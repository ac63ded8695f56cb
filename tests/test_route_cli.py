"""`lmforge route train` (the learned router from a task) and `lmforge mtbench` (multi-turn judging):
the success paths on a tiny checkpoint and scripted models, and clear errors on bad input."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.serve.router_model import LearnedRouter, answer_key


class Scripted:
    """An lm whose answer to a prompt is `answer(prompt)`."""

    def __init__(self, answer):
        self.answer = answer

    def generate(self, prompts, max_new_tokens=64, stop=(), temperature=0.0, seed=None):
        return [self.answer(p) for p in prompts]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(model folder, task JSONL, {prompt: answer}, its accuracy): the tiny model's own three-token
    greedy answer is the reference for every other prompt (where it has a final answer to compare)."""
    from test_serve_utils import make_checkpoint

    from lmforge.eval.lm import LocalLM

    root = tmp_path_factory.mktemp("route")
    model_dir, _ = make_checkpoint(root)
    prompts = [f"Question {i}: say {w}" for i, w in enumerate(["a", "hello", "7", "cat", "x", "dog"] * 3)]
    texts = LocalLM.load(model_dir).generate(prompts, max_new_tokens=3, stop=["\n\n"])
    right = [i % 2 == 0 and answer_key(t) != "" for i, t in enumerate(texts)]
    assert sum(right) >= 6
    refs = {p: (t if ok else "certainly-not-that") for p, t, ok in zip(prompts, texts, right)}
    path = root / "task.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in refs.items()))
    return model_dir, path, refs, sum(right) / len(right)


def test_route_train_writes_a_router_with_heldout_figures(task, tmp_path, capsys, monkeypatch):
    model_dir, path, refs, accuracy = task
    out = tmp_path / "router.json"
    args = ["route", "train", "--model", str(model_dir), "--task", str(path), "--max-new-tokens", "3", "-o", str(out)]
    assert main([*args, "--samples", "2", "--ngram-dims", "16"]) == 0
    router = LearnedRouter.load(out)
    assert "agreement" in router.features and router.samples == 2 and router.ngram_dims == 16
    assert router.label == "local_right" and router.info["train"] + router.info["test"] == len(refs)
    assert router.info["local_accuracy"] == pytest.approx(accuracy)
    assert "held-out" in capsys.readouterr().out
    # a fallback that is always right: the label becomes "would escalating help", and the curve is printed
    import lmforge.eval.lm as lm_module

    monkeypatch.setattr(lm_module, "load_lm", lambda spec, device=None: Scripted(refs.get))
    assert main([*args, "--fallback", "http://big", "--features", "prompt,ngrams", "--ngram-dims", "8"]) == 0
    router = LearnedRouter.load(out)
    assert router.label == "no_gain" and router.info["fallback_accuracy"] == 1.0 and router.samples == 0
    assert len(router.info["heldout_curve"]) == 11 and "escalated" in capsys.readouterr().out


def test_route_train_bad_input(task, tmp_path, capsys):
    model_dir, path, _, _ = task
    base = ["route", "train", "--model", str(model_dir), "-o", str(tmp_path / "r.json")]
    assert main([*base, "--task", str(path), "--features", "answer,vibes"]) == 2
    assert "--features" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "answer": "a"}\n{"prompt": "q"}\n')
    assert main([*base, "--task", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    assert main([*base, "--task", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["route", "train", "--model", "http://x", "--task", str(path), "-o", "r.json"]) == 2
    assert "local model folder" in capsys.readouterr().err
    assert main([*base, "--task", str(path), "--test-fraction", "1.5"]) == 2
    assert main(["route"]) == 2  # no action


def test_mtbench_cli(tmp_path, capsys, monkeypatch):
    import lmforge.eval.lm as lm_module

    judge = Scripted(lambda p: "Rating: [[8]]" if "follow" in p else "Rating: [[4]]")
    model = Scripted(lambda p: "an answer")
    monkeypatch.setattr(lm_module, "load_lm", lambda spec, device=None: judge if spec == "J" else model)
    convs = tmp_path / "q.jsonl"
    convs.write_text(json.dumps({"turns": ["first?", "a follow-up?"]}) + "\n" + json.dumps({"turns": ["x?"]}) + "\n")
    assert main(["mtbench", "M", "--judge", "J", "--conversations", str(convs), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "o" / "mt_bench.json").read_text())["metrics"]
    assert saved["turn_1"] == 4.0 and saved["turn_2"] == 8.0 and saved["invalid"] == 0 and "| 4.00 | 8.00 |" in printed
    rows = [json.loads(x) for x in (tmp_path / "o" / "conversations.jsonl").read_text().splitlines()]
    assert rows[0]["ratings"] == [4, 8] and rows[1]["answers"] == ["an answer"]
    convs.write_text('{"turns": []}\n')
    assert main(["mtbench", "M", "--judge", "J", "--conversations", str(convs)]) == 2
    assert "q.jsonl:1" in capsys.readouterr().err
    assert main(["mtbench", "M"]) == 2  # --judge is required
