"""Edge-cloud routing's cost-quality curve on the arithmetic task: a weak local model answers every
problem greedily, a stronger fallback model answers the ones escalated; accuracy against the
fraction escalated for each confidence signal of lmforge/serve/routing.py, next to random routing's
expected accuracy.

    mean_logprob, entropy   the local answer's token log-probabilities
    agreement               self-consistency: share of --samples sampled answers agreeing (ties by mean_logprob)
    learned-answer          logistic regression on the answer features, label: the local answer is right
    learned-prompt          on the prompt alone (lengths, digits, hashed char n-grams), label: escalating
                            would not help (local right, or the fallback wrong too)
    learned-all             answer + agreement + prompt features, the same label

The routers are fitted on --router-problems problems of another seed (7) than the test problems
(--test-seed, 0); nothing of the test set is seen in training. The signals are what the server computes
(`lmforge.recipes.route.local_queries`). Each model's answers are cached under --cache.

    python bench/routing.py                            # local arith-2500, fallback arith-5000
    python bench/routing.py --test-seed 11              # another test set
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _arith_models import models_in  # noqa: E402

from lmforge.common import atomic_write_json  # noqa: E402
from lmforge.eval.lm import LocalLM  # noqa: E402
from lmforge.eval.reasoning import ArithmeticConfig, arithmetic_task, extract_answer  # noqa: E402
from lmforge.recipes.route import STOP, local_queries  # noqa: E402
from lmforge.serve.router_model import ANSWER_FEATURES, PROMPT_FEATURES, LearnedRouter  # noqa: E402
from lmforge.serve.routing import cost_quality_curve  # noqa: E402


def collect(args, models: dict, seed: int, n: int) -> dict:
    """{"queries", "local_ok", "fallback_ok"} for n problems of `seed` (cached)."""
    path = Path(args.cache) / f"{args.local}-{args.fallback}-seed{seed}-n{n}-k{args.samples}-t{args.temperature}.json"
    if path.is_file():
        return json.loads(path.read_text())
    problems, _ = arithmetic_task(ArithmeticConfig(num_examples=n, seed=seed))
    prompts = [p["prompt"] for p in problems]
    local, fallback = (LocalLM.load(models[m], batch_size=64) for m in (args.local, args.fallback))
    texts, queries = local_queries(local, prompts, args.samples, args.temperature, 64, STOP)
    fb_texts = fallback.generate(prompts, max_new_tokens=64, stop=list(STOP))
    out = {
        "queries": queries,
        "local_ok": [extract_answer(t) == p["answer"] for t, p in zip(texts, problems)],
        "fallback_ok": [extract_answer(t) == p["answer"] for t, p in zip(fb_texts, problems)],
    }
    atomic_write_json(path, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="runs/bench-arith")
    ap.add_argument("--cache", default="runs/bench-routing")
    ap.add_argument("--local", default="arith-2500")
    ap.add_argument("--fallback", default="arith-5000")
    ap.add_argument("--problems", type=int, default=300)
    ap.add_argument("--router-problems", type=int, default=400)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--test-seed", type=int, default=0, help="the test problems' seed (the routers': 7)")
    args = ap.parse_args()
    if args.test_seed == 7:
        ap.error("--test-seed 7 is the routers' training seed")
    torch.set_num_threads(2)
    models = models_in(args.root)
    test = collect(args, models, args.test_seed, args.problems)
    train = collect(args, models, 7, args.router_problems)
    lc, fc = np.array(test["local_ok"]), np.array(test["fallback_ok"])
    tq = test["queries"]
    no_gain = np.array(train["local_ok"]) | ~np.array(train["fallback_ok"])
    routers = {
        "learned-answer": (ANSWER_FEATURES, 0, train["local_ok"]),
        "learned-prompt": (PROMPT_FEATURES, 256, no_gain),
        "learned-all": ((*ANSWER_FEATURES, "agreement", *PROMPT_FEATURES), 256, no_gain),
    }
    values = {
        "mean_logprob": [q["mean_logprob"] for q in tq],
        "entropy": [-q["entropy"] for q in tq],
        "agreement": [q["agreement"] + 1e-6 * q["mean_logprob"] for q in tq],
    }
    for name, (feats, dims, keep) in routers.items():
        kw = {"samples": args.samples, "temperature": args.temperature} if "agreement" in feats else {}
        values[name] = LearnedRouter.fit(train["queries"], keep, feats, dims, **kw).predict_many(tq)
    curves = {k: cost_quality_curve(v, lc, fc) for k, v in values.items()}
    print(
        f"local {args.local}: accuracy {lc.mean():.3f}; fallback {args.fallback}: {fc.mean():.3f}; "
        f"{len(lc)} test problems (seed {args.test_seed}); routers fitted on {len(no_gain)} others (seed 7)"
    )
    print("| escalated | random | " + " | ".join(curves) + " |")
    print("|---:|---:|" + "---:|" * len(curves))
    for i, row in enumerate(curves["mean_logprob"]):
        cells = " | ".join(f"{curves[k][i]['accuracy']:.3f}" for k in curves)
        print(f"| {row['fraction_escalated']:.0%} | {row['random_accuracy']:.3f} | {cells} |")
    for k, rows in curves.items():
        inner = rows[1:-1]
        beats = sum(r["accuracy"] > r["random_accuracy"] for r in inner)
        gain = sum(r["accuracy"] - r["random_accuracy"] for r in inner) / len(inner)
        print(f"{k}: beats random at {beats}/{len(inner)} budgets (10-90%); mean gain {gain:+.3f}")


if __name__ == "__main__":
    main()
