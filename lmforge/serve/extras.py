"""Routes beside generation: OpenAI's /v1/embeddings, vLLM's /tokenize and /detokenize, and vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter.

Embeddings: the mean over the input's tokens of the model's final normed hidden state (after the
last block's norm, before the LM head), L2-normalised; from the served model (base weights, no
adapter) or from the folder given by `lmforge serve --embedding-model DIR`. They are computed by the
engine's owner between two decode steps (engine_ops.py), not on a second copy of the model here.

Runtime LoRA is off unless the server was started with --enable-lora-runtime (a client holding the
API key could otherwise make the server read any folder on its disk); off, both routes answer 404
saying how to turn it on. An adapter is loaded between two engine steps: other requests stream on.
Unloading an adapter that unfinished requests use is refused with 409 (they are not cut off);
retry once they are done.

Every body is validated strictly: an unknown field is a 400 naming it, never ignored.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ConfigDict, Field, model_validator

from lmforge.common import LmforgeError

from .engine_ops import AdapterBusy, CallFailed
from .protocol import APIError, ChatMessage, _Request, parse
from .runner import EngineFailed
from .text import chat_prompt_ids

MAX_EMBED_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"  # an adapter's served name


class _Strict(_Request):
    model_config = ConfigDict(strict=True, extra="forbid")


class EmbeddingRequest(_Strict):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check(self) -> EmbeddingRequest:
        if self.dimensions is not None:
            raise ValueError("dimensions: not supported (the embedding has the model's hidden size)")
        items = [self.input] if isinstance(self.input, str) or _is_ids(self.input) else self.input
        if not items:
            raise ValueError("input: give at least one input")
        if len(items) > MAX_EMBED_INPUTS:
            raise ValueError(f"input: at most {MAX_EMBED_INPUTS} inputs per request, got {len(items)}")
        return self

    def inputs(self) -> list:
        return [self.input] if isinstance(self.input, str) or _is_ids(self.input) else list(self.input)


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], int)


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # rendered by the chat template with the generation prompt
    add_special_tokens: bool = False  # true: the tokenizer's BOS first (the server's own prompts have none)
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class LoadLoraRequest(_Strict):
    lora_name: str = Field(pattern=_NAME)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(_Strict):
    lora_name: str


def add_extra_routes(
    app: FastAPI,
    state,
    read_body: Callable[[Request, int, float], Awaitable[bytes]],
    check_key: Callable[[Request, object], JSONResponse | None],
) -> None:
    """Add the routes to `app` serving `state` (app.ServerState); `read_body` and `check_key` are the
    app's own body reader (size and time limits) and API-key check (/tokenize is outside /v1)."""

    loading: set[str] = set()  # adapter names being loaded (a second load of one name is refused)

    async def body(request: Request, cls):
        return parse(cls, await read_body(request, state.max_body_bytes, state.body_timeout))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await _embeddings(state, await body(request, EmbeddingRequest))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        refusal = check_key(request, state)
        return refusal or _tokenize(state, await body(request, TokenizeRequest))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        refusal = check_key(request, state)
        return refusal or _detokenize(state, await body(request, DetokenizeRequest))

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        _lora_enabled(state)
        return await _load_lora(state, await body(request, LoadLoraRequest), loading)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        _lora_enabled(state)
        return await _unload_lora(state, await body(request, UnloadLoraRequest))


async def _call(state, op: str, *args):
    """An engine call with its errors as the client's answer: 400 its mistake, 409 busy, 5xx ours."""
    try:
        return await state.runner.call(op, *args)
    except AdapterBusy as e:
        raise APIError(409, str(e), code="adapter_in_use") from None
    except LmforgeError as e:
        raise APIError(400, str(e)) from None
    except EngineFailed as e:
        raise APIError(503, f"the inference engine is not running: {e}", type="server_error") from None
    except CallFailed as e:
        raise APIError(500, f"the inference engine failed: {e}", type="server_error") from None


