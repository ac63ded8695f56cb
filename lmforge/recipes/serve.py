"""Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
/v1/models, streaming), with LoRA adapters selected by the request's `model` field, optional
Bearer API key, /health, /metrics (Prometheus) and a chat page at /; `--draft DIR` decodes
speculatively with a smaller model sharing the tokenizer, `--lookup` with prompt-lookup drafts
(same outputs, fewer target steps).

    lmforge serve runs/pipeline-tiny/final               # http://127.0.0.1:8000 (chat page at /)
    lmforge serve --model runs/pipeline-tiny/final --port 8001 --api-key secret
"""

from __future__ import annotations

import argparse
import os

from lmforge.common import LmforgeError


def add_arguments(p: argparse.ArgumentParser) -> None:
    # The folder may come positionally (`lmforge serve runs/x/final`, what the pipeline prints) or as --model.
    p.add_argument(
        "model_dir",
        nargs="?",
        metavar="MODEL",
        help="model folder (lmforge checkpoint or Hugging Face folder); same as --model",
    )
    p.add_argument("--model", help="model folder, if not given positionally")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a LoRA adapter served as model NAME (repeatable)",
    )
    p.add_argument("--served-model-name", help="the base model's name in the API (default: the folder name)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LMFORGE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $LMFORGE_API_KEY, else open)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    p.add_argument("--max-seqs", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond --max-seqs before 429")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens per engine step (chunked prefill)")
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=None,
        help="prompt tokens per step while other sequences decode (default: no cap beyond "
        "--max-batch-tokens); lower keeps streams smooth when many requests arrive at once",
    )
    p.add_argument("--block-size", type=int, default=16, help="KV cache block size (tokens)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: from --max-seqs)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cut off")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted")
    p.add_argument("--draft", metavar="DIR", help="speculative decoding with this smaller model (same tokenizer)")
    p.add_argument(
        "--lookup",
        action="store_true",
        help="speculative decoding with prompt-lookup drafts (n-gram copies from the context, no model)",
    )
    p.add_argument("--num-speculative", type=int, default=4, help="tokens --draft/--lookup propose per decode step")
    p.add_argument(
        "--engine",
        choices=("process", "thread"),
        default=None,
        help="where the model runs: a child process of its own (default; the HTTP side and the "
        "model never wait for each other's GIL) or a thread of the server process "
        "(a vision-language model always uses a thread)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel degree: the model sharded over N processes, launched with "
        "`torchrun --nproc_per_node N -m lmforge serve --tp N ...`; rank 0 answers HTTP",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="N copies of the server behind one HTTP endpoint on Ray Serve (a local Ray cluster, or "
        "$RAY_ADDRESS's); needs the serve-ray extra",
    )
    p.add_argument(
        "--embedding-model",
        metavar="DIR",
        help="answer /v1/embeddings with this model folder (lmforge checkpoint or Hugging Face folder "
        "lmforge loads) instead of the served model's own pooled hidden states",
    )
    p.add_argument(
        "--enable-lora-runtime",
        action="store_true",
        help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default: any client "
        "with the API key could then load files from this machine's disk)",
    )
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="on SIGTERM, seconds to let in-flight requests finish"
    )
    p.add_argument(
        "--rag",
        metavar="INDEX",
        help="also serve retrieval-augmented answers from this `lmforge rag index` folder, as the chat model "
        "'<name>-rag' (answers cite passages [n]; the response's `sources` field lists them)",
    )
    p.add_argument(
        "--rag-top-k", type=int, default=3, help="passages retrieved per --rag request (default: %(default)s)"
    )
    g = p.add_argument_group("edge-cloud routing (README: Arena, safety and routing)")
    g.add_argument(
        "--fallback",
        metavar="URL",
        help="an OpenAI-compatible endpoint that answers instead when the local answer's confidence is low",
    )
    g.add_argument(
        "--route-signal",
        choices=("mean_logprob", "entropy", "agreement", "learned"),
        default="mean_logprob",
        help="the confidence signal: mean token log-probability (escalate below the threshold), mean "
        "entropy (escalate above), agreement: the share of --route-samples sampled answers whose final "
        "answer matches (escalate below), or a learned router's P(keep) (escalate below; needs --router)",
    )
    g.add_argument(
        "--route-threshold",
        type=float,
        default=None,
        help="the signal's escalation threshold (default: -1.0 mean_logprob, 1.0 entropy, 0.5 agreement, 0.5 learned)",
    )
    g.add_argument(
        "--route-samples",
        type=int,
        default=None,
        help="--route-signal agreement: answers sampled per choice to compare with the local one (default 5)",
    )
    g.add_argument(
        "--route-temperature",
        type=float,
        default=None,
        help="--route-signal agreement: the samples' temperature (default 0.7)",
    )
    g.add_argument("--router", metavar="FILE", help="a learned router JSON (--route-signal learned)")
    g.add_argument("--fallback-model", help="the model name sent to the fallback (default: the first it lists)")
    g.add_argument(
        "--fallback-api-key",
        default=os.environ.get("LMFORGE_FALLBACK_API_KEY"),
        help="Bearer key for the fallback (default: $LMFORGE_FALLBACK_API_KEY)",
    )
    g.add_argument("--route-log", metavar="FILE", help="append each routing decision to this JSONL file")


