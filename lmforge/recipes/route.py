"""Train the learned router of edge-cloud routing (`lmforge serve --fallback URL --route-signal learned
--router FILE`): the local model answers a task's questions; a logistic regression learns from
those which answers to keep.

    lmforge route train --model runs/small/final --task arithmetic -o router.json
    lmforge route train --model runs/small/final --fallback runs/big/final --task qa.jsonl -o router.json

--task is the built-in arithmetic task or a JSONL file with "prompt" and "answer" per line (an answer
is right when its final answer, router_model.answer_key, equals the reference's). Without --fallback
the label is "the local answer is right"; with --fallback (a model folder or endpoint URL) it is
"the local answer is right or the fallback's is wrong too" (escalating would not help), which is what
a budgeted router should rank by. The questions are split (--test-fraction held out, by --seed); the
router is fitted on the rest and its held-out figures are printed and stored in the file: AUC of its
P(keep) and, with --fallback, the cost-quality curve (accuracy vs fraction escalated) next to random
routing's. --features picks what it reads: answer (the local answer's log-probabilities), agreement
(--samples answers sampled at --temperature; serve samples the same way), prompt (lengths, digit and
number counts), ngrams (--ngram-dims hashed character n-grams of the prompt).
"""

from __future__ import annotations

import argparse
import random

from lmforge.common import LmforgeError, get_logger
from lmforge.recipes._common import bounded

