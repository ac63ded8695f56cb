"""Edge-cloud routing's cost-quality curve on the arithmetic task: a weak local model answers every
problem greedily, a stronger fallback model answers the ones escalated; accuracy against the
fraction escalated for each confidence signal of lmforge/serve/routing.py (mean token log-prob,
entropy, a learned router fitted on other problems), next to random routing's expected accuracy.

The signals are computed as the server computes them: per generated token its log-probability and
the top ROUTE_TOP_LOGPROBS alternatives (here by scoring the greedy answer, which gives the same
numbers as decoding it), then `routing.features`.

    python bench/routing.py                            # local arith-2500, fallback arith-5000
    python bench/routing.py --local arith-1000 --problems 300
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _arith_models import models_in  # noqa: E402

from lmforge.eval.lm import LocalLM, encode_pair  # noqa: E402
from lmforge.eval.reasoning import ArithmeticConfig, arithmetic_task, extract_answer  # noqa: E402
from lmforge.serve.routing import ROUTE_TOP_LOGPROBS, LearnedRouter, cost_quality_curve, features  # noqa: E402

STOP = ["\n\n", "Q:"]


@torch.inference_mode()
def answer_with_entries(lm: LocalLM, prompts: list[str]) -> tuple[list[str], list[list]]:
    """Greedy answers and their (token, logprob, top alternatives) entries."""
    texts = lm.generate(prompts, max_new_tokens=64, stop=STOP)
    out = []
    for p, t in zip(prompts, texts):
        ctx, cont = encode_pair(lm.tokenizer, p, t)
        if not cont:
            out.append([])
            continue
        ids = torch.tensor([ctx + cont])
        logp = torch.log_softmax(lm.model(ids[:, :-1]).float(), -1)[0, len(ctx) - 1 :]
        top = logp.topk(ROUTE_TOP_LOGPROBS, -1)
        out.append(
            [
                (tok, float(logp[i, tok]), list(zip(top.indices[i].tolist(), top.values[i].tolist())))
                for i, tok in enumerate(cont)
            ]
        )
    return texts, out


def correct(texts: list[str], problems: list[dict]) -> list[bool]:
    return [extract_answer(t) == p["answer"] for t, p in zip(texts, problems)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="runs/bench-arith")
    ap.add_argument("--local", default="arith-2500")
    ap.add_argument("--fallback", default="arith-5000")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--router-problems", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(2)
    models = models_in(args.root)
    local, fallback = (LocalLM.load(models[m], batch_size=32) for m in (args.local, args.fallback))
    test, _ = arithmetic_task(ArithmeticConfig(num_examples=args.problems, seed=0))
    train, _ = arithmetic_task(ArithmeticConfig(num_examples=args.router_problems, seed=7))

    texts, entries = answer_with_entries(local, [p["prompt"] for p in test])
    local_ok = correct(texts, test)
    fallback_ok = correct(fallback.generate([p["prompt"] for p in test], max_new_tokens=64, stop=STOP), test)
    tr_texts, tr_entries = answer_with_entries(local, [p["prompt"] for p in train])
    router = LearnedRouter.fit([features(e) for e in tr_entries], correct(tr_texts, train))
    feats = [features(e) for e in entries]
    curves = {
        "mean_logprob": cost_quality_curve([f["mean_logprob"] for f in feats], local_ok, fallback_ok),
        "entropy": cost_quality_curve([f["entropy"] for f in feats], local_ok, fallback_ok, higher_is_confident=False),
        "learned": cost_quality_curve([router.predict(f) for f in feats], local_ok, fallback_ok),
    }
    print(
        f"local {args.local}: accuracy {sum(local_ok) / len(test):.3f}; fallback {args.fallback}: "
        f"{sum(fallback_ok) / len(test):.3f}; {len(test)} problems (router fitted on {len(train)} others)"
    )
    print(f"{'escalated':>9} {'random':>7} " + " ".join(f"{k:>13}" for k in curves))
    for i, row in enumerate(curves["mean_logprob"]):
        print(
            f"{row['fraction_escalated']:>9.2f} {row['random_accuracy']:>7.3f} "
            + " ".join(f"{curves[k][i]['accuracy']:>13.3f}" for k in curves)
        )
    for k, rows in curves.items():
        inner = rows[1:-1]
        beats = all(r["accuracy"] > r["random_accuracy"] for r in inner)
        gain = sum(r["accuracy"] - r["random_accuracy"] for r in inner) / len(inner)
        print(f"{k}: beats random at every budget: {beats}; mean gain {gain:+.3f}")


if __name__ == "__main__":
    main()
