"""The FastAPI app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (JSON or
server-sent events), /health, /metrics and the chat page at /.

Every failure is OpenAI's error JSON with a 4xx status when the client is at fault (bad JSON,
wrong types, unknown model, too long, too big, no key) and 429 when the queue is full; a 500
only for a bug. Bodies are read and validated by hand (not FastAPI's parameter injection) so
those answers are ours, not a framework's 422.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.common import LmforgeError, get_logger
from lmforge.infer.sampling import SamplingParams

from .generation import Delta, chat_logprobs, collect, completion_logprobs, echo_entries, generate, submit
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, parse
from .runner import EngineRunner, Submission
from .text import chat_prompt_ids, end_of_turn_ids
from .vision import VisionRunner, VisionSubmission, has_images

log = get_logger(__name__)
STATIC = Path(__file__).parent / "static"
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
_ID_PREFIX, _ids = secrets.token_hex(6), itertools.count()  # unique response ids without a syscall each


@dataclass
class ServerState:
    runner: EngineRunner
    tokenizer: object
    model_name: str
    adapters: list[str] = field(default_factory=list)
    api_key: str | None = None
    request_timeout: float = 600.0
    max_body_bytes: int = 1 << 20
    body_timeout: float = 30.0  # seconds to receive a whole request body (a short body never hangs a handler)
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    vision: VisionRunner | None = None  # a vision-language model's image path (serve/vision.py)
    chat_stop_ids: list[int] = field(init=False)  # EOS + the chat template's end-of-turn token

    def __post_init__(self) -> None:
        self.chat_stop_ids = end_of_turn_ids(self.tokenizer) if self.tokenizer is not None else []

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def adapter_for(self, model: str) -> str | None:
        """The `model` field picks the base model (None) or a loaded LoRA adapter by name."""
        if model == self.model_name:
            return None
        if model in self.adapters:
            return model
        raise APIError(
            404,
            f"the model {model!r} does not exist (available: {', '.join(self.model_ids())})",
            param="model",
            code="model_not_found",
        )

    def model_ids(self) -> list[str]:
        return [self.model_name, *self.adapters]


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.runner.start()
        yield
        state.runner.stop()
        if state.vision is not None:
            state.vision.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmforge = state
    _add_error_handlers(app)
    app.add_middleware(_AuthAndCount, state=state)
    _add_routes(app, state)
    return app


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error(e)

    @app.exception_handler(LmforgeError)
    async def user_error(request: Request, e: LmforgeError):
        return _error(APIError(400, str(e)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(
            APIError(
                e.status_code,
                f"{request.method} {request.url.path}: {e.detail}",
                code="not_found" if e.status_code == 404 else None,
            )
        )

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(APIError(500, f"internal server error ({type(e).__name__})", type="server_error"))


class _AuthAndCount:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which re-buffers every streamed chunk through
    an extra task): Bearer-key check and draining 503 on /v1, requests_total by status, and a bug's
    500 answered in JSON on a connection that stays open."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = [0]  # 0 until the response starts

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = _check_key(Request(scope), self.state) or _check_draining(self.state)
            await (refusal or self.app)(scope, receive, send_and_record)
        except Exception as e:  # a bug: answer 500 JSON here, so the error stops (Starlette's outer
            # handler would re-raise it to uvicorn, which logs it again and drops a keep-alive connection)
            if status[0]:  # the response had started: nothing more can be said on it
                raise
            log.exception("unhandled error on %s", path)
            error = APIError(500, f"internal server error ({type(e).__name__})", type="server_error")
            await _error(error)(scope, receive, send_and_record)
        finally:
            endpoint = path if path in ENDPOINTS else "other"
            self.state.metrics.requests.inc(endpoint=endpoint, status=str(status[0] or 500))


def _check_key(request: Request, state: ServerState) -> JSONResponse | None:
    if state.api_key is None:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        return _error(APIError(401, "no API key given: send 'Authorization: Bearer YOUR_KEY'", code="invalid_api_key"))
    if not hmac.compare_digest(key.strip().encode(), state.api_key.encode()):
        return _error(APIError(401, "incorrect API key provided", code="invalid_api_key"))
    return None


def _check_draining(state: ServerState) -> JSONResponse | None:
    if not state.draining:
        return None
    return _error(APIError(503, "the server is shutting down", type="server_error", code="shutting_down"))


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, within `limit` bytes (413) and `timeout` seconds (408: a client that sends less
    than its Content-Length, or trickles it, does not hold a handler forever)."""
    size = request.headers.get("content-length", "")
    too_big = APIError(
        413, f"the request body is larger than the server's limit of {limit} bytes", code="request_too_large"
    )
    if size.isdigit() and int(size) > limit:
        raise too_big

    async def read() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {timeout:g} s (Content-Length {size or 'not given'})",
            code="request_timeout",
        ) from None


# ----------------------------------------------------------------------------- routes


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not state.runner.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok", "in_flight": state.runner.in_flight}

    @app.get("/metrics")
    async def metrics():
        text = state.metrics.render(state.runner.stats, state.runner.in_flight)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state, m) for m in state.model_ids()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        state.adapter_for(model)
        return _model_card(state, model)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await _read_body(request, state.max_body_bytes, state.body_timeout))
        return await _serve(request, state, _completion_job(state, req))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse(ChatRequest, await _read_body(request, state.max_body_bytes, state.body_timeout))
        return await _serve(request, state, _chat_job(state, req))


def _model_card(state: ServerState, model: str) -> dict:
    card = {"id": model, "object": "model", "created": 0, "owned_by": "lmforge"}
    if model != state.model_name:
        card["parent"] = state.model_name
    return card


