"""Engine throughput: aggregate generated tokens/s with 1, 4, 16 and 32 concurrent requests through
lmforge's continuous-batching engine, vs the same prompts through transformers `generate` one at a
time and in left-padded batches of 8. Same random GPT-2-shaped weights on both sides (saved by
transformers, loaded by lmforge), greedy, no early stop. Medians of --repeats runs, the paths taking
turns within each repeat; ratios are the medians of the repeats' own ratios.

    python bench/engine.py            # a few minutes on 2 idle CPU cores
    python bench/engine.py --layers 12 --hidden 768 --vocab 50257   # GPT-2 small (slow on CPU)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def build_models(args):
    import transformers as tf

    from lmforge.checkpoint import load_model

    torch.manual_seed(0)
    cfg = tf.GPT2Config(
        vocab_size=args.vocab,
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=args.hidden // 64,
        n_positions=1024,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf = tf.GPT2LMHeadModel(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d).eval()
    return hf, ours


def prompts_for(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, vocab, (int(torch.randint(16, 49, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


@torch.inference_mode()
def hf_generate(hf, prompts: list[list[int]], batch: int, new: int) -> list[list[int]]:
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        T = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, T - len(p) :] = torch.tensor(p)
            mask[j, T - len(p) :] = 1
        res = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )
        out += res[:, T:].tolist()
    return out


def engine_generate(model, prompts: list[list[int]], new: int, block_size: int) -> list[list[int]]:
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    engine = Engine(
        model,
        max_seqs=max(32, len(prompts)),
        block_size=block_size,
        num_blocks=len(prompts) * 8 + 16,
        prefix_caching=False,
    )
    return engine.generate_batch(prompts, SamplingParams(max_new_tokens=new))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--new", type=int, default=32, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="2+ only on an idle machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf, ours = build_models(args)
    prompts = prompts_for(32, args.vocab)
    n, bs = args.new, args.block_size

    # Parity first: the engine and transformers agree on greedy tokens.
    same = engine_generate(ours, prompts[:4], n, bs) == hf_generate(hf, prompts[:4], 1, n)
    print(
        f"model: GPT-2 shape, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; "
        f"{n} new tokens/request; greedy tokens equal to transformers: {same}"
    )

    paths = {  # name -> (run it, tokens it generates)
        "transformers one-at-a-time": (lambda: hf_generate(hf, prompts[:4], 1, n), 4 * n),
        "transformers padded batch 8": (lambda: hf_generate(hf, prompts[:16], 8, n), 16 * n),
        "lmforge engine, 1 concurrent": (lambda: [engine_generate(ours, [p], n, bs) for p in prompts[:4]], 4 * n),
    }
    for c in (4, 16, 32):
        paths[f"lmforge engine, {c} concurrent"] = (lambda c=c: engine_generate(ours, prompts[:c], n, bs), c * n)
    runs = {name: [] for name in paths}
    for _ in range(args.repeats):  # the paths take turns within each repeat: a drift in the machine's speed hits all
        for name, (fn, tokens) in paths.items():
            start = time.perf_counter()
            fn()
            runs[name].append(tokens / (time.perf_counter() - start))

    print(f"{'path':40s} {'tokens/s':>10s}   (median of {args.repeats} runs)")
    for name, rates in runs.items():
        print(f"{name:40s} {statistics.median(rates):10.1f}")

    def ratio(a: str, b: str) -> str:  # the median of the repeats' own ratios
        values = [x / y for x, y in zip(runs[a], runs[b])]
        return f"{statistics.median(values):.2f}x (repeats {', '.join(f'{v:.2f}' for v in values)})"

    one, b8 = "lmforge engine, 1 concurrent", "transformers padded batch 8"
    print(f"engine 16 concurrent / engine 1:        {ratio('lmforge engine, 16 concurrent', one)}; target >= 4x")
    print(f"engine 16 concurrent / transformers b8: {ratio('lmforge engine, 16 concurrent', b8)}; target > 1x")
    print(f"engine 32 concurrent / transformers b8: {ratio('lmforge engine, 32 concurrent', b8)}")
    print(f"engine 1 / transformers one-at-a-time:  {ratio(one, 'transformers one-at-a-time')}")


if __name__ == "__main__":
    main()
