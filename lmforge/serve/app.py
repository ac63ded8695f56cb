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
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.common import LmforgeError, get_logger
from lmforge.multimodal.alm import AudioLanguageModel

from .audio import parse_form, transcription_body
from .defaults import GenerationDefaults
from .extras import add_extra_routes
from .generation import collect, generate, submit
from .jobs import chat_job, completion_job
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, parse
from .responses import Job, response, sse
from .routing import Router
from .runner import EngineRunner
from .text import end_of_turn_ids
from .vision import VisionRunner

log = get_logger(__name__)
STATIC = Path(__file__).parent / "static"
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/audio/transcriptions")


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
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)  # generation_config.json's
    router: Router | None = None  # --fallback: low-confidence answers re-asked of another endpoint (routing.py)
    rag: object = None  # --rag: a RagModel (serve/rag.py), retrieval-augmented answers under its own name
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
        if self.rag is not None and model == self.rag.name:
            raise APIError(400, f"{model!r} is the RAG model: it answers /v1/chat/completions only", param="model")
        raise APIError(
            404,
            f"the model {model!r} does not exist (available: {', '.join(self.model_ids())})",
            param="model",
            code="model_not_found",
        )

    def model_ids(self) -> list[str]:
        return [self.model_name, *self.adapters, *([self.rag.name] if self.rag is not None else [])]


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
    add_extra_routes(app, state, _read_body, _check_key)  # embeddings, tokenize, runtime LoRA (extras.py)
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
        embedder = state.runner.embedding_model  # --embedding-model: answers /v1/embeddings only
        ids = state.model_ids() + ([embedder] if embedder and embedder not in state.model_ids() else [])
        return {"object": "list", "data": [_model_card(state, m) for m in ids]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model == state.runner.embedding_model:
            return {"id": model, "object": "model", "created": 0, "owned_by": "lmforge"}
        if state.rag is None or model != state.rag.name:
            state.adapter_for(model)
        return _model_card(state, model)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await _read_body(request, state.max_body_bytes, state.body_timeout))
        return await _serve(request, state, completion_job(state, req))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse(ChatRequest, await _read_body(request, state.max_body_bytes, state.body_timeout))
        if state.rag is not None and req.model == state.rag.name:
            from .rag import chat as rag_chat

            return await rag_chat(request, state, req, _serve)
        return await _serve(request, state, chat_job(state, req))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        model = state.vision.model if state.vision is not None else None
        if not isinstance(model, AudioLanguageModel):
            raise APIError(400, "this server's model does not take audio (serve an `lmforge audio train` folder)")
        body = await _read_body(request, state.max_body_bytes, state.body_timeout)
        form = parse_form(body, request.headers.get("content-type", ""))
        chat_body, response_format = transcription_body(form, model.alm_config.prompt)
        result = await _serve(request, state, chat_job(state, parse(ChatRequest, chat_body)))
        if not isinstance(result, dict):  # the client hung up (499)
            return result
        text = (result["choices"][0]["message"].get("content") or "").strip()
        return PlainTextResponse(text) if response_format == "text" else {"text": text}


def _model_card(state: ServerState, model: str) -> dict:
    card = {"id": model, "object": "model", "created": 0, "owned_by": "lmforge"}
    if model != state.model_name:
        card["parent"] = state.model_name
    return card


async def _serve(request: Request, state: ServerState, job: Job):
    runner = job.runner or state.runner
    if len(job.subs) > runner.max_in_flight:  # could never be admitted: not a "retry later"
        raise APIError(
            400,
            f"this request asks for {len(job.subs)} sequences (prompts x n); the server runs "
            f"at most {runner.max_in_flight} at once",
            param="n",
        )
    routed = state.router is not None and not job.req.stream  # the decision needs the whole answer
    submitted = submit(runner, state.router.probe(job.subs, runner.max_in_flight) if routed else job.subs)
    state.metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in job.subs))
    deltas = generate(runner, state.tokenizer, state.metrics, submitted, job.req.stop_list(), state.request_timeout)
    if job.req.stream:
        return StreamingResponse(
            sse(state, job, deltas),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    task = asyncio.ensure_future(collect(deltas, len(submitted[0])))  # routing adds sampled answers
    while not task.done():  # a client that hangs up cancels its sequences (and frees their blocks)
        await asyncio.wait({task}, timeout=0.2)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return JSONResponse({}, status_code=499)
    if routed:
        return await state.router.respond(
            job, task.result(), lambda results: response(state, job, results), state.tokenizer
        )
    return response(state, job, task.result())
