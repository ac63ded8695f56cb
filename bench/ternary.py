"""Ternary weights (BitNet b1.58) side by side with int4 and float, one run: validation perplexity,
size on disk and batch-1 decode tokens/s of the bench model of bench/quant.py (a ~4M-parameter
Llama-shaped model trained on the stdlib, cached), then decode speed on the Llama ~110M shape.

    python bench/ternary.py                        # trains / reuses the small model of bench/quant.py
    python bench/ternary.py --qat-steps 300 --bitnet-lr 2e-4 --repeats 5

Rows: fp32; "fp32 +ft" (the float model trained for the same steps as the QAT runs: QAT also keeps
training, so this row says how much of its perplexity is extra training rather than quantization);
RTN and QAT int4-g128 (lmforge's existing methods); RTN ternary (absmean rounding without training,
to show why BitNet needs QAT); BitNet ternary (QAT with 8-bit activations). Decode speed is the
median of --repeats runs, the models interleaved; the 110M rows compare the ternary CPU kernels
(C kernel on the packed bytes, an int8 copy + torch._int_mm, unpack per call + torch._int_mm).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant import CACHE, decode_tps, disk_bytes, stdlib_text, train_small, windows  # noqa: E402

from lmforge.checkpoint import load_model, load_tokenizer_if_any  # noqa: E402
from lmforge.common import get_logger  # noqa: E402
from lmforge.model import build_model  # noqa: E402
from lmforge.quant import (  # noqa: E402
    QuantOptions,
    TernaryLinear,
    lm_loss,
    swap,
    ternary_kernel,  # noqa: E402
)
from lmforge.quant.scheme import HEAD_PATTERN  # noqa: E402
from lmforge.recipes.quantize import qat_finetune  # noqa: E402

VARIANTS = ["fp32", "fp32 +ft", "rtn int4-g128", "qat int4-g128", "rtn ternary", "bitnet ternary"]


def finetune_float(model, batches: list[torch.Tensor], lr: float) -> None:
    """The same steps, data and optimizer as QAT, in float (the control row)."""
    from lmforge.recipes._fit import FitOptions, constant_lr, run_fit
    from lmforge.train import clm_batch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    run_fit(
        model,
        opt,
        None,
        lambda s: clm_batch(batches[s % len(batches)]),
        None,
        FitOptions(len(batches), constant_lr(lr)),
    )
    model.eval()


def make_variant(name: str, base, batches: list[torch.Tensor], lr_int4: float, lr_bitnet: float):
    model = copy.deepcopy(base)
    log = get_logger("bench.ternary")
    skip = QuantOptions().skip
    if name == "fp32 +ft":
        finetune_float(model, batches, lr_bitnet)
    elif name == "qat int4-g128":
        qat_finetune(model, batches, "int4-g128", skip, len(batches), lr_int4, log)
    elif name == "bitnet ternary":
        qat_finetune(model, batches, "ternary", skip, len(batches), lr_bitnet, log)
    elif name.startswith("rtn "):
        swap(model, name.split(" ")[1], skip)
    return model.eval()


def set_kernel(model, kernel: str):
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            m.kernel = kernel
    return model


def speed_on_110m(new_tokens: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s on the Llama ~110M shape (speed depends on shapes, not on trained values)."""
    torch.manual_seed(0)
    base = build_model("llama-100m").eval()
    head_only = tuple(p for p in QuantOptions().skip if p != HEAD_PATTERN) + (r"layers",)
    models = {"fp32": base}
    models["int4-g128"] = swap(copy.deepcopy(base), "int4-g128")
    for kernel in ("c", "int8", "unpack") if ternary_kernel.available() else ("int8", "unpack"):
        models[f"ternary ({kernel})"] = set_kernel(swap(copy.deepcopy(base), "ternary"), kernel)
    # the float head (32000 x 768 fp32: 98 MB) outweighs a ternary body (21 MB): int8 heads too
    models["int4-g128 + int8 head"] = swap(swap(copy.deepcopy(base), "int4-g128"), "int8", head_only)
    models["ternary + int8 head"] = swap(swap(copy.deepcopy(base), "ternary"), "int8", head_only)
    return decode_tps(models, new_tokens, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="trained lmforge checkpoint with a tokenizer (default: bench/quant.py's)")
    p.add_argument("--train-steps", type=int, default=500, help="of the small model, if it is trained here")
    p.add_argument("--qat-steps", type=int, default=150, help="8 x 128 tokens per step, for QAT and fp32 +ft")
    p.add_argument("--int4-lr", type=float, default=2e-5, help="int4 QAT learning rate (bench/quant.py's)")
    p.add_argument("--bitnet-lr", type=float, default=2e-4, help="BitNet QAT (and fp32 +ft) learning rate")
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (fp32 always runs)")
    p.add_argument("--skip-110m", action="store_true")
    p.add_argument("--skip-small", action="store_true", help="only the 110M-shape decode speeds")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    if not args.skip_small:
        small_model_table(args, log)
    if not args.skip_110m:
        speeds = speed_on_110m(args.new_tokens, args.repeats)
        fp, int4 = speeds["fp32"], speeds["int4-g128"]
        print(
            f"\n| Llama ~110M shape, {torch.get_num_threads()} thread(s), median of {args.repeats} | tok/s | x fp32 | x int4 |"
        )
        print("|---|---|---|---|")
        print("\n".join(f"| {name} | {tps:.1f} | {tps / fp:.2f} | {tps / int4:.2f} |" for name, tps in speeds.items()))


