"""Speculative decoding inside the continuous-batching engine vs the same engine decoding plainly,
at 1, 4 and 16 concurrent requests, greedy (every row's tokens checked identical).

The pair is synthetic, built so that acceptance is high without training: a target whose layers
past the first `--draft-layers` barely change the residual stream (their output projections scaled
by 0.02), and a draft made of exactly those first layers (same embeddings and head). It measures
what the engine machinery gives and costs (batched drafting, one batched verify forward, block
trimming), not what a trained draft reaches; `bench/speculative.py` trains a real pair. The
prompt-lookup row runs on random prompts, which never repeat: it shows what looking costs when
there is nothing to copy. Medians of --repeats runs.

    python bench/engine_speculative.py              # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer


def build_pair(args) -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    cfg = ModelConfig.preset(
        "tiny",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        head_dim=64,
        intermediate_size=4 * args.hidden,
        initializer_range=0.2,
    )
    target = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in target.model.layers[args.draft_layers :]:
            layer.self_attn.o_proj.weight.mul_(0.02)
            layer.mlp.down_proj.weight.mul_(0.02)
    draft = Transformer(dataclasses.replace(cfg, num_hidden_layers=args.draft_layers)).eval()
    keep = {
        k: v
        for k, v in target.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < args.draft_layers
    }
    draft.load_state_dict(keep)
    return target, draft


def run(target, prompts, new: int, **engine_kwargs) -> tuple[float, list, dict]:
    engine = Engine(target, max_seqs=len(prompts), **engine_kwargs)
    start = time.perf_counter()
    out = engine.generate_batch(prompts, SamplingParams(max_new_tokens=new))
    return len(prompts) * new / (time.perf_counter() - start), out, engine.stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--draft-layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[3, 5])
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    target, draft = build_pair(args)
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, args.vocab, (int(torch.randint(16, 49, (1,), generator=g)),), generator=g).tolist()
        for _ in range(max(args.concurrency))
    ]
    print(
        f"target {args.layers}x{args.hidden}, draft = its first {args.draft_layers} layers, vocab {args.vocab}, "
        f"{args.new_tokens} new tokens per request, greedy, torch threads {torch.get_num_threads()}"
    )
    print(f"\n{'concurrent':>10} {'method':>14} {'tok/s':>8} {'vs plain':>9} {'acceptance':>11} {'same tokens':>12}")
    for n in args.concurrency:
        methods = [("plain", {})] + [(f"draft k={k}", dict(draft=draft, num_speculative=k)) for k in args.k]
        methods += [(f"lookup k={args.k[0]}", dict(lookup=True, num_speculative=args.k[0]))]
        plain_rate, plain_out = None, None
        for name, kw in methods:
            runs = [run(target, prompts[:n], args.new_tokens, **kw) for _ in range(args.repeats)]
            rate, out, stats = statistics.median(r[0] for r in runs), runs[0][1], runs[0][2]
            if plain_rate is None:
                plain_rate, plain_out = rate, out
            acc = stats["accepted_tokens"] / max(1, stats["drafted_tokens"]) if kw else float("nan")
            print(f"{n:>10} {name:>14} {rate:8.1f} {rate / plain_rate:8.2f}x {acc:11.2f} {str(out == plain_out):>12}")


if __name__ == "__main__":
    main()
