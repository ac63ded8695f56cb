"""Decode speed, side by side in one run: lmforge vs transformers `generate`, same weights, fp32, CPU.

    python bench/generate.py                 # GPT-2 small (124M) and a Llama-shaped ~110M model with GQA
    python bench/generate.py --models gpt2 --batches 1 --new-tokens 64 --repeats 3

Prints tokens/s (median of --repeats runs, lmforge and transformers interleaved so machine noise hits
both) for lmforge eager (pre-transposed weights) and lmforge `generate(compile=True)` (inductor with
freezing, which prepacks the weights), the ratios, and the fraction of the memory-bandwidth bound: at
batch 1 every weight is read once per token, so tokens/s <= measured read bandwidth / bytes of weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.checkpoint import load_model  # noqa: E402
from lmforge.infer.generate import generate  # noqa: E402
from lmforge.infer.prepare import prepare_for_inference  # noqa: E402

SHAPES = {"gpt2": dict(kind="gpt2"), "llama-110m": dict(kind="llama")}


def make_hf(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
        return tf.GPT2LMHeadModel(cfg).eval()
    cfg = tf.LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def read_bandwidth_gbs(mb: int = 512, repeats: int = 7) -> float:
    """Achievable weight-read bandwidth: the best of `repeats` matrix-vector products over a matrix
    much larger than the caches (what a batch-1 decode step does), with torch's threads."""
    cols = 4096
    w = torch.randn(mb * 1024 * 1024 // 4 // cols, cols)
    x = torch.randn(cols)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mv(w, x)
        best = min(best, time.perf_counter() - t)
    return w.numel() * 4 / best / 1e9


def weight_bytes_per_token(model) -> int:
    """Bytes of weights read per decoded token: every matrix once (the embedding table is only indexed)."""
    total = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "embed" in name or name.endswith("wte.weight") or name.endswith("wpe.weight"):
            continue
        total += p.numel() * p.element_size()
    if getattr(model.config, "tie_word_embeddings", False):  # the tied head is read once per token
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.model.embed_tokens
        total += emb.weight.numel() * emb.weight.element_size()
    return total


def time_hf(hf, prompt: torch.Tensor, new: int) -> float:
    mask = torch.ones_like(prompt)
    t = time.perf_counter()
    with torch.inference_mode():
        hf.generate(
            prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )
    return prompt.shape[0] * new / (time.perf_counter() - t)


def time_ours(model, prompt: torch.Tensor, new: int, compile: bool = False) -> float:
    t = time.perf_counter()
    generate(model, prompt, max_new_tokens=new, compile=compile)
    return prompt.shape[0] * new / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip the torch.compile (inductor freezing) column; compiling takes ~30 s per shape",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = read_bandwidth_gbs()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, measured read bandwidth {bw:.1f} GB/s")
    print(
        f"{'model':<12}{'batch':>6}{'transformers tok/s':>20}{'lmforge tok/s':>15}{'ratio':>7}"
        f"{'compiled tok/s':>16}{'ratio':>7}{'best % of bound':>17}"
    )
    for name in args.models:
        hf = make_hf(SHAPES[name]["kind"])
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = prepare_for_inference(load_model(d))
            plain = load_model(d).requires_grad_(False)  # compiled path: inductor prepacks nn.Linear itself
        bound = bw * 1e9 / weight_bytes_per_token(hf)
        for batch in args.batches:
            prompt = torch.randint(0, 1000, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
            # warm-up (the compiled path compiles here, outside the timing)
            time_ours(ours, prompt, 4), time_hf(hf, prompt, 4), time_ours(plain, prompt, 4, compile=args.compile)
            theirs, mine, comp = [], [], []
            for _ in range(args.repeats):
                theirs.append(time_hf(hf, prompt, args.new_tokens))
                mine.append(time_ours(ours, prompt, args.new_tokens))
                if args.compile:
                    comp.append(time_ours(plain, prompt, args.new_tokens, compile=True))
            t_med, m_med = statistics.median(theirs), statistics.median(mine)
            c_med = statistics.median(comp) if comp else float("nan")
            pct = 100 * max(m_med, c_med if comp else 0) / batch / bound
            print(
                f"{name:<12}{batch:>6}{t_med:>20.1f}{m_med:>15.1f}{m_med / t_med:>6.2f}x"
                f"{c_med:>16.1f}{c_med / t_med:>6.2f}x{pct:>16.0f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
