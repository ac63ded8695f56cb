"""Synthetic tool-use traces for teaching a small model to call the calculator, and the held-out
measurement of what it learned.

A trace is a whole conversation in the OpenAI message format, as the agent loop and `lmforge
serve` write it: the user asks "What is A * B?" (3-digit numbers), the assistant calls
`calculator` with {"expression": "A * B"}, the tool answers the product, the assistant answers the
number. Rendered with the calculator's tool listing by the checkpoint's chat template, the
assistant's turns are the SFT loss mask. Train and held-out pairs never overlap (`split_pairs`).
"""

from __future__ import annotations

import random

from .tasks import last_number
from .tools import calculator_tool

QUESTIONS = ["What is {a} * {b}?", "Compute {a} times {b}.", "{a} x {b} = ?", "How much is {a} multiplied by {b}?"]


def split_pairs(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Disjoint (a, b) pairs of 3-digit numbers: training and held-out."""
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    pairs = []
    while len(pairs) < n_train + n_eval:
        p = (rng.randint(100, 999), rng.randint(100, 999))
        if p not in seen:
            seen.add(p)
            pairs.append(p)
    return pairs[:n_train], pairs[n_train:]


def question(a: int, b: int, k: int = 0) -> str:
    return QUESTIONS[k % len(QUESTIONS)].format(a=a, b=b)


def calculator_trace(a: int, b: int, k: int = 0) -> list[dict]:
    """One conversation: question -> calculator call -> result -> the number."""
    call_id = f"call_{k:08d}"
    product = str(a * b)
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": "calculator", "arguments": f'{{"expression": "{a} * {b}"}}'},
    }
    return [
        {"role": "user", "content": question(a, b, k)},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": product},
        {"role": "assistant", "content": f"{a} * {b} = {product}"},
    ]  # fmt: skip


def calculator_tools() -> list[dict]:
    return [calculator_tool().spec()]


def measure_tool_use(model, pairs: list[tuple[int, int]], with_tool: bool, phrasings: int = 1, config=None) -> dict:
    """Success rate of `model` (a ChatModel) on "What is A * B?" (the first `phrasings` of QUESTIONS)
    for the held-out pairs, through the agent loop with the calculator (with_tool) or with no tools at
    all; plus the share of runs whose calculator call computed the right product."""
    from .loop import AgentConfig, run_agent

    cfg = config or AgentConfig(max_steps=3, turn_tokens=48)
    tools = [calculator_tool()] if with_tool else []
    right = called = 0
    for k, (a, b) in enumerate(pairs):
        res = run_agent(model, question(a, b, k % phrasings), tools, cfg)
        value = last_number(res.answer or "")
        right += value is not None and value == a * b
        called += any(
            m["role"] == "tool" and m["content"] == str(a * b) for m in res.messages
        )  # the call computed the right product
    n = max(1, len(pairs))
    return {"n": len(pairs), "success_rate": right / n, "correct_calls": called / n, "with_tool": with_tool}


def _template_input(tokenizer, messages: list[dict], tools: list[dict]) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) as the chat template receives them from `lmforge serve`: the request is
    validated by the server's model and tools, calls and results rendered by serve/tools.py."""
    import json

    from lmforge.common import LmforgeError
    from lmforge.serve.protocol import APIError, ChatRequest, parse
    from lmforge.serve.tools import ToolSet, template_messages

    try:
        req = parse(ChatRequest, json.dumps({"model": "m", "messages": messages, "tools": tools}).encode())
    except APIError as e:
        raise LmforgeError(f"trace: {e.param + ': ' if e.param else ''}{e.message}") from None
    contents = [m.content for m in req.messages]
    return template_messages(req.messages, contents, ToolSet.of(req), tokenizer.chat_template)


def encode_trace(tokenizer, messages: list[dict], tools: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation for SFT, rendered exactly as `lmforge serve` and
    LocalChat render it: labels[t] is token t+1 where the assistant wrote it, else IGNORE."""
    from lmforge.train.objectives import IGNORE

    plain, listed = _template_input(tokenizer, messages, tools)
    ids, mask = tokenizer.render_chat(plain, **({"tools": listed} if listed else {}))
    return ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict]) -> list[int]:
    """The ids the model continues from for its next assistant turn (as the server would send them)."""
    plain, listed = _template_input(tokenizer, messages, tools)
    text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, **({"tools": listed} if listed else {}))
    return tokenizer.encode(text)


def call_reward(completion: str, a: int, b: int) -> float:
    """The verifiable reward of an assistant turn answering "What is A * B?" with tools: 1.0 when it
    is exactly one calculator call whose expression evaluates to A * B, 0.1 for a well-formed call
    that computes something else (a signal towards the format), 0.0 otherwise. Calls are parsed by
    the server's own parser (serve/tools.py), as the agent loop would receive them."""
    import json

    from lmforge.serve.protocol import Tool as ApiTool
    from lmforge.serve.tools import ToolSet, ToolStream

    from .tools import calculate

    stream = ToolStream(ToolSet([ApiTool.model_validate(t) for t in calculator_tools()], "auto"))
    shown, calls = stream.push(completion)
    rest, last, _ = stream.finish("stop")
    calls += last
    if len(calls) != 1 or (shown + rest).strip():
        return 0.0
    try:
        value = calculate(json.loads(calls[0]["arguments"]).get("expression", ""))
    except (ValueError, AttributeError, json.JSONDecodeError):
        return 0.1
    return 1.0 if value == a * b else 0.1


def answer_reward(completion: str, a: int, b: int) -> float:
    """The verifiable reward of the assistant's last turn (after the calculator's result): 1.0 when
    it is plain text whose last number is A * B, else 0.0."""
    if "<tool_call>" in completion:
        return 0.0
    return 1.0 if last_number(completion) == a * b else 0.0