def small_model_table(args: argparse.Namespace, log) -> None:
    path = Path(args.model) if args.model else CACHE / f"small-{args.train_steps}"
    if not args.model and not (path / "lmforge_config.json").is_file():
        log(f"training the small model ({args.train_steps} steps) -> {path}")
        train_small(path, args.train_steps, log)
    base, tok = load_model(path), load_tokenizer_if_any(path)
    train, val = stdlib_text(6_000_000)
    val_b = windows(torch.tensor(tok.encode(val[:400_000]), dtype=torch.long), 256, args.val_windows // 4, batch=4)
    batches = windows(torch.tensor(tok.encode(train[:1_000_000]), dtype=torch.long), 128, args.qat_steps, batch=8)

    rows, models = [], {}
    for name in ["fp32"] + [v for v in args.variants.split(",") if v in VARIANTS and v != "fp32"]:
        t0 = time.time()
        model = make_variant(name, base, batches, args.int4_lr, args.bitnet_lr)
        secs = time.time() - t0
        with torch.no_grad():
            ppl = math.exp(lm_loss(model, val_b))
        rows.append({"name": name, "ppl": ppl, "bytes": disk_bytes(model), "secs": secs})
        models[name] = model
        log(f"{name}: ppl {ppl:.3f} ({secs:.1f}s)")
    speeds = decode_tps(models, args.new_tokens, args.repeats)
    fp, int4 = rows[0], speeds.get("rtn int4-g128")
    print(f"\nsmall model ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params), {args.qat_steps} QAT steps")
    print(
        f"{'variant':<16} {'val ppl':>8} {'vs fp32':>8} {'disk MiB':>9} {'tok/s':>7} {'x fp32':>7} {'x int4':>7}  time"
    )
    for r in rows:
        tps = speeds[r["name"]]
        x4 = f"{tps / int4:>7.2f}" if int4 else f"{'-':>7}"
        print(
            f"{r['name']:<16} {r['ppl']:>8.3f} {100 * (r['ppl'] / fp['ppl'] - 1):>+7.1f}% {r['bytes'] / 2**20:>9.2f} "
            f"{tps:>7.1f} {tps / speeds['fp32']:>7.2f} {x4}  {r['secs']:.0f}s"
        )


if __name__ == "__main__":
    main()