# ----------------------------------------------------------------------------- embeddings


async def _embeddings(state, req: EmbeddingRequest) -> dict:
    names = [state.model_name, *filter(None, [state.runner.embedding_model])]
    if req.model not in names:
        if req.model in state.adapters:
            raise APIError(400, "embeddings come from the base model; adapters do not apply", param="model")
        raise APIError(
            404, f"the model {req.model!r} does not exist here (embeddings: {', '.join(names)})", param="model"
        )
    raw, dim, counts = await _call(state, "embed", req.inputs())
    vectors = np.frombuffer(raw, dtype="<f4").reshape(len(counts), dim)
    if req.encoding_format == "base64":  # OpenAI's: the little-endian float32 array's bytes, base64
        encoded = [base64.b64encode(v.tobytes()).decode("ascii") for v in vectors]
    else:
        encoded = vectors.tolist()
    data = [dict(object="embedding", index=i, embedding=e) for i, e in enumerate(encoded)]
    tokens = sum(counts)
    return dict(object="list", data=data, model=req.model, usage=dict(prompt_tokens=tokens, total_tokens=tokens))


# ----------------------------------------------------------------------------- tokenize, detokenize


def _tokenizer(state, model: str | None):
    if model is not None:
        state.adapter_for(model)  # 404 for a name that is not served (adapters share the tokenizer)
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    return state.tokenizer


def _tokenize(state, req: TokenizeRequest) -> dict:
    tok = _tokenizer(state, req.model)
    ids = tok.encode(req.prompt) if req.prompt is not None else chat_prompt_ids(tok, req.messages)
    if req.add_special_tokens:
        if tok.bos_id is None:
            raise APIError(400, "add_special_tokens: this tokenizer has no BOS token", param="add_special_tokens")
        ids = [tok.bos_id, *ids]
    out = dict(count=len(ids), max_model_len=state.max_model_len, tokens=ids)
    if req.return_token_strs:
        out["token_strs"] = [tok.decode([t], skip_special_tokens=False) for t in ids]
    return out


def _detokenize(state, req: DetokenizeRequest) -> dict:
    tok = _tokenizer(state, req.model)
    bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < tok.vocab_size), None)
    if bad is not None:
        raise APIError(
            400,
            f"tokens.{bad}: token id {req.tokens[bad]} is outside the vocabulary (0..{tok.vocab_size - 1})",
            param=f"tokens.{bad}",
        )
    return dict(prompt=tok.decode(req.tokens, skip_special_tokens=False))


# ----------------------------------------------------------------------------- LoRA at run time


def _lora_enabled(state) -> None:
    if not state.runner.lora_runtime:
        raise APIError(
            404,
            "loading LoRA adapters at run time is off; start the server with --enable-lora-runtime",
            code="lora_runtime_disabled",
        )


async def _load_lora(state, req: LoadLoraRequest, loading: set[str]) -> PlainTextResponse:
    name = req.lora_name
    if name in state.model_ids() or name == state.runner.embedding_model or name in loading:
        raise APIError(400, f"the name {name!r} is already in use; unload it first or pick another", param="lora_name")
    loading.add(name)
    try:
        await _call(state, "load_lora", name, req.lora_path)
    finally:
        loading.discard(name)
    state.adapters.append(name)  # only now can requests name it
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def _unload_lora(state, req: UnloadLoraRequest) -> PlainTextResponse:
    name = req.lora_name
    if name not in state.adapters:
        raise APIError(404, f"no LoRA adapter named {name!r} is loaded", param="lora_name", code="model_not_found")
    busy = state.runner.adapter_in_use(name)
    if busy:
        raise APIError(
            409,
            f"adapter {name!r} is in use by {busy} unfinished request(s); retry when they are done",
            code="adapter_in_use",
        )
    state.adapters.remove(name)  # new requests for it are refused from here on
    try:
        await _call(state, "unload_lora", name)
    except APIError:
        state.adapters.append(name)
        raise
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
