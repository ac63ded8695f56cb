"""`lmforge serve --replicas N`: N copies of the lmforge server behind one HTTP endpoint, on Ray Serve.

    lmforge serve --model runs/x/final --replicas 2 --port 8000     # a local Ray cluster
    RAY_ADDRESS=auto lmforge serve --model M --replicas 8           # an existing cluster's nodes

Each replica is a Ray Serve deployment replica (an actor) holding the whole lmforge app: the model, its
continuous-batching engine, the OpenAI routes; Ray's HTTP proxy spreads requests over the replicas
(fewest in flight first) and restarts one that dies. Nothing of the app changes: the replica builds the
same ServerState the single-process server does and hands Ray its ASGI app, whose lifespan starts and
stops the engine. Replicas do not share KV or prefix caches, so a conversation's follow-up may land on
a replica that has to prefill it again.

Ray is imported here only (the `serve-ray` extra): `lmforge serve` without --replicas never needs it.
"""

from __future__ import annotations

import signal
import threading

from lmforge.common import LmforgeError, get_logger

from .build import ServeConfig

log = get_logger(__name__)

APP_NAME = "lmforge"


def _import_serve():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise LmforgeError(
            f"--replicas needs Ray Serve: pip install 'lmforge[serve-ray]' (or 'ray[serve]') ({e})"
        ) from None
    return ray, serve


class LmforgeReplica:
    """One replica: the lmforge app for `cfg`, built inside the Ray actor (the model loads there)."""

    def __init__(self, cfg: ServeConfig):
        from .server import build_state

        self.state = build_state(cfg)

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.state)


def deployment(cfg: ServeConfig, replicas: int):
    """The bound Ray Serve application: `replicas` copies of LmforgeReplica(cfg)."""
    ray, serve = _import_serve()
    cpus = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
    # A replica asks for its share of the cluster's CPUs, at most one: N replicas fit on fewer cores
    # (torch's own threads are set by OMP_NUM_THREADS, not by Ray's accounting).
    options = {"num_cpus": min(1.0, cpus / replicas)}
    cls = serve.deployment(name="lmforge", num_replicas=replicas, ray_actor_options=options)(
        serve.ingress()(LmforgeReplica)
    )
    return cls.bind(cfg)


def serve_replicas(cfg: ServeConfig, replicas: int, stop: threading.Event | None = None) -> None:
    """Run `replicas` replicas behind http://cfg.host:cfg.port until SIGTERM/SIGINT (or `stop` is set)."""
    from .server import check_address

    if replicas < 1:
        raise LmforgeError(f"--replicas must be >= 1, got {replicas}")
    check_address(cfg.host, cfg.port)
    ray, serve = _import_serve()
    started_ray = not ray.is_initialized()
    if started_ray:  # a local cluster unless RAY_ADDRESS names one
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(deployment(cfg, replicas), name=APP_NAME, route_prefix="/", blocking=False)
        log.info("serving %s on http://%s:%d (%d Ray Serve replicas)", cfg.model, cfg.host, cfg.port, replicas)
        stop.wait()
        log.info("shutting down the replicas")
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