log = get_logger("lmforge.route")
GROUPS = ("answer", "agreement", "prompt", "ngrams")
STOP = ("\n\n", "Q:")  # the arithmetic task's answer ends at a blank line or the next question


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    t = sub.add_parser("train", help="fit a learned router on which of a task's queries to keep local")
    t.add_argument("--model", required=True, help="the local model folder (its log-probabilities are features)")
    t.add_argument("--fallback", help="the fallback: a model folder or endpoint URL (label: would escalating help)")
    t.add_argument("--task", default="arithmetic", help="'arithmetic' (built-in) or a JSONL with prompt and answer")
    t.add_argument("--limit", type=bounded(int, ge=4), default=500, help="questions used (default: %(default)s)")
    t.add_argument(
        "--features",
        default="answer,agreement,prompt,ngrams",
        help=f"comma-separated feature groups: {','.join(GROUPS)} (default: all)",
    )
    t.add_argument("--samples", type=bounded(int, ge=1), default=5, help="agreement: sampled answers per question")
    t.add_argument("--temperature", type=bounded(float, gt=0.0), default=0.7, help="agreement: their temperature")
    t.add_argument("--ngram-dims", type=bounded(int, ge=1), default=256, help="ngrams: hash buckets")
    t.add_argument("--max-new-tokens", type=bounded(int, ge=1), default=64)
    t.add_argument("--stop", action="append", default=None, help='stop string (default: "\\n\\n" and "Q:")')
    t.add_argument("--test-fraction", type=bounded(float, gt=0.0, lt=1.0), default=0.3, help="held out")
    t.add_argument("--seed", type=bounded(int, ge=0), default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("-o", "--out", required=True, help="the router JSON to write")


def load_task(task: str, limit: int, seed: int) -> tuple[list[str], list[str], object]:
    """(prompts, reference answers, grade(text, reference) -> bool) of the built-in arithmetic task or
    a JSONL file (fields prompt and answer)."""
    from lmforge.common import read_jsonl
    from lmforge.serve.router_model import answer_key

    if task == "arithmetic":
        from lmforge.eval.reasoning import ArithmeticConfig, arithmetic_task, extract_answer

        problems, _ = arithmetic_task(ArithmeticConfig(num_examples=limit, seed=seed))
        return (
            [p["prompt"] for p in problems],
            [str(p["answer"]) for p in problems],
            (lambda text, ref: str(extract_answer(text)) == ref),
        )
    prompts, answers = [], []
    for where, row in read_jsonl(task, "task file"):
        prompt, answer = row.get("prompt"), row.get("answer")
        if not isinstance(prompt, str) or not prompt:
            raise LmforgeError(f"{where}: field 'prompt' must be a non-empty string")
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or str(answer).strip() == "":
            raise LmforgeError(f"{where}: field 'answer' must be a non-empty string or a number")
        prompts.append(prompt)
        answers.append(str(answer))
    return prompts[:limit], answers[:limit], lambda text, ref: answer_key(text) == answer_key(ref)


def answer_with_entries(lm, prompts: list[str], max_new_tokens: int, stop) -> tuple[list[str], list[list]]:
    """Greedy answers of a LocalLM and their (token, logprob, top alternatives) entries, the numbers
    the server's engine reports while decoding (here by scoring the greedy answer)."""
    import torch

    from lmforge.eval.lm import encode_pair
    from lmforge.serve.routing import ROUTE_TOP_LOGPROBS

    texts = lm.generate(prompts, max_new_tokens=max_new_tokens, stop=list(stop))
    out = []
    with torch.inference_mode():
        for p, t in zip(prompts, texts):
            ctx, cont = encode_pair(lm.tokenizer, p, t)
            if not cont:
                out.append([])
                continue
            ids = torch.tensor([ctx + cont], device=next(lm.model.parameters()).device)
            logp = torch.log_softmax(lm.model(ids[:, :-1]).float(), -1)[0, len(ctx) - 1 :]
            top = logp.topk(ROUTE_TOP_LOGPROBS, -1)
            alts = zip(top.indices.tolist(), top.values.tolist())
            out.append([(tok, float(logp[i, tok]), list(zip(*a))) for i, (tok, a) in enumerate(zip(cont, alts))])
    return texts, out


def local_queries(lm, prompts: list[str], samples: int, temperature: float, max_new_tokens: int, stop) -> tuple:
    """(greedy texts, per prompt a router query): what serve computes for a request, for a LocalLM:
    the prompt as the server sees it (its ids decoded), the answer's entries, `samples` sampled answers."""
    from lmforge.serve.router_model import query

    texts, entries = answer_with_entries(lm, prompts, max_new_tokens, stop)
    sampled = [
        lm.generate(prompts, max_new_tokens=max_new_tokens, stop=list(stop), temperature=temperature, seed=j + 1)
        for j in range(samples)
    ]
    seen = [lm.tokenizer.decode(lm.tokenizer.encode(p)) for p in prompts]
    qs = [
        query(seen[i], entries[i], [s[i] for s in sampled] if samples else None, texts[i]) for i in range(len(prompts))
    ]
    return texts, qs


def feature_names(groups: list[str]) -> tuple[list[str], bool]:
    from lmforge.serve.router_model import ANSWER_FEATURES, PROMPT_FEATURES

    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        raise LmforgeError(f"--features {','.join(groups)!r}: choose from {', '.join(GROUPS)}")
    named = {"answer": list(ANSWER_FEATURES), "agreement": ["agreement"], "prompt": list(PROMPT_FEATURES)}
    return [f for g in groups for f in named.get(g, [])], "ngrams" in groups


def auc(scores, labels) -> float | None:
    """P(a random positive scores above a random negative), ties half (None with one class only)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def main(args: argparse.Namespace) -> int:
    from lmforge.eval.lm import LocalLM, load_lm
    from lmforge.serve.router_model import LearnedRouter
    from lmforge.serve.routing import cost_quality_curve

    if args.model.startswith(("http://", "https://")):
        raise LmforgeError(
            f"--model {args.model!r}: give a local model folder (the router reads its log-probabilities)"
        )
    groups = [g.strip() for g in args.features.split(",") if g.strip()]
    names, ngrams = feature_names(groups)
    samples = args.samples if "agreement" in groups else 0
    prompts, refs, grade = load_task(args.task, args.limit, args.seed)
    if len(prompts) < 4:
        raise LmforgeError(f"--task {args.task}: {len(prompts)} questions; a router needs at least 4")
    stop = STOP if args.stop is None else args.stop
    log.info("answering %d questions with %s (%d samples each)", len(prompts), args.model, samples)
    texts, qs = local_queries(LocalLM.load(args.model, device=args.device), prompts, samples, args.temperature,
                              args.max_new_tokens, stop)  # fmt: skip
    local_ok = [grade(t, r) for t, r in zip(texts, refs)]
    fallback_ok = None
    if args.fallback:
        log.info("answering them with the fallback %s", args.fallback)
        fb = load_lm(args.fallback, device=args.device)
        fb_texts = fb.generate(prompts, max_new_tokens=args.max_new_tokens, stop=list(stop))
        fallback_ok = [grade(t, r) for t, r in zip(fb_texts, refs)]
    keep = local_ok if fallback_ok is None else [lo or not fo for lo, fo in zip(local_ok, fallback_ok)]
    order = list(range(len(prompts)))
    random.Random(args.seed).shuffle(order)
    n_test = max(1, round(len(order) * args.test_fraction))
    test, train = order[:n_test], order[n_test:]
    label = "local_right" if fallback_ok is None else "no_gain"
    router = LearnedRouter.fit(
        [qs[i] for i in train],
        [keep[i] for i in train],
        names,
        args.ngram_dims if ngrams else 0,
        seed=args.seed,
        samples=samples,
        temperature=args.temperature,
        label=label,
    )
    p = router.predict_many([qs[i] for i in test]).tolist()
    info: dict = {
        "model": args.model,
        "fallback": args.fallback,
        "task": args.task,
        "train": len(train),
        "test": len(test),
        "split_seed": args.seed,
        "local_accuracy": sum(local_ok) / len(local_ok),
        "heldout_auc": auc(p, [keep[i] for i in test]),
    }
    print(f"local {args.model}: {sum(local_ok)}/{len(local_ok)} right", end="")
    if fallback_ok is not None:
        info["fallback_accuracy"] = sum(fallback_ok) / len(fallback_ok)
        print(f"; fallback {args.fallback}: {sum(fallback_ok)}/{len(fallback_ok)} right", end="")
        curve = cost_quality_curve(p, [local_ok[i] for i in test], [fallback_ok[i] for i in test])
        info["heldout_curve"] = curve
    auc_text = "n/a (one class held out)" if info["heldout_auc"] is None else f"{info['heldout_auc']:.3f}"
    print(f"\nrouter ({label}, features {','.join(groups)}, l2 {router.l2:g}) fitted on {len(train)}, "
          f"held-out {len(test)}: AUC {auc_text}")  # fmt: skip
    if fallback_ok is not None:
        print(f"{'escalated':>9} {'router':>7} {'random':>7} {'threshold':>9}")
        for r in curve:
            th = "" if r["threshold"] is None else f"{r['threshold']:.3f}"
            print(f"{r['fraction_escalated']:>9.2f} {r['accuracy']:>7.3f} {r['random_accuracy']:>7.3f} {th:>9}")
    router.info = info
    router.save(args.out)
    print(f"wrote {args.out}: serve with --fallback URL --route-signal learned --router {args.out}")
    return 0
