"""Speculative decoding speed-ups at batch 1, greedy, against plain decoding of the same target.

Trains (once; cached in --workdir) on the stdlib corpus: a byte-level BPE tokenizer, a target
model, a much smaller draft model (sequence-level distillation: the draft learns the target's own
greedy continuations of corpus prompts, the text it will be asked to guess) and Medusa heads
(same self-distilled data). Then, per method, tokens/s over the same prompts (median of repeats),
the ratio to plain decoding, acceptance rates, and whether the tokens equal plain greedy.

    python bench/speculative.py                # trains ~15 min the first time on 1 quiet CPU core
    python bench/speculative.py --retrain      # ignore the cache
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_model, save_model
from lmforge.infer.generate import generate
from lmforge.infer.medusa import MedusaHeads, load_medusa, medusa_generate, medusa_loss, save_medusa
from lmforge.infer.prepare import prepare_for_inference
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import DraftProposer, LookupProposer, frequent_tokens, speculative_generate
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import load_tokenizer, train_tokenizer

SHAPES = {
    "target": dict(
        hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2
    ),
    "draft": dict(
        hidden_size=128, intermediate_size=344, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    ),
}


def corpus(max_bytes: int) -> str:
    from lmforge.data.stdlib import stdlib_files

    parts, size = [], 0
    for f in stdlib_files():
        parts.append(f.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
        if size > max_bytes:
            break
    return "\n".join(parts)[:max_bytes]


def train_lm(model, batches, steps: int, lr: float, name: str) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        for g in opt.param_groups:  # warmup then cosine
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        ids, weight = batches(step)
        logits = model(ids[:, :-1])
        per_tok = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (per_tok * weight[:, 1:].flatten()).sum() / weight[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  {name} step {step} loss {loss.item():.3f}", flush=True)
    return loss.item()


def build(args, work: Path):
    text = corpus(args.corpus_bytes)
    tok = train_tokenizer([text], vocab_size=args.vocab)
    stream = torch.tensor(tok.encode(text), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    seq = args.seq_len

    def windows(_):
        starts = torch.randint(0, len(stream) - seq - 1, (args.batch_size,), generator=g)
        ids = stream[starts[:, None] + torch.arange(seq + 1)]
        return ids, torch.ones_like(ids, dtype=torch.float)

    base = dict(vocab_size=tok.vocab_size, max_position_embeddings=1024, tie_word_embeddings=True)
    t0 = time.perf_counter()
    if (work / "target").exists() and not args.retrain:  # --retrain-draft: keep the (slow) target
        target = load_model(work / "target").eval()
    else:
        torch.manual_seed(0)
        target = Transformer(
            ModelConfig.preset("tiny", **base, **{**SHAPES["target"], "num_hidden_layers": args.target_layers})
        )
        train_lm(target, windows, args.target_steps, 3e-3, "target")
        save_model(target.eval(), work / "target", tokenizer=tok)

    # The target's own greedy continuations of corpus prompts: what the draft and heads must predict.
    plen, n = 32, args.distill_rows
    starts = torch.randint(0, len(stream) - plen, (n,), generator=g)
    prompts = stream[starts[:, None] + torch.arange(plen)]
    rows = torch.cat([torch.cat([p, generate(target, p, max_new_tokens=seq - plen)], 1) for p in prompts.split(32)])
    weight = torch.ones_like(rows, dtype=torch.float)
    weight[:, :plen] = 0.2  # mostly the continuation, a little real text

    def distilled(_):
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        return rows[idx], weight[idx]

    draft = Transformer(ModelConfig.preset("tiny", **base, **SHAPES["draft"]))
    train_lm(draft, windows, args.draft_steps // 2, 3e-3, "draft (corpus)")
    train_lm(draft, distilled, args.draft_steps, 2e-3, "draft (distill)")
    save_model(draft.eval(), work / "draft", tokenizer=tok)

    target.requires_grad_(False)
    heads = MedusaHeads(target.config.hidden_size, 3)
    opt = torch.optim.AdamW(heads.parameters(), lr=3e-3)
    for step in range(args.medusa_steps):
        loss, accs = medusa_loss(target, heads, distilled(step)[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"  medusa heads top-1 accuracy {[round(a, 3) for a in accs]}")
    save_medusa(heads, work / "medusa")
    print(f"trained in {time.perf_counter() - t0:.0f}s")


def run_pair(plain, fn, prompts, repeats):
    """Tokens/s of plain decoding and of a method over the same prompts, interleaved prompt by prompt
    so that machine noise hits both alike; medians over repeats. Also the outputs and the stats."""
    rates, outs, stats = {"plain": [], "method": []}, {}, []
    for _ in range(repeats):
        secs, toks, stats = {"plain": 0.0, "method": 0.0}, {"plain": 0, "method": 0}, []
        outs = {"plain": [], "method": []}
        for p in prompts:
            for name, f in (("plain", plain), ("method", fn)):
                t = time.perf_counter()
                o, s = f(p)
                secs[name] += time.perf_counter() - t
                toks[name] += len(o)
                outs[name].append(o)
                if name == "method":
                    stats.append(s)
        for name in rates:
            rates[name].append(toks[name] / secs[name])
    return statistics.median(rates["plain"]), statistics.median(rates["method"]), outs, stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/lmforge_bench_speculative")
    ap.add_argument("--retrain", action="store_true", help="train everything again")
    ap.add_argument("--retrain-draft", action="store_true", help="train the draft and heads again, keep the target")
    ap.add_argument("--corpus-bytes", type=int, default=2_000_000)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--target-layers", type=int, default=6, help="depth of the target (width 256)")
    ap.add_argument("--target-steps", type=int, default=400)
    ap.add_argument("--draft-steps", type=int, default=2000)
    ap.add_argument("--medusa-steps", type=int, default=600)
    ap.add_argument("--distill-rows", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-k", type=int, default=6, help="draft length bound with a confidence stop")
    ap.add_argument("--min-confidence", type=float, default=0.4, help="stop drafting below this draft probability")
    ap.add_argument(
        "--draft-vocab", type=int, default=512, help="also: the draft's head over the N most frequent tokens"
    )
    ap.add_argument("--medusa-trees", default="3x2x2,2x1x1,1x1x1", help="Medusa trees to try (top-k per level)")
    ap.add_argument("--methods", default="", help="only the methods whose names contain one of these (comma-separated)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    if args.retrain or args.retrain_draft or not (work / "medusa").exists():
        build(args, work)
    # The same inference preparation (pre-transposed linears) for plain and speculative decoding.
    target = prepare_for_inference(load_model(work / "target"))
    draft = prepare_for_inference(load_model(work / "draft"))
    heads = load_medusa(work / "medusa")
    tok = load_tokenizer(work / "target")
    text = corpus(args.corpus_bytes)
    g = torch.Generator().manual_seed(123)
    ids = tok.encode(text[-200_000:])  # the corpus tail: mostly unseen by the short training runs
    prompts = [ids[s : s + 48] for s in torch.randint(0, len(ids) - 48, (args.prompts,), generator=g).tolist()]
    # Input-grounded prompts for prompt lookup: a code snippet, then its first line again (copy it).
    snippets = [ids[s : s + 64] for s in torch.randint(0, len(ids) - 64, (args.prompts,), generator=g).tolist()]
    copy_prompts = [s + tok.encode("\n\n") + s[:8] for s in snippets]
    sp = SamplingParams(max_new_tokens=args.new)
    k = args.k
    # The draft's vocabulary subset: the most frequent tokens of the text it was trained on.
    frequent = frequent_tokens(
        torch.bincount(torch.tensor(tok.encode(text)), minlength=tok.vocab_size), args.draft_vocab
    )

    def plain(p):
        return generate(target, p, max_new_tokens=args.new)[0].tolist(), None

    methods = {
        "draft model": (prompts, lambda p: speculative_generate(target, p, sp, DraftProposer(draft, 1024), k=k)),
        f"draft model (k<={args.max_k}, stop <{args.min_confidence})": (
            prompts,
            lambda p: speculative_generate(
                target, p, sp, DraftProposer(draft, 1024, args.min_confidence), k=args.max_k
            ),
        ),
        f"draft model (top-{args.draft_vocab} head)": (
            prompts,
            lambda p: speculative_generate(target, p, sp, DraftProposer(draft, 1024, vocab=frequent), k=k),
        ),
        "prompt lookup (free text)": (prompts, lambda p: speculative_generate(target, p, sp, LookupProposer(3), k=k)),
        "prompt lookup (copy task)": (
            copy_prompts,
            lambda p: speculative_generate(target, p, sp, LookupProposer(3), k=k),
        ),
    }
    for tree in args.medusa_trees.split(","):
        choices = tuple(int(c) for c in tree.split("x"))
        methods[f"medusa (tree {tree})"] = (prompts, lambda p, c=choices: medusa_generate(target, heads, p, sp, c))
    sizes = target.config.num_parameters() / 1e6, draft.config.num_parameters() / 1e6
    print(
        f"target {sizes[0]:.1f}M params, draft {sizes[1]:.2f}M,"
        f" {args.prompts} prompts x {args.new} new tokens, greedy, batch 1, k={k}, {args.threads} thread(s)"
    )
    print(f"{'method':32s} {'tok/s':>8s} {'plain':>8s} {'speed-up':>9s} {'accept':>7s} {'tok/step':>9s} same")
    wanted = [w.strip() for w in args.methods.split(",") if w.strip()]
    for name, (ps, fn) in methods.items():
        if wanted and not any(w in name for w in wanted):
            continue
        base_rate, rate, outs, stats = run_pair(plain, fn, ps, args.repeats)
        acc = sum(s.accepted for s in stats) / max(1, sum(s.proposed for s in stats))
        per_step = sum(s.new_tokens for s in stats) / max(1, sum(s.steps for s in stats))
        print(
            f"{name:32s} {rate:8.1f} {base_rate:8.1f} {rate / base_rate:8.2f}x {acc:7.2f} {per_step:9.2f} "
            f"{outs['method'] == outs['plain']}"
        )
        print("   per-request acceptance:", [round(s.acceptance_rate, 2) for s in stats])


if __name__ == "__main__":
    main()
