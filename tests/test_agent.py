"""The agent loop with a scripted model (deterministic tool calls): results fed back as tool
messages, tool errors and bad arguments returned to the model, step/token/time limits, JSONL traces;
the patterns (plan-then-execute, reflection, debate) as loops over it."""

from __future__ import annotations

import json
import time

import pytest

from lmforge.agent import AgentConfig, Reply, Tool, Trace, run_agent
from lmforge.agent.patterns import debate, parse_plan, plan_then_execute, reflect
from lmforge.agent.tasks import arithmetic_tasks, extract_code, last_number
from lmforge.agent.tools import calculator_tool
from lmforge.common import LmforgeError


def call(name: str, arguments, id: str = "c1") -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": id, "type": "function", "function": {"name": name, "arguments": args}}


class Scripted:
    """Replies from a list, in order; a callable entry gets the messages. Records what it was sent."""

    def __init__(self, replies, tokens=(10, 5), name="scripted"):
        self.replies, self.tokens, self.name = list(replies), tokens, name
        self.seen: list[list[dict]] = []
        self.asks: list[dict] = []

    def chat(self, messages, tools=None, tool_choice=None, max_tokens=256, temperature=0.0, parallel_tool_calls=True):
        self.seen.append([dict(m) for m in messages])
        self.asks.append({"tools": tools, "tool_choice": tool_choice, "max_tokens": max_tokens})
        r = self.replies.pop(0)
        r = r(messages) if callable(r) else r
        if isinstance(r, Exception):
            raise r
        msg = {"role": "assistant", "content": r} if isinstance(r, str) else {"role": "assistant", "tool_calls": r}
        return Reply(msg, "stop", *self.tokens)


def boom(x: int) -> int:
    """Always fails."""
    raise RuntimeError(f"exploded on {x}")


def test_calls_are_run_and_fed_back_then_the_answer_stops(tmp_path):
    model = Scripted([[call("calculator", {"expression": "123 * 456"})], "56088"])
    res = run_agent(model, "What is 123*456?", [calculator_tool()], trace=tmp_path / "t.jsonl")
    assert (res.answer, res.stop_reason, res.steps, res.tool_calls, res.tool_errors) == ("56088", "answer", 2, 1, 0)
    assert res.tokens == 30
    tool_msg = model.seen[1][-1]
    assert tool_msg == {"role": "tool", "tool_call_id": "c1", "content": "56088"}
    assert model.seen[1][-2]["tool_calls"][0]["function"]["name"] == "calculator"
    assert model.asks[0]["tools"][0]["function"]["parameters"]["required"] == ["expression"]
    events = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events] == ["start", "model", "tool", "model", "end"]
    assert events[2]["result"] == "56088" and events[2]["error"] is False
    assert events[-1]["answer"] == "56088" and events[-1]["tokens"] == 30
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary files


def test_tool_errors_and_bad_arguments_go_back_to_the_model():
    tools = [calculator_tool(), Tool.from_function(boom)]
    model = Scripted(
        [
            [call("boom", {"x": 3}, "a")],
            [call("calculator", "{not json", "b")],
            [call("calculator", {"expr": "1+1"}, "c")],
            [call("boom", {"x": "three"}, "d")],
            [call("nope", {}, "e")],
            [call("calculator", {"expression": "__import__('os')"}, "f")],
            "gave up",
        ]
    )
    res = run_agent(model, "t", tools, AgentConfig(max_steps=10))
    assert res.stop_reason == "answer" and res.tool_errors == 6 and res.tool_calls == 6
    results = [m["content"] for m in res.messages if m["role"] == "tool"]
    assert results[0] == "error: RuntimeError: exploded on 3"
    assert results[1].startswith("error: bad arguments for calculator: the arguments are not valid JSON")
    assert "'expression' is a required property" in results[2]
    assert "x: 'three' is not of type 'integer'" in results[3]
    assert results[4].startswith("error: there is no tool named 'nope'")
    assert "not allowed in the calculator" in results[5]


