"""Quantization table, one run: validation perplexity, size on disk and batch-1 decode tokens/s for
fp32, bf16, RTN int8, RTN int4 g128, GPTQ int4 g128, AWQ int4 g128, SmoothQuant W8A8, QAT int4 g128
and mixed precision at a 4.5-bit budget. The peer is the fp32 model: ratios are against it.

    python bench/quant.py                       # trains a small Llama-shaped model on the stdlib first (cached)
    python bench/quant.py --model CKPT --val-text FILE   # or use a trained lmforge checkpoint

Perplexity and size come from the trained model; decode speed is measured on both the trained model
and the Llama ~110M shape (speed depends on shapes, not weight values), where decode is memory-bound:
tokens/s <= bandwidth / bytes of weights read per token. Decode speed is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.checkpoint import load_model, load_tokenizer_if_any, save_model  # noqa: E402
from lmforge.common import get_logger  # noqa: E402
from lmforge.infer.generate import generate  # noqa: E402
from lmforge.infer.prepare import prepare_for_inference  # noqa: E402
from lmforge.model import ModelConfig, build_model  # noqa: E402
from lmforge.quant import QuantOptions, lm_loss, quantize_model  # noqa: E402
from lmforge.quant.scheme import HEAD_PATTERN  # noqa: E402
from lmforge.recipes.quantize import qat_finetune  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "lmforge-bench-quant"
VARIANTS = [
    "fp32",
    "bf16",
    "rtn int8",
    "rtn int8+head",
    "rtn int4-g128",
    "gptq int4-g128",
    "awq int4-g128",
    "smoothquant w8a8",
    "qat int4-g128",
    "mixed 4.5-bit",
    "rtn int3-g128",
    "gptq int3-g128",
    "awq int3-g128",
]


def stdlib_text(max_chars: int) -> tuple[str, str]:
    """(train, validation) text from the interpreter's stdlib sources: every 10th file is validation."""
    from lmforge.data.stdlib import stdlib_files

    train, val, n = [], [], 0
    for i, f in enumerate(stdlib_files()):
        text = f.read_text(encoding="utf-8", errors="replace")
        (val if i % 10 == 0 else train).append(text)
        n += len(text)
        if n > max_chars:
            break
    return "\n".join(train), "\n".join(val)


def windows(tokens: torch.Tensor, seq: int, n: int, batch: int = 1) -> list[torch.Tensor]:
    starts = torch.linspace(0, len(tokens) - seq - 1, n * batch).long()
    rows = torch.stack([tokens[s : s + seq] for s in starts])
    return list(rows.split(batch))