def parse_adapters(items: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise LmforgeError(f"--adapter expects NAME=DIR, got {item!r}")
        if name in adapters:
            raise LmforgeError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = folder
    return adapters


def model_folder(args: argparse.Namespace) -> str:
    """The model folder from MODEL or --model: one of them is required, and both must name the same folder."""
    positional, flag = args.model_dir, args.model
    if positional is None and flag is None:
        raise LmforgeError(
            "no model: give the model folder, e.g. `lmforge serve runs/pipeline-tiny/final` (or --model DIR)"
        )
    if positional is not None and flag is not None and os.path.realpath(positional) != os.path.realpath(flag):
        raise LmforgeError(f"two different models given: MODEL {positional!r} and --model {flag!r}; give one")
    return positional if positional is not None else flag


def route_config(args: argparse.Namespace):
    """--fallback and its routing flags -> a RouteConfig (None without --fallback; the other
    routing flags alone are refused, not ignored)."""
    from lmforge.serve.routing import RouteConfig

    if args.fallback is None:
        given = [
            f
            for f in ("route_threshold", "router", "fallback_model", "route_log", "route_samples", "route_temperature")
            if getattr(args, f) is not None
        ]
        if given or args.route_signal != "mean_logprob":
            flags = ", ".join("--" + f.replace("_", "-") for f in given or ["route_signal"])
            raise LmforgeError(f"{flags} configure routing to a --fallback URL; give --fallback too")
        return None
    return RouteConfig(
        args.fallback,
        args.route_threshold,
        args.route_signal,
        args.fallback_model,
        args.fallback_api_key or None,
        args.router,
        args.route_log,
        args.request_timeout,
        samples=args.route_samples,
        temperature=args.route_temperature,
    )


def main(args: argparse.Namespace) -> int:
    from lmforge.serve import ServeConfig, serve

    model = model_folder(args)
    for flag in (
        "max_seqs",
        "max_queue",
        "max_batch_tokens",
        "block_size",
        "max_body_bytes",
        "num_speculative",
        "max_prefill_tokens",
    ):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise LmforgeError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.rag is None and args.rag_top_k != 3:
        raise LmforgeError("--rag-top-k sets the passages of --rag INDEX; give --rag too")
    cfg = ServeConfig(
        route=route_config(args),
        model=model,
        adapters=parse_adapters(args.adapter),
        served_model_name=args.served_model_name,
        api_key=args.api_key or None,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        max_seqs=args.max_seqs,
        max_queue=args.max_queue,
        max_batch_tokens=args.max_batch_tokens,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        max_model_len=args.max_model_len,
        request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        drain_timeout=args.drain_timeout,
        draft=args.draft,
        lookup=args.lookup,
        num_speculative=args.num_speculative,
        max_prefill_tokens=args.max_prefill_tokens,
        engine_process=args.engine != "thread",
        embedding_model=args.embedding_model,
        enable_lora_runtime=args.enable_lora_runtime,
        rag=args.rag,
        rag_top_k=args.rag_top_k,
    )
    if args.tp < 1:
        raise LmforgeError(f"--tp must be >= 1, got {args.tp}")
    if args.replicas is not None:
        if args.tp > 1:
            raise LmforgeError("--replicas cannot be combined with --tp yet (a replica of several processes)")
        from lmforge.serve.ray_serve import serve_replicas

        serve_replicas(cfg, args.replicas)
        return 0
    if args.tp > 1:  # every rank runs this; rank 0 serves, the others step with it (serve/tp.py)
        from lmforge.serve.tp import serve_tp

        serve_tp(cfg, args.tp, args.engine)
        return 0
    serve(cfg)
    return 0
