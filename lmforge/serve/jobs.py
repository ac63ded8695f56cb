"""From a validated request to a `Job`: the prompts as token ids (text, token ids, or a chat
rendered by the checkpoint's template), the context-length checks, and each choice's
`SamplingParams`.
"""

from __future__ import annotations

from lmforge.common import LmforgeError
from lmforge.infer.sampling import SamplingParams

from .protocol import APIError, ChatRequest, CompletionRequest
from .responses import Job
from .runner import Submission
from .text import chat_prompt_ids
from .vision import VisionSubmission, has_images


def _check_length(state, ids: list[int], max_tokens: int | None, param: str) -> int:
    """The number of tokens to generate; 400 when the prompt or prompt + max_tokens exceed the context."""
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
        return limit - len(ids)
    if len(ids) + max_tokens > limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens; you asked for "
            f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def _sampling(req, max_tokens: int, k: int, stop_ids: list[int]) -> SamplingParams:
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            repetition_penalty=req.repetition_penalty,
            seed=None if req.seed is None else req.seed + k,
            stop_token_ids=list(stop_ids),
            stop_strings=req.stop_list(),
        )
    except LmforgeError as e:
        raise APIError(400, str(e)) from None


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
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    prompts = _prompts(state, req.prompt)
    subs, echo = [], []
    prompt_logprobs = req.logprobs if req.echo else None  # echo + logprobs: the prompt's logprobs too
    for j, ids in enumerate(prompts):
        max_tokens = _check_length(state, ids, 16 if req.max_tokens is None else req.max_tokens, "prompt")
        subs += [
            Submission(ids, _sampling(req, max_tokens, k, []), adapter, req.logprobs, prompt_logprobs)
            for k in range(req.n)
        ]
        text = req.prompt if isinstance(req.prompt, str) else req.prompt[j] if isinstance(req.prompt[j], str) else None
        echo += [state.tokenizer.decode(ids) if text is None else text] * req.n
    return Job("completion", req, subs, sum(len(p) for p in prompts), echo=echo if req.echo else None)


def chat_job(state, req: ChatRequest) -> Job:
    adapter = state.adapter_for(req.model)
    vision = state.vision if state.vision is not None and has_images(req.messages) else None
    ids, pixels = vision.prepare(req.messages) if vision else (chat_prompt_ids(state.tokenizer, req.messages), None)
    asked = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    max_tokens = _check_length(state, ids, asked, "messages")
    stop_ids = state.chat_stop_ids
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    subs = [Submission(ids, _sampling(req, max_tokens, k, stop_ids), adapter, logprobs) for k in range(req.n)]
    if vision:
        subs = [VisionSubmission(s.prompt_ids, s.params, s.adapter, s.logprobs, pixel_values=pixels) for s in subs]
    return Job("chat", req, subs, len(ids), vision)