def test_step_token_and_time_limits(tmp_path):
    looping = [[call("calculator", {"expression": "1+1"})]] * 20
    res = run_agent(Scripted(looping), "t", [calculator_tool()], AgentConfig(max_steps=3))
    assert (res.stop_reason, res.steps, res.answer) == ("max_steps", 3, None)
    model = Scripted(looping, tokens=(40, 10))
    res = run_agent(model, "t", [calculator_tool()], AgentConfig(max_tokens=120, turn_tokens=64))
    assert (res.stop_reason, res.steps, res.tokens) == ("max_tokens", 3, 150)
    assert [a["max_tokens"] for a in model.asks] == [64, 64, 20]  # never asks past what is left

    def slow(messages):
        time.sleep(0.3)
        return [call("calculator", {"expression": "2"})]

    res = run_agent(Scripted([slow] * 20), "t", [calculator_tool()], AgentConfig(max_seconds=0.5, max_steps=20))
    assert res.stop_reason == "max_seconds" and res.steps == 2
    with pytest.raises(LmforgeError, match="max_steps"):
        AgentConfig(max_steps=0)


def test_model_failure_ends_the_run_with_the_trace_kept(tmp_path):
    model = Scripted([[call("calculator", {"expression": "2*3"})], LmforgeError("endpoint down")])
    res = run_agent(model, "t", [calculator_tool()], trace=tmp_path / "t.jsonl")
    assert res.stop_reason == "model_error" and res.error == "endpoint down" and res.steps == 1
    types = [json.loads(line)["type"] for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert types == ["start", "model", "tool", "error", "end"]


def test_tool_choice_applies_to_the_first_step_only():
    model = Scripted([[call("calculator", {"expression": "2"})], "2"])
    run_agent(model, "t", [calculator_tool()], AgentConfig(tool_choice="required"))
    assert [a["tool_choice"] for a in model.asks] == ["required", "auto"]
    model = Scripted(["hi"])
    run_agent(model, "t", [])
    assert model.asks[0]["tools"] is None


def test_plan_then_execute():
    model = Scripted(
        [
            "1. multiply 12 by 3\n2. add 4",
            [call("calculator", {"expression": "12*3"})],
            "36",
            [call("calculator", {"expression": "36+4"})],
            "40",
            "The answer is 40.",
        ]
    )
    trace = Trace()
    out = plan_then_execute(model, "12*3+4?", [calculator_tool()], trace=trace)
    assert out.plan == ["multiply 12 by 3", "add 4"] and out.answer == "The answer is 40."
    assert out.steps == 6 and len(out.runs) == 4
    assert "Step 1 result: 36" in model.seen[3][-1]["content"]
    assert {e["agent"] for e in trace.events} == {"planner", "executor-1", "executor-2", "writer"}
    assert parse_plan("just do it", 3) == ["just do it"] and parse_plan("- a\n- b\n- c\n- d", 3) == ["a", "b", "c"]


def test_reflection_retries_with_the_critique():
    model = Scripted(["41", "42"])
    out = reflect(model, "6*7?", [], check=lambda a: None if a == "42" else f"{a} is wrong", rounds=3)
    assert (out.answer, out.rounds, out.critiques) == ("42", 2, ["41 is wrong"])
    assert "It was judged wrong: 41 is wrong" in model.seen[1][-1]["content"]
    # self-critique: the model judges its own answer
    model = Scripted(["41", "No, 6*7 is 42.", "42", "AGREE"])
    out = reflect(model, "6*7?", [], rounds=3)
    assert (out.answer, out.rounds) == ("42", 2)


def test_debate_until_the_critic_agrees():
    solver = Scripted(["40", "42"])
    critic = Scripted([[call("calculator", {"expression": "6*7"})], "Wrong: it is 42", "AGREE."], name="critic")
    out = debate(solver, "6*7?", [calculator_tool()], critic=critic, rounds=3)
    assert (out.answer, out.rounds, out.critiques) == ("42", 2, ["Wrong: it is 42"])
    assert critic.seen[0][0]["role"] == "system" and "40" in critic.seen[0][-1]["content"]


def test_task_checks():
    t = arithmetic_tasks(3, 0)
    a, b = (int(x) for x in t[0].prompt.removeprefix("What is ").rstrip("?").split(" * "))
    assert t[0].check(f"It is {a * b:,}.") and not t[0].check(f"{a * b + 1}") and not t[0].check("no idea")
    assert last_number("x 1,234.5 y") == 1234.5
    assert extract_code("see\n```python\ndef f():\n    return 1\n```\n") == "def f():\n    return 1\n"


SOLUTIONS = {
    "add_digits": "def add_digits(n):\n    return sum(int(c) for c in str(n))\n",
    "is_palindrome": "def is_palindrome(s):\n    return s.lower() == s.lower()[::-1]\n",
    "fizz": "def fizz(n):\n    return 'FizzBuzz' if n % 15 == 0 else 'Fizz' if n % 3 == 0 else 'Buzz' if n % 5 == 0 else str(n)\n",
    "second_largest": "def second_largest(xs):\n    return sorted(set(xs))[-2]\n",
    "count_vowels": "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())\n",
    "run_length": "def run_length(s):\n    import itertools\n    return [(k, len(list(g))) for k, g in itertools.groupby(s)]\n",
}


def oracle(messages):
    """A policy that uses the tools as intended: the built-in tasks must be solvable through them."""
    import re

    task, last = messages[0]["content"], messages[-1]
    if last["role"] == "user":
        if "working folder" in task:
            return [call("list_files", {})]
        if "document index" in task:
            return [call("rag_search", {"query": re.search(r"item (\S+)\?", task).group(1)})]
        if task.startswith("What is "):
            return [call("calculator", {"expression": task.removeprefix("What is ").rstrip("?")})]
        name = re.search(r"function (\w+)", task).group(1)
        return [call("python", {"code": SOLUTIONS[name] + "print('ok')"})]
    results = [m["content"] for m in messages if m["role"] == "tool"]
    if "list_files" in json.dumps(messages[-2].get("tool_calls")):
        files = last["content"].splitlines()
        return [call("read_file", {"path": f}, f"r{i}") for i, f in enumerate(files)]
    item = re.search(r"item (\S+)\?", task)
    if item:
        code = re.search(rf"item {re.escape(item.group(1))} is (\w+)", "\n".join(results))
        return f"The code is {code.group(1) if code else 'unknown'}."
    if task.startswith("What is "):
        return f"The answer is {results[-1]}."
    name = re.search(r"function (\w+)", task).group(1)
    return f"```python\n{SOLUTIONS[name]}```"


def test_builtin_tasks_are_solvable_through_the_tools(tmp_path):
    from lmforge.agent.tasks import builtin_tasks, evaluate

    tasks = builtin_tasks(["arithmetic", "file", "rag", "code"], 3, 0, tmp_path)
    report = evaluate(Scripted([oracle] * 100), tasks, tmp_path, trace=tmp_path / "t.jsonl")
    kinds = report["kinds"]
    assert {k: v["success_rate"] for k, v in kinds.items()} == {
        "arithmetic": 1.0,
        "file": 1.0,
        "rag": 1.0,
        "code": 1.0,
        "all": 1.0,
    }
    assert kinds["arithmetic"]["steps_per_success"] == 2 and kinds["file"]["steps_per_success"] == 3
    assert kinds["all"]["tokens_per_success"] == 15 * (2 * 3 + 3 * 3 + 2 * 3 + 2 * 3) / 12
    ids = {json.loads(line)["agent"] for line in (tmp_path / "t.jsonl").read_text().splitlines()}
    assert len(ids) == 12
    # the same tasks with no tools: a guessing model fails them all
    guess = evaluate(Scripted(["I think 42."] * 20), tasks, tmp_path, with_tools=False)
    assert guess["kinds"]["all"]["success_rate"] == 0.0 and guess["kinds"]["all"]["steps_per_success"] is None
    # a wrong answer fails the check
    wrong = evaluate(Scripted([[call("calculator", {"expression": "1"})], "1"]), tasks[:1], tmp_path)
    assert wrong["kinds"]["arithmetic"]["success_rate"] == 0.0
