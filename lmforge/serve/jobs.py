"""From a validated request to a `Job`: the prompts as token ids (text, token ids, or a chat
rendered by the checkpoint's template), the context-length checks, and each choice's
`SamplingParams` (request fields, else the checkpoint's generation_config.json defaults; the
grammar of response_format or of a forced tool call).
"""

from __future__ import annotations

import json

from lmforge.common import LmforgeError
from lmforge.infer.grammar import GrammarSpec, check_grammar
from lmforge.infer.sampling import SamplingParams

from .protocol import APIError, ChatRequest, CompletionRequest
from .responses import Job
from .runner import Submission
from .text import chat_prompt_ids
from .tools import ToolSet
from .vision import VisionSubmission, has_images


def _check_length(state, ids: list[int], max_tokens: int | None, param: str, default: int | None = None) -> int:
    """The number of tokens to generate; 400 when the prompt or prompt + max_tokens exceed the context.
    `default` (when max_tokens is None) is cut to the context rather than refused: nobody asked for it."""
    limit = state.max_model_len
    if not ids:
        raise APIError(400, "the prompt is empty", param=param)
    if len(ids) >= limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)}",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return limit - len(ids) if default is None else min(default, limit - len(ids))
    if len(ids) + max_tokens > limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens; you asked for "
            f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def _pick(value, default, fallback):
    """The request's value, else the checkpoint's generation_config.json default, else OpenAI's."""
    return value if value is not None else default if default is not None else fallback


def _grammar(req: CompletionRequest | ChatRequest, tools: ToolSet | None) -> GrammarSpec | None:
    """The grammar the output must match: a forced tool call's, or response_format's. A schema the
    grammar library cannot use is a 400 here, before anything runs."""
    fmt = req.response_format
    if tools is not None:
        spec, param = tools.grammar(), "tools"
    elif fmt is None or fmt.type == "text":
        return None
    elif fmt.type == "json_object" or fmt.json_schema.schema_ is None:
        spec, param = GrammarSpec("json"), "response_format"
    else:
        spec, param = GrammarSpec("json_schema", json.dumps(fmt.json_schema.schema_)), "response_format"
    if spec is not None:
        try:
            check_grammar(spec)
        except LmforgeError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None
    return spec


def _sampling(state, req, max_tokens: int, k: int, stop_ids: list[int], grammar: GrammarSpec | None) -> SamplingParams:
    d = state.defaults
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=_pick(req.temperature, d.temperature, 1.0),
            top_k=_pick(req.top_k, d.top_k, 0),
            top_p=_pick(req.top_p, d.top_p, 1.0),
            min_p=_pick(req.min_p, d.min_p, 0.0),
            repetition_penalty=_pick(req.repetition_penalty, d.repetition_penalty, 1.0),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=req.token_bias(),
            seed=None if req.seed is None else req.seed + k,
            stop_token_ids=[*stop_ids, *(t for t in d.eos_token_ids if t not in stop_ids)],
            stop_strings=req.stop_list(),
            grammar=grammar,
        )
        params.check_vocab(state.runner.vocab_size)
    except LmforgeError as e:
        param = next((f for f in ("logit_bias", "min_p", "top_p", "temperature") if f in str(e)), None)
        raise APIError(400, str(e), param=param) from None
    return params


def _prompts(state, prompt) -> list[list[int]]:
    """OpenAI's four prompt forms (text, texts, token ids, lists of token ids) as id lists."""
    if isinstance(prompt, str) or (prompt and all(isinstance(p, str) for p in prompt)):
        if state.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt
        return [state.tokenizer.encode(t) for t in texts]
    lists = [prompt] if not prompt or isinstance(prompt[0], int) else prompt
    vocab = state.runner.vocab_size
    for ids in lists:
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    return [list(ids) for ids in lists]


def completion_job(state, req: CompletionRequest) -> Job:
    adapter = state.adapter_for(req.model)
    prompts = _prompts(state, req.prompt)
    grammar = _grammar(req, None)
    subs, echo = [], []
    prompt_logprobs = req.logprobs if req.echo else None  # echo + logprobs: the prompt's logprobs too
    default = _pick(None, state.defaults.max_new_tokens, 16)  # OpenAI's default for completions: 16
    for j, ids in enumerate(prompts):
        max_tokens = _check_length(state, ids, req.max_tokens, "prompt", default)
        subs += [
            Submission(ids, _sampling(state, req, max_tokens, k, [], grammar), adapter, req.logprobs, prompt_logprobs)
            for k in range(req.n)
        ]
        text = req.prompt if isinstance(req.prompt, str) else req.prompt[j] if isinstance(req.prompt[j], str) else None
        echo += [state.tokenizer.decode(ids) if text is None else text] * req.n
    return Job("completion", req, subs, sum(len(p) for p in prompts), echo=echo if req.echo else None)


def chat_job(state, req: ChatRequest) -> Job:
    adapter = state.adapter_for(req.model)
    tools = ToolSet.of(req)
    vision = state.vision if state.vision is not None and has_images(req.messages) else None
    if vision is not None:
        _check_vision(req)
        ids, pixels = vision.prepare(req.messages)
    else:
        ids, pixels = chat_prompt_ids(state.tokenizer, req.messages, tools=tools), None
    asked = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    max_tokens = _check_length(state, ids, asked, "messages", state.defaults.max_new_tokens)
    stop_ids, grammar = state.chat_stop_ids, _grammar(req, tools)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    subs = [
        Submission(ids, _sampling(state, req, max_tokens, k, stop_ids, grammar), adapter, logprobs)
        for k in range(req.n)
    ]
    if vision:
        subs = [VisionSubmission(s.prompt_ids, s.params, s.adapter, s.logprobs, pixel_values=pixels) for s in subs]
    return Job("chat", req, subs, len(ids), vision, tools=tools)


def _check_vision(req: ChatRequest) -> None:
    """The image path renders roles and contents only: refuse what it would drop."""
    if req.tools and req.tool_mode() != "none":
        raise APIError(400, "tools with image inputs are not supported", param="tools")
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, "a JSON response_format with image inputs is not supported", param="response_format")
    for i, m in enumerate(req.messages):
        for name in ("name", "tool_calls", "tool_call_id"):
            if getattr(m, name) is not None:
                raise APIError(
                    400, f"messages.{i}.{name}: not supported with image inputs", param=f"messages.{i}.{name}"
                )