@dataclass
class _Job:
    """One HTTP request's work: the choices to run and how to shape the answer."""

    kind: str  # "completion" | "chat"
    req: CompletionRequest | ChatRequest
    subs: list[Submission]
    prompt_tokens: int
    runner: VisionRunner | None = None  # None: the engine; image requests run on the VLM's own path
    echo: list[str] | None = None  # completions with echo: each choice's prompt text, put before its text
    id: str = field(default_factory=lambda: f"{_ID_PREFIX}{next(_ids):x}")
    created: int = field(default_factory=lambda: int(time.time()))


def _check_length(state: ServerState, ids: list[int], max_tokens: int | None, param: str) -> int:
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


def _prompts(state: ServerState, prompt) -> list[list[int]]:
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


def _completion_job(state: ServerState, req: CompletionRequest) -> _Job:
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
    return _Job("completion", req, subs, sum(len(p) for p in prompts), echo=echo if req.echo else None)


def _chat_job(state: ServerState, req: ChatRequest) -> _Job:
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
    return _Job("chat", req, subs, len(ids), vision)


async def _serve(request: Request, state: ServerState, job: _Job):
    runner = job.runner or state.runner
    if len(job.subs) > runner.max_in_flight:  # could never be admitted: not a "retry later"
        raise APIError(
            400,
            f"this request asks for {len(job.subs)} sequences (prompts x n); the server runs "
            f"at most {runner.max_in_flight} at once",
            param="n",
        )
    submitted = submit(runner, job.subs)
    state.metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in job.subs))
    deltas = generate(runner, state.tokenizer, state.metrics, submitted, job.req.stop_list(), state.request_timeout)
    if job.req.stream:
        return StreamingResponse(
            _sse(state, job, deltas),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    task = asyncio.ensure_future(collect(deltas, len(job.subs)))
    while not task.done():  # a client that hangs up cancels its sequences (and frees their blocks)
        await asyncio.wait({task}, timeout=0.2)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return JSONResponse({}, status_code=499)
    return _response(state, job, task.result())


def _usage(job: _Job, completion_tokens: int) -> dict:
    return dict(
        prompt_tokens=job.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=job.prompt_tokens + completion_tokens,
    )


def _response(state: ServerState, job: _Job, results: list[dict]) -> dict:
    tok, choices = state.tokenizer, []
    for i, r in enumerate(results):
        want_lp = job.subs[i].logprobs is not None
        if job.kind == "completion":
            text, entries = r["text"], r["logprobs"]
            if job.echo is not None:
                text, entries = job.echo[i] + text, echo_entries(job.subs[i].prompt_ids, r["prompt_logprobs"]) + entries
            lp = completion_logprobs(tok, entries) if want_lp else None
            choices.append(dict(index=i, text=text, logprobs=lp, finish_reason=r["finish_reason"]))
        else:
            lp = chat_logprobs(tok, r["logprobs"]) if want_lp else None
            choices.append(
                dict(
                    index=i,
                    message=dict(role="assistant", content=r["text"]),
                    logprobs=lp,
                    finish_reason=r["finish_reason"],
                )
            )
    obj = "text_completion" if job.kind == "completion" else "chat.completion"
    prefix = "cmpl-" if job.kind == "completion" else "chatcmpl-"
    return dict(
        id=prefix + job.id,
        object=obj,
        created=job.created,
        model=job.req.model,
        choices=choices,
        usage=_usage(job, sum(r["tokens"] for r in results)),
        system_fingerprint=None,
    )


async def _sse(state: ServerState, job: _Job, deltas: AsyncIterator[Delta]) -> AsyncIterator[str]:
    """OpenAI's chunk stream: `data: {chunk}` per delta, an optional usage chunk, `data: [DONE]`."""
    chat = job.kind == "chat"
    base = dict(
        id=("chatcmpl-" if chat else "cmpl-") + job.id,
        created=job.created,
        model=job.req.model,
        object="chat.completion.chunk" if chat else "text_completion",
        system_fingerprint=None,
    )
    include_usage = bool(job.req.stream_options and job.req.stream_options.include_usage)
    tokens, offsets, echoed = 0, [0] * len(job.subs), set()

    head = json.dumps(base)[:-1]  # the fields every chunk shares, encoded once (the same bytes as whole)
    tail = ', "usage": null}' if include_usage else "}"

    def chunk(choice: dict) -> str:
        return f'data: {head}, "choices": [{json.dumps(choice)}]{tail}\n\n'

    try:
        if chat:
            for i in range(len(job.subs)):
                yield chunk(dict(index=i, delta=dict(role="assistant", content=""), logprobs=None, finish_reason=None))
        async for d in deltas:
            tokens += len(d.token_ids)
            text, entries = d.text, d.logprobs
            if job.echo is not None and d.index not in echoed:  # the prompt goes first, in this choice's first chunk
                echoed.add(d.index)
                text = job.echo[d.index] + text
                if job.subs[d.index].logprobs is not None:
                    entries = echo_entries(job.subs[d.index].prompt_ids, d.prompt_logprobs) + (entries or [])
            if not (text or d.finish_reason or entries):
                continue
            if chat:
                delta = dict(content=text) if text else {}
                lp = chat_logprobs(state.tokenizer, entries) if entries else None
                yield chunk(dict(index=d.index, delta=delta, logprobs=lp, finish_reason=d.finish_reason))
            else:
                lp = completion_logprobs(state.tokenizer, entries, offsets[d.index]) if entries else None
                offsets[d.index] += len(text)
                yield chunk(dict(index=d.index, text=text, logprobs=lp, finish_reason=d.finish_reason))
        if include_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': _usage(job, tokens)})}\n\n"
    except APIError as e:  # headers are gone: the error travels in the stream, as OpenAI does
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"
