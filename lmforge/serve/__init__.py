"""L5: an OpenAI-compatible HTTP server on top of `lmforge.infer`'s continuous-batching engine.

    from lmforge.serve import ServeConfig, serve
    serve(ServeConfig(model="out/model", adapters={"sql": "out/sql-lora"}, port=8000))

Modules: protocol (request models, error JSON), engine_process (the engine in a child process,
its events read by the event loop; the default), runner (the engine on a thread instead),
generation (token events -> text deltas, stop strings, timeouts, cancel), text (chat prompts,
detokenization), metrics (Prometheus text), app (FastAPI routes), server (load + uvicorn).
"""

from .server import ServeConfig, build_state, make_server, serve

__all__ = ["ServeConfig", "build_state", "make_server", "serve"]
