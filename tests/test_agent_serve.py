"""`lmforge agent run` against a running `lmforge serve` (the tiny untrained model of
test_serve_tools: with tool_choice "required" its first step is still a valid call), the local
adapter speaking exactly the server's format, training traces rendered as the server renders them,
and the CLI's clear errors on bad input."""

from __future__ import annotations

import json

import jsonschema
import torch
from test_serve_tools import ckpt, server  # noqa: F401  (module fixtures: a tiny model and its server)

from lmforge.agent import AgentConfig, EndpointChat, LocalChat, run_agent
from lmforge.agent.tools import calculator_tool
from lmforge.agent.traces import calculator_tools, calculator_trace, encode_trace
from lmforge.checkpoint import load_model, load_tokenizer_if_any
from lmforge.cli import main as cli
from lmforge.serve.protocol import ChatRequest
from lmforge.serve.text import chat_prompt_ids

torch.set_num_threads(1)
CALC = calculator_tool().parameters


def _events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_agent_run_against_lmforge_serve(server, tmp_path, capsys):  # noqa: F811
    trace = tmp_path / "run.jsonl"
    argv = ["agent", "run", "What is 17 * 23?", "--endpoint", server.url, "--model", "m", "--tools", "calculator"]
    argv += ["--tool-choice", "required", "--max-steps", "2", "--turn-tokens", "120", "--trace", str(trace), "--json"]
    argv += ["--no-parallel-calls"]  # one call object: an untrained model's list could run past the budget
    assert cli(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] >= 1 and summary["tool_calls"] >= 1 and summary["stop_reason"] in ("answer", "max_steps")
    events = _events(trace)
    assert events[0]["type"] == "start" and events[0]["model"] == "m" and events[-1]["type"] == "end"
    first = next(e for e in events if e["type"] == "model")
    assert first["finish_reason"] == "tool_calls"
    for call in first["message"]["tool_calls"]:  # the untrained model's forced call is schema-valid
        assert call["function"]["name"] == "calculator" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), CALC)
    tool = next(e for e in events if e["type"] == "tool")
    assert tool["error"] == tool["result"].startswith("error:")  # garbage maths is the model's to read
    # agent eval: the same endpoint on built-in tasks, with the no-tools baseline
    out = tmp_path / "eval"
    argv = ["agent", "eval", "--endpoint", server.url, "--kinds", "arithmetic,file", "--n", "1", "--max-steps", "1"]
    assert cli([*argv, "--turn-tokens", "8", "--no-tools-baseline", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "m" and set(report["with_tools"]["kinds"]) == {"arithmetic", "file", "all"}
    assert report["no_tools"]["kinds"]["all"]["n"] == 2 and len(_events(out / "trace.jsonl")) >= 6
    assert "with_tools arithmetic" in capsys.readouterr().out


def test_local_adapter_speaks_the_servers_format(server, ckpt):  # noqa: F811
    remote = EndpointChat(server.url)  # "default": the first model listed
    tok = load_tokenizer_if_any(ckpt)
    local = LocalChat(load_model(ckpt).eval(), tok, "m")
    cfg = AgentConfig(max_steps=1, tool_choice="required", turn_tokens=120, parallel_tool_calls=False)
    runs = [run_agent(m, "What is 17 * 23?", [calculator_tool()], cfg) for m in (remote, local)]
    assert remote.name == "m"
    for r in runs:
        assert r.steps == 1 and r.tool_calls >= 1
        call = r.messages[1]["tool_calls"][0]
        jsonschema.validate(json.loads(call["function"]["arguments"]), CALC)
    assert runs[0].prompt_tokens == runs[1].prompt_tokens  # the same prompt, tools rendered alike
    # greedy and grammar-constrained: the same call from the server's engine and the local decoder
    assert runs[0].messages[1]["tool_calls"][0]["function"] == runs[1].messages[1]["tool_calls"][0]["function"]


def test_training_traces_render_like_the_server(ckpt):  # noqa: F811
    tok = load_tokenizer_if_any(ckpt)
    conv, tools = calculator_trace(123, 456, 1), calculator_tools()
    ids, labels = encode_trace(tok, conv, tools)
    req = ChatRequest.model_validate({"model": "m", "messages": conv[:1], "tools": tools})
    from lmforge.serve.tools import ToolSet

    prompt = chat_prompt_ids(tok, req.messages, tools=ToolSet.of(req))
    assert ids[: len(prompt)] == prompt  # the model learns from exactly what it is shown when serving
    learned = tok.decode([t for t in labels if t >= 0])
    assert '{"name": "calculator", "arguments": {"expression": "123 * 456"}}' in learned
    assert "56088" in learned and "Compute" not in learned  # the user's turn carries no loss


def test_cli_bad_inputs_are_clear_errors(tmp_path, capsys):
    (tmp_path / "tools.py").write_text("class Thing: ...\n\ndef f(x: Thing) -> int:\n    return 1\n")
    (tmp_path / "empty.py").write_text("X = 1\n")
    cases = [
        (["--tools", "files", "--files", str(tmp_path / "nope"), "--model", "x"], "no such folder"),
        (["--tools", "web", "--model", "x"], "unknown tool 'web'"),
        (["--tools", "rag", "--model", "x"], "needs an index"),
        (["--tools", "calculator", "--files", str(tmp_path)], "files tool is not in --tools"),
        (["--tools", "", "--user-tools", str(tmp_path / "tools.py"), "--model", "x"], "unsupported annotation Thing"),
        (["--tools", "", "--user-tools", str(tmp_path / "empty.py"), "--model", "x"], "defines no public function"),
        (["--tools", "", "--user-tools", str(tmp_path / "missing.py"), "--model", "x"], "no such file"),
        (["--model", str(tmp_path / "no-model")], "no such model folder"),
        ([], "give --model DIR"),
        (["--endpoint", "http://127.0.0.1:9"], "cannot reach the endpoint"),
        (["--max-steps", "0", "--endpoint", "http://127.0.0.1:9"], "cannot reach"),
    ]
    for extra, word in cases:
        assert cli(["agent", "run", "t", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert word in err and "Traceback" not in err, (extra, err)
    assert cli(["agent", "eval", "--model", "x", "--kinds", "poetry", "-o", str(tmp_path / "e")]) == 2
    assert "unknown agent task kind 'poetry'" in capsys.readouterr().err
