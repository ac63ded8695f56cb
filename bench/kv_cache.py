"""The KV cache's claim, measured: greedy decoding with the cache (each step feeds one token and
attends to the cached keys/values) against without it (each step re-runs the whole sequence), as
the sequence grows. With the cache a token costs about the same at every length, so the total is
linear in the length; without it a token costs time proportional to the length, so the total is
quadratic. Printed side by side, with the fitted exponent of total time against length.

    python bench/kv_cache.py                                  # the "small" preset, up to 1024 tokens
    python bench/kv_cache.py --preset tiny --max-len 512 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.model import KVCache, build_model  # noqa: E402


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, steps: int, cache: bool, marks: list[int]) -> dict[int, float]:
    """Greedy decode `steps` tokens; {sequence length: seconds since the start} at each mark."""
    ids, times, t0 = prompt, {}, time.perf_counter()
    kv = KVCache.for_model(model, 1, prompt.shape[1] + steps) if cache else None
    logits = model(ids, kv_cache=kv, start_pos=0, logits_to_keep=1) if cache else model(ids, logits_to_keep=1)
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        if cache:
            logits = model(nxt, kv_cache=kv, start_pos=ids.shape[1])
        ids = torch.cat([ids, nxt], 1)
        if not cache:
            logits = model(ids, logits_to_keep=1)  # the whole sequence again
        if ids.shape[1] in marks:
            times[ids.shape[1]] = time.perf_counter() - t0
    return times, ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.preset, max_position_embeddings=max(args.max_len, 64)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len))
    steps = args.max_len - args.prompt_len
    marks = [m for m in (32, 64, 128, 256, 512, 1024, 2048, 4096) if args.prompt_len < m <= args.max_len]
    decode(model, prompt, 8, True, [])  # warm-up
    with_cache, ids_a = decode(model, prompt, steps, True, marks)
    without, ids_b = decode(model, prompt, steps, False, marks)
    same = torch.equal(ids_a, ids_b)
    print(
        f"preset {args.preset}, {args.threads} threads, prompt {args.prompt_len}; "
        f"same tokens with and without the cache: {same}"
    )
    print(
        f"{'length':>6} | {'cached total s':>14} {'ms/token':>9} | {'uncached total s':>16} {'ms/token':>9} | {'ratio':>6}"
    )
    prev = (args.prompt_len, 0.0, 0.0)
    for m in marks:
        a, b = with_cache[m], without[m]
        n = m - prev[0]
        print(
            f"{m:>6} | {a:>14.3f} {1000 * (a - prev[1]) / n:>9.2f} | {b:>16.3f} {1000 * (b - prev[2]) / n:>9.2f} | "
            f"{b / a:>6.1f}"
        )
        prev = (m, a, b)
    lengths = np.log(marks)
    for name, t in (("cached", with_cache), ("uncached", without)):
        slope = np.polyfit(lengths[-3:], np.log([t[m] for m in marks[-3:]]), 1)[0]
        print(f"{name}: total time grows as length^{slope:.2f} over the last three lengths")


if __name__ == "__main__":
    main()
