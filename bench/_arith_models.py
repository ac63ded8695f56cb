"""Tiny models of graded skill on the arithmetic task (lmforge/eval/reasoning.py), shared by the
reasoning, routing and arena benches: one run of a tiny Llama on a stream of worked problems, saved
at several step counts (fewer steps: a weaker model). Cached under --root; not a test."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.checkpoint import save_model  # noqa: E402
from lmforge.eval.reasoning import ArithmeticConfig, make_problem  # noqa: E402
from lmforge.model import build_model  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402


def corpus(n: int, seed: int) -> str:
    """Worked problems, blank-line separated, from a seed other than the eval task's (seed 0)."""
    rng, cfg = random.Random(seed), ArithmeticConfig()
    return "".join(p["question"] + p["solution"] + "\n" for p in (make_problem(rng, cfg) for _ in range(n)))


def lr_at(step: int, last: int, decay_from: int = 2500, peak: float = 3e-3) -> float:
    """Warm-up over 50 steps, constant, then linear decay to 0 from `decay_from` to the last step."""
    if step > decay_from and last > decay_from:
        return peak * (last - step + 1) / (last - decay_from + 1)
    return peak * min(1.0, step / 50)


def train_models(root: str | Path, saves: tuple[int, ...] = (300, 1000, 2500, 5000), seed: int = 1) -> dict[str, Path]:
    """{"arith-<steps>": folder} for every step count in `saves` (trained once, then reused; a run
    whose later saves are missing resumes from its latest save, with a fresh optimizer)."""
    root = Path(root)
    out = {f"arith-{s}": root / f"arith-{s}" for s in saves}
    done = [s for s in saves if (out[f"arith-{s}"] / "tokenizer.json").is_file()]
    if len(done) == len(saves):
        return out
    torch.manual_seed(seed)
    t0 = time.time()
    docs = corpus(6000, seed).split("\n\n")
    if done:
        from lmforge.checkpoint import load_model, load_tokenizer_if_any

        start = max(done)
        model, tok = load_model(out[f"arith-{start}"]).train(), load_tokenizer_if_any(out[f"arith-{start}"])
        torch.manual_seed(seed + start)  # other batches than the first run's
    else:
        start = 0
        tok = train_tokenizer(docs, vocab_size=270)  # few merges: digits stay single tokens
        model = build_model(
            "tiny", vocab_size=tok.vocab_size, hidden_size=96, intermediate_size=256, num_hidden_layers=2
        )
    ids = torch.tensor([t for d in docs for t in tok.encode(d + "\n\n")])
    print(f"{len(ids)} training tokens, from step {start} ({time.time() - t0:.0f} s)", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    seq, batch = 128, 16
    for step in range(start + 1, max(saves) + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, max(saves))
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s : s + seq + 1] for s in starts.tolist()])
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
        if step in saves:
            model.eval()
            save_model(model, out[f"arith-{step}"], tokenizer=tok)
            model.train()
    return out


def models_in(root: str | Path) -> dict[str, Path]:
    """The models already under `root` ({"arith-<steps>": folder}, by steps); trains them if there are none."""
    found = {p.name: p for p in Path(root).glob("arith-*") if (p / "tokenizer.json").is_file()}
    if not found:
        return train_models(root)
    return dict(sorted(found.items(), key=lambda kv: int(kv[0].split("-")[1])))


if __name__ == "__main__":
    print(train_models(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-arith"))