def train_small(out: Path, steps: int, log, arch: str = "llama") -> Path:
    """A Llama-shaped (or GPT-2-shaped: LayerNorm, GELU, biases) ~4M-parameter model (widths
    divisible by 128) trained briefly with AdamW."""
    from lmforge.tokenizer.bpe import train_tokenizer

    train, _ = stdlib_text(6_000_000)
    tok = train_tokenizer([train[:2_000_000]], vocab_size=2048, special_tokens=["<|endoftext|>"])
    ids = torch.tensor(tok.encode(train), dtype=torch.long)
    config = ModelConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    if arch == "gpt2":
        config = ModelConfig.preset(
            "tiny-gpt2",
            vocab_size=2048,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            max_position_embeddings=512,
        )
    torch.manual_seed(0)
    model = build_model(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - 129, (8,), generator=g)
        batch = torch.stack([ids[s : s + 129] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"train step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    save_model(model.eval(), out, tokenizer=tok)
    return out


def make_variant(name: str, base, calib, qat_batches: list[torch.Tensor]):
    model = copy.deepcopy(base)
    if name == "fp32":
        return model, {}
    if name == "bf16":
        return model.to(torch.bfloat16), {}
    method, scheme = name.split(" ")
    skip = QuantOptions().skip
    if scheme.endswith("+head"):  # the output head quantized too (--quantize-head)
        scheme, skip = scheme.removesuffix("+head"), tuple(p for p in skip if p != HEAD_PATTERN)
    if method == "qat":
        qat_finetune(model, qat_batches, scheme, QuantOptions().skip, len(qat_batches), 2e-5, get_logger("bench.quant"))
        return model, {}
    if method == "mixed":
        opts = QuantOptions(method="mixed", budget_bits=4.5, choices=("int4-g128", "int8"))
    else:
        opts = QuantOptions(method=method, scheme=scheme, skip=skip)
    stats = quantize_model(model, opts, calib, progress=False)
    return model, stats


def disk_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        save_model(model, Path(d) / "m")
        return sum(f.stat().st_size for f in (Path(d) / "m").glob("*.safetensors"))


def decode_tps(models: dict, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median batch-1 decode tokens/s per model; runs interleave the models so machine noise hits all."""
    prompt = list(range(1, 17))
    for m in models.values():
        prepare_for_inference(m)
        generate(m, prompt, max_new_tokens=4)  # warm-up (kernel prepacking, allocator)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            generate(m, prompt, max_new_tokens=new_tokens)
            rates[name].append(new_tokens / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def speed_on_110m(new_tokens: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s of the Llama ~110M shape per storage format. GPTQ, AWQ and QAT store what RTN
    int4 stores (AWQ folds its scales into the norms on Llama shapes), so one int4 row covers them."""
    torch.manual_seed(0)
    base = build_model("llama-100m").eval()
    calib = [torch.randint(0, 32000, (1, 512))]
    models = {}
    for name in ["fp32", "bf16", "rtn int8", "rtn int8+head", "rtn int4-g128", "smoothquant w8a8"]:
        models[name] = base if name == "fp32" else make_variant(name, base, calib, [])[0]
    return decode_tps(models, new_tokens, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="trained lmforge checkpoint with a tokenizer (default: train one)")
    p.add_argument("--val-text", help="validation text file (default: held-out stdlib files)")
    p.add_argument("--arch", default="llama", choices=["llama", "gpt2"], help="shape of the small model trained")
    p.add_argument("--train-steps", type=int, default=500, help="8 x 128 tokens per step")
    p.add_argument("--qat-steps", type=int, default=150)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (fp32 always runs)")
    p.add_argument("--skip-110m", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    path = (
        Path(args.model) if args.model else CACHE / f"small-{'' if args.arch == 'llama' else 'gpt2-'}{args.train_steps}"
    )
    if not args.model and not (path / "lmforge_config.json").is_file():
        log(f"training the small model ({args.train_steps} steps) -> {path}")
        train_small(path, args.train_steps, log, args.arch)
    base, tok = load_model(path), load_tokenizer_if_any(path)
    train, val = stdlib_text(6_000_000)
    if args.val_text:
        val = Path(args.val_text).read_text(encoding="utf-8")
    val_ids = torch.tensor(tok.encode(val[:400_000]), dtype=torch.long)
    train_ids = torch.tensor(tok.encode(train[:1_000_000]), dtype=torch.long)
    val_b = windows(val_ids, 256, args.val_windows // 4, batch=4)
    calib = windows(train_ids, 256, args.calib_samples)
    # QAT continues training on the training distribution (not the few calibration windows).
    qat_batches = windows(train_ids, 128, args.qat_steps, batch=8)

    rows, models = [], {}
    for name in ["fp32"] + [v for v in args.variants.split(",") if v in VARIANTS and v != "fp32"]:
        t0 = time.time()
        model, stats = make_variant(name, base, calib, qat_batches)
        secs = time.time() - t0
        ppl = math.exp(lm_loss(model, val_b))
        rows.append(
            {
                "name": name,
                "ppl": ppl,
                "bytes": disk_bytes(model),
                "secs": secs,
                "peak": stats.get("peak_rss_bytes"),
                "bits": stats.get("average_bits"),
            }
        )
        models[name] = model
        log(f"{name}: ppl {ppl:.3f} ({secs:.1f}s)")
    speeds = decode_tps(models, args.new_tokens, args.repeats)
    for r in rows:
        r["tps"] = speeds[r["name"]]
    fp = rows[0]
    print(
        f"\nsmall model ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params, "
        f"{val_ids.numel()} validation tokens, {len(calib)}x256 calibration tokens)"
    )
    print(
        f"{'variant':<18} {'val ppl':>8} {'vs fp32':>8} {'disk MiB':>9} {'x smaller':>9} {'tok/s':>7} {'x fp32':>6}  quantize"
    )
    for r in rows:
        extra = f"{r['secs']:.1f}s" + (f", peak RSS {r['peak'] / 2**20:.0f} MiB" if r["peak"] else "")  # reset per run
        extra += f", {r['bits']:.2f} avg bits" if r["bits"] else ""
        print(
            f"{r['name']:<18} {r['ppl']:>8.3f} {100 * (r['ppl'] / fp['ppl'] - 1):>+7.2f}% {r['bytes'] / 2**20:>9.2f} "
            f"{fp['bytes'] / r['bytes']:>9.2f} {r['tps']:>7.1f} {r['tps'] / fp['tps']:>6.2f}  {extra}"
        )
    if not args.skip_110m:
        speeds = speed_on_110m(args.new_tokens, args.repeats)
        print(
            f"\nLlama ~110M shape, batch-1 decode ({args.new_tokens} new tokens, median of {args.repeats}, "
            f"{torch.get_num_threads()} threads)"
        )
        for name, tps in speeds.items():
            print(f"{name:<18} {tps:>7.1f} tok/s  {tps / speeds['fp32']:>5.2f}x fp32")


if __name__ == "__main__":
    main()
