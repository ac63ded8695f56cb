"""Tool calling through the official openai client: tool_choice "required" and a named function give
valid arguments from an untrained model at temperature 1.0 (grammar-constrained), streamed as
OpenAI's tool_calls deltas; a call -> tool result -> answer round trip through the chat template;
Hermes/Qwen-style and Llama-3-style templates render tools, calls and results; calls are parsed
out of both output formats, streamed in any split as whole."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch
from test_serve_utils import CORPUS, ServerThread

from lmforge.checkpoint import load_tokenizer_if_any, save_model
from lmforge.model import build_model
from lmforge.serve import ServeConfig
from lmforge.serve.protocol import ChatRequest, parse
from lmforge.serve.text import chat_prompt_ids
from lmforge.serve.tools import ToolSet, ToolStream
from lmforge.tokenizer import train_tokenizer
from lmforge.tokenizer.chat import TOOLS_POSTAMBLE, TOOLS_PREAMBLE, render

torch.set_num_threads(1)
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99}, "b": {"$ref": "#/$defs/n"}},
    "required": ["a", "b"],
    "additionalProperties": False,
    "$defs": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD, "strict": True}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny model with room for the tools' system prompt (2,048 positions; a tokenizer that knows it)."""
    tok = train_tokenizer(CORPUS + [TOOLS_PREAMBLE + TOOLS_POSTAMBLE] * 20, vocab_size=600)
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=tok.vocab_size, max_position_embeddings=2048, initializer_range=0.2)
    return save_model(model.eval(), tmp_path_factory.mktemp("tools") / "tiny-tools", tokenizer=tok)


@pytest.fixture(scope="module")
def server(ckpt):
    with ServerThread(ServeConfig(model=str(ckpt), served_model_name="m", engine_process=False, max_seqs=8)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _check_calls(calls, names) -> None:
    assert calls
    for c in calls:
        assert c.id.startswith("call_") and c.type == "function" and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize(
    "choice,parallel",
    [("required", True), ("required", False), ({"type": "function", "function": {"name": "add"}}, True)],
)
def test_forced_calls_have_valid_arguments(client, choice, parallel):
    names = ["add"] if isinstance(choice, dict) else ["get_weather", "add"]
    r = client.chat.completions.create(
        model="m",
        messages=MSGS,
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        temperature=1.0,
        n=3,
        seed=7,
        max_tokens=200,
    )
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None, c.message
        _check_calls(c.message.tool_calls, names)
        if not parallel or isinstance(choice, dict):
            assert len(c.message.tool_calls) == 1


def test_forced_calls_stream_as_tool_call_deltas(client):
    stream = client.chat.completions.create(
        model="m",
        messages=MSGS,
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        seed=3,
        max_tokens=500,
        stream=True,
    )
    calls, reasons, content = {}, [], ""
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                if d.index not in calls:  # a call's first delta: its id, type and name
                    assert d.id.startswith("call_") and d.type == "function" and d.function.name
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and not d.function.name
                calls[d.index]["arguments"] += d.function.arguments or ""
            reasons += [c.finish_reason] if c.finish_reason else []
    assert reasons == ["tool_calls"] and content == "" and sorted(calls) == list(range(len(calls)))
    for c in calls.values():
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])


def test_round_trip_call_result_answer(client, server, ckpt):
    first = client.chat.completions.create(
        model="m", messages=MSGS, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    message = first.choices[0].message
    call = message.tool_calls[0]
    # the response message goes back as it came (openai's model object), then the tool's result
    history = [*MSGS, message, {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    answer = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=5, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop") and answer.choices[0].message.tool_calls is None
    # the prompt the model saw: the template's own rendering of tools, the call and its result
    tok = load_tokenizer_if_any(ckpt)
    args = json.loads(call.function.arguments)
    plain = [
        *MSGS,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": args}}],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    text = tok.apply_chat_template(plain, add_generation_prompt=True, tools=TOOLS)
    assert answer.usage.prompt_tokens == len(tok.encode(text))
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(args)}}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text and '"name": "add"' in text
    # tool_choice "none": no tools in the prompt
    none = client.chat.completions.create(model="m", messages=MSGS, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert none.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(MSGS, add_generation_prompt=True)))


def test_tool_errors_are_400s(client):
    bad = [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "nope"),
        (
            dict(
                tools=[
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}
                ]
            ),
            "parameters",
        ),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]), "object"),
        (dict(tools=TOOLS + TOOLS[:1]), "two tools"),
        (dict(messages=[*MSGS, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]), "call_x"),
        (dict(messages=[*MSGS, {"role": "assistant", "content": None}]), "content"),
        (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    ]
    for kw, word in bad:
        with pytest.raises(openai.BadRequestError, match=word):
            client.chat.completions.create(**{"model": "m", "messages": MSGS, "max_tokens": 2, **kw})


# ----------------------------------------------------------------------------- templates

