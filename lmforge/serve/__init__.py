"""L5: an OpenAI-compatible HTTP server on top of `lmforge.infer`'s continuous-batching engine.

    from lmforge.serve import ServeConfig, serve
    serve(ServeConfig(model="out/model", adapters={"sql": "out/sql-lora"}, port=8000))

Modules: protocol (request models, error JSON), runner (engine thread -> asyncio queues),
generation (token events -> text deltas, stop strings, timeouts, cancel), text (chat prompts,
detokenization), metrics (Prometheus text), app (FastAPI routes), server (load + uvicorn).
"""

from .server import ServeConfig, build_state, make_server, serve

__all__ = ["ServeConfig", "build_state", "make_server", "serve"]
