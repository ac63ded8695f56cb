"""Teaching a model to call the calculator: the verifiable reward, the shared-prefix forward the SFT
and GRPO steps use (equal to the plain forward, gradients included), and `lmforge agent train`
end to end on a toy budget (SFT then GRPO, results and model written, held-out pairs unseen)."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.agent.traces import answer_reward, call_reward, split_pairs
from lmforge.checkpoint import load_model
from lmforge.cli import main as cli
from lmforge.model import build_model
from lmforge.recipes.agent import _common_prefix, _prefixed_logits

torch.set_num_threads(1)


def _call(expr: str) -> str:
    return f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{expr}"}}}}\n</tool_call>'


def test_call_reward_is_verifiable():
    assert call_reward(_call("123 * 456"), 123, 456) == 1.0
    assert call_reward(_call("456*123"), 123, 456) == 1.0  # any expression with the right value
    assert call_reward(_call("123 * 457"), 123, 456) == 0.1
    assert call_reward(_call("12x"), 123, 456) == 0.1
    assert call_reward("56088", 123, 456) == 0.0  # answering without the tool earns nothing
    assert call_reward(_call("123 * 456") + _call("1"), 123, 456) == 0.0
    assert call_reward("so: " + _call("123 * 456"), 123, 456) == 0.0
    assert call_reward('<tool_call>\n{"name": "python", "arguments": {}}\n</tool_call>', 123, 456) == 0.0
    assert answer_reward("123 * 456 = 56088", 123, 456) == 1.0 and answer_reward("56,088.", 123, 456) == 1.0
    assert answer_reward("123 * 456 = 56087", 123, 456) == 0.0 and answer_reward("56088 * 1 = 5", 123, 456) == 0.0
    assert answer_reward(_call("56088"), 123, 456) == 0.0


def test_split_pairs_are_disjoint_three_digit():
    train, held = split_pairs(500, 100, 3)
    assert len(train) == 500 and len(held) == 100 and not set(train) & set(held)
    assert all(100 <= x <= 999 for p in train + held for x in p)


def test_shared_prefix_forward_equals_the_plain_forward():
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=64)
    rows = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 12, 13], [5, 6, 7, 8, 14, 15, 16, 17]]
    P = _common_prefix(rows)
    assert P == 4 and _common_prefix([[1, 2], [1, 2]]) == 1
    ids = torch.tensor([r + [0] * (8 - len(r)) for r in rows])
    full = model(ids)
    part = _prefixed_logits(model, rows[0][:P], ids[:, P:])
    for i, r in enumerate(rows):
        torch.testing.assert_close(part[i, : len(r) - P], full[i, P : len(r)], atol=1e-5, rtol=1e-5)
    g_full = torch.autograd.grad(full[:, P:].logsumexp(-1)[ids[:, P:] > 0].sum(), list(model.parameters()))
    g_part = torch.autograd.grad(part.logsumexp(-1)[ids[:, P:] > 0].sum(), list(model.parameters()))
    for a, b in zip(g_full, g_part):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # 30-45 s: a tokenizer, SFT, GRPO rollouts and the held-out runs, twice
def test_agent_train_end_to_end_on_a_toy_budget(tmp_path, capsys):
    out = tmp_path / "calc"
    argv = ["agent", "train", "-o", str(out), "--steps", "2", "--train-size", "16", "--eval-size", "1"]
    argv += ["--batch-size", "4", "--hidden-size", "32", "--layers", "1", "--grpo-steps", "1", "--grpo-prompts", "1"]
    assert cli([*argv, "--group-size", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["sft"]["steps"] == 2 and res["grpo"]["steps"] == 1 and res["held_out"] == 1
    for key in ("with_tool", "without_tool"):
        assert 0.0 <= res[key]["success_rate"] <= 1.0 and res[key]["n"] == 1
    assert res["without_tool"]["correct_calls"] == 0.0  # no tool, no call
    model = load_model(out / "final")
    assert model.config.hidden_size == 32
    assert json.loads(capsys.readouterr().out)["model"] == str(out / "final")
    # continuing from it: GRPO only
    assert cli(["agent", "train", "-o", str(tmp_path / "more"), "--init", str(out / "final"), "--steps", "0",
                "--grpo-steps", "1", "--grpo-prompts", "1", "--group-size", "2", "--eval-size", "1"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "more" / "results.json").read_text())["sft"] is None


def test_agent_train_refuses_bad_settings(tmp_path, capsys):
    assert cli(["agent", "train", "-o", str(tmp_path / "x"), "--steps", "0"]) == 2  # nothing to train
    assert cli(["agent", "train", "-o", str(tmp_path / "x"), "--init", str(tmp_path), "--steps", "0"]) == 2
    assert cli(["agent", "train", "-o", str(tmp_path / "x"), "--phrasings", "5"]) == 2
    assert cli(["agent", "train", "-o", str(tmp_path / "x"), "--group-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps must be >= 1" in err and "not a model folder with a tokenizer" in err
    assert "--phrasings must be 1-4" in err and "--group-size must be >= 1" in err
    assert not (tmp_path / "x").exists()  # refused before anything is written