QWEN_STYLE = (  # the shape of Qwen2.5's template: tools in the system turn, results as user turns
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and tools %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{% for tc in message.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}'
    "<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
LLAMA3_STYLE = (  # the shape of Llama 3.1's JSON tool calling: tools in the user turn, results as ipython
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message.role == 'user' and tools and loop.last %}<|start_header_id|>user<|end_header_id|>\n\n"
    "Given the following functions, respond with a JSON for a function call.\n\n"
    "{% for t in tools %}{{ t | tojson }}\n\n{% endfor %}{{ message.content }}<|eot_id|>"
    "{%- elif message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    '{% set tc = message.tool_calls[0].function %}{"name": "{{ tc.name }}", "parameters": {{ tc.arguments | tojson }}}<|eot_id|>'
    "{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ message.content | tojson }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ message.content }}<|eot_id|>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)
NO_TOOLS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HISTORY = [
    *MSGS,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "user", "content": "And tomorrow?"},
]


@pytest.mark.parametrize("template", ["builtin", QWEN_STYLE, LLAMA3_STYLE, NO_TOOLS])
def test_templates_render_tools_calls_and_results(ckpt, template):
    tok = load_tokenizer_if_any(ckpt)
    if template != "builtin":
        tok.chat_template = template
    req = parse(ChatRequest, json.dumps({"model": "m", "messages": HISTORY, "tools": TOOLS}).encode())
    text = tok.decode(chat_prompt_ids(tok, req.messages, tools=ToolSet.of(req)), skip_special_tokens=False)
    assert '"name": "get_weather"' in text and '"description": "Weather"' in text  # the tools listed
    assert '"city": "Paris", "days": 2' in text and "sunny" in text and "And tomorrow?" in text
    if template == LLAMA3_STYLE:
        assert '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}' in text
    else:
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>' in text
        assert "<tool_response>\nsunny\n</tool_response>" in text
    if template == NO_TOOLS:  # folded into the messages, in the built-in template's words
        assert TOOLS_PREAMBLE in text and text.index("Be brief.") < text.index(TOOLS_PREAMBLE)


OLD_CHATML = (  # the built-in template before it had tools: conversations without tools render the same
    r"{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' }}"
    r"{% if message['content'] is string %}{{ message['content'] }}"
    r"{% elif message['content'] %}{% for part in message['content'] %}"
    r"{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    r"{% endfor %}{% endif %}"
    r"{{ '<|im_end|>\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_builtin_template_unchanged_without_tools():
    from lmforge.tokenizer.chat import CHATML_TEMPLATE

    convs = [
        MSGS,
        [*MSGS, {"role": "assistant", "content": "Fine."}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}],
    ]
    for conv in convs:
        for gen in (False, True):
            assert render(CHATML_TEMPLATE, conv, gen) == render(OLD_CHATML, conv, gen)


# ----------------------------------------------------------------------------- parsing the output


def _toolset(**kw) -> ToolSet:
    return ToolSet.of(parse(ChatRequest, json.dumps({"model": "m", "messages": MSGS, "tools": TOOLS, **kw}).encode()))


OUTPUTS = [  # (output, content, [(name, arguments)])
    (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        "Let me look.\n",
        [("get_weather", {"city": "Rome", "days": 1}), ("add", {"a": 1, "b": 2})],
    ),
    (
        '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 3}}',
        "",
        [("get_weather", {"city": "Oslo", "days": 3})],
    ),
    ('<|python_tag|>{"name": "add", "arguments": {"a": 5, "b": 0}}', "", [("add", {"a": 5, "b": 0})]),
    (
        '[{"name": "add", "arguments": {"a": 1, "b": 1}}, {"name": "add", "arguments": {"a": 2, "b": 2}}]',
        "",
        [("add", {"a": 1, "b": 1}), ("add", {"a": 2, "b": 2})],
    ),
    ('<tool_call>\n{"name": "add", "arguments": {"a": "x", "b": 1}}\n</tool_call>', None, []),  # strict: invalid
    ('<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>', None, []),  # not a declared tool
    ('{"answer": 42}', None, []),  # JSON that is no call
    ("Plain text with a < sign and <tool", None, []),
]


@pytest.mark.parametrize("output,content,calls", OUTPUTS)
def test_calls_parsed_from_the_output_in_any_split(output, content, calls):
    for step in (1, 2, 7, len(output)):
        stream, shown, got = ToolStream(_toolset()), "", []
        for i in range(0, len(output), step):
            text, new = stream.push(output[i : i + step])
            shown, got = shown + text, got + new
        text, new, reason = stream.finish("stop")
        shown, got = shown + text, got + new
        assert [(c["name"], json.loads(c["arguments"])) for c in got] == calls
        assert shown == (output if content is None else content)
        assert reason == ("tool_calls" if calls else "stop")
    stream = ToolStream(_toolset())  # a cut-off output is never a call
    stream.push(output)
    assert stream.finish("length")[2] == "length"


def test_parallel_false_returns_one_call_and_the_rest_as_text():
    stream = ToolStream(_toolset(parallel_tool_calls=False))
    text, calls = stream.push(OUTPUTS[0][0])
    rest, last, reason = stream.finish("stop")
    assert len(calls + last) == 1 and '"name": "add"' in text + rest and reason == "tool_calls"
