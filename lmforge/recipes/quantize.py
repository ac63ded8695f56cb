"""Quantize a model: RTN (int8, int4/3/2 group-wise, NF4), GPTQ, AWQ, SmoothQuant W8A8, QAT
(short fake-quant fine-tune on the calibration text, then converted), BitNet b1.58 (QAT to ternary
weights with 8-bit activations, stored 2-bit packed) or mixed precision under a bits budget.
Writes an lmforge checkpoint that loads, generates and serves without re-quantizing.

    lmforge quantize --model ckpt --out ckpt-int4 --method gptq --scheme int4-g128 --calib data/out
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.common import LmforgeError, get_logger, human_bytes, seed_everything
from lmforge.model import has_transform

if TYPE_CHECKING:
    import torch
from lmforge.recipes._common import bounded

METHODS = ("rtn", "gptq", "awq", "smoothquant", "mixed", "qat", "bitnet")  # literal: --help must not import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (lmforge checkpoint or Hugging Face folder)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is a non-empty folder lmforge did not write"
    )
    p.add_argument("--method", default="rtn", choices=METHODS)
    p.add_argument(
        "--scheme",
        help="int8 | int4 | int3 | int2 [-g32|-g64|-g128] | nf4 | w8a8 | ternary | q8_0 | q4_0 "
        "(default int4-g128; bitnet: ternary, the only one it makes; q8_0/q4_0: llama.cpp's blocks, "
        "decoded by lmforge's C kernels)",
    )
    p.add_argument("--calib", help="calibration data: a packed-shard folder (index.json) or a text file")
    p.add_argument("--calib-split", default="train", help="split of the packed shards to read")
    p.add_argument("--calib-samples", type=bounded(int, ge=1), default=32, help="windows of --seq-len tokens")
    p.add_argument("--seq-len", type=bounded(int, ge=2), default=256)
    p.add_argument("--min-calib-tokens", type=bounded(int, ge=0), default=512)
    p.add_argument(
        "--skip",
        action="append",
        help="regex of module names kept in float (repeatable; default: lm_head, MoE routers, embeddings)",
    )
    p.add_argument(
        "--quantize-head",
        action="store_true",
        help="quantize the output head too (kept in float by default; with int8 it costs almost no "
        "accuracy and speeds up decode of large-vocabulary models; a tied head is untied)",
    )
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation")
    p.add_argument("--damp", type=bounded(float, gt=0), default=0.01, help="GPTQ: Hessian dampening")
    p.add_argument("--alpha", type=bounded(float, ge=0, le=1), default=0.5, help="SmoothQuant: migration strength")
    p.add_argument("--budget-bits", type=bounded(float, gt=0, le=16), default=4.5, help="mixed: average weight bits")
    p.add_argument("--choices", default="int4-g128,int8", help="mixed: candidate schemes, comma-separated")
    p.add_argument("--qat-steps", type=bounded(int, ge=1), default=100, help="qat, bitnet: fine-tuning steps")
    p.add_argument("--qat-lr", type=bounded(float, gt=0), default=1e-4)
    p.add_argument("--seed", type=bounded(int, ge=0), default=0)


def main(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import check_output_dir, load_model, load_tokenizer_if_any, save_model
    from lmforge.quant import QuantOptions, quantize_model
    from lmforge.quant.calibrate import peak_rss_bytes
    from lmforge.quant.scheme import HEAD_PATTERN

    log = get_logger("lmforge.quantize")
    args.scheme = resolve_scheme(args.method, args.scheme)
    check_output_dir(args.out, [args.model, args.calib], args.overwrite)  # before the (slow) quantization
    seed_everything(args.seed)
    model = load_model(args.model, device="cpu", dtype="float32")
    if has_transform(model, "quant"):
        raise LmforgeError(f"{args.model} is already quantized")
    tokenizer = load_tokenizer_if_any(args.model)
    calib = None
    if args.method not in ("rtn",):
        if not args.calib:
            raise LmforgeError(f"--method {args.method} needs calibration data: --calib SHARDS_DIR_OR_TEXT_FILE")
        calib = calibration_batches(args.calib, tokenizer, args.calib_samples, args.seq_len, args.calib_split)
    opts = QuantOptions(
        method="rtn" if args.method in ("qat", "bitnet") else args.method,
        scheme=args.scheme,
        damp=args.damp,
        act_order=args.act_order,
        alpha=args.alpha,
        budget_bits=args.budget_bits,
        choices=tuple(c.strip() for c in args.choices.split(",") if c.strip()),
        min_calib_tokens=args.min_calib_tokens,
    )
    if args.skip:
        opts.skip = tuple(args.skip)
    if args.quantize_head:
        opts.skip = tuple(p for p in opts.skip if p != HEAD_PATTERN)
    t0 = time.time()
    if args.method in ("qat", "bitnet"):
        qat_finetune(model, calib, opts.scheme, opts.skip, args.qat_steps, args.qat_lr, log)
        stats = {"peak_rss_bytes": peak_rss_bytes()}
    else:
        stats = quantize_model(model, opts, calib)
    out = save_model(model, args.out, tokenizer=tokenizer)
    report = {
        "method": args.method,
        "scheme": args.scheme,
        "seconds": round(time.time() - t0, 1),
        "size_before": folder_bytes(Path(args.model)),
        "size_after": folder_bytes(out),
        "peak_rss": human_bytes(stats["peak_rss_bytes"]),
    }
    if "average_bits" in stats:
        report["average_bits"] = round(stats["average_bits"], 3)
    print(json.dumps(report, indent=2))
    log.info("wrote %s (%s -> %s)", out, human_bytes(report["size_before"]), human_bytes(report["size_after"]))
    return 0


def resolve_scheme(method: str, scheme: str | None) -> str:
    """--scheme's default for the method; bitnet makes ternary weights and nothing else."""
    if method != "bitnet":
        return scheme or "int4-g128"
    if scheme is not None and scheme.strip().lower() != "ternary":
        raise LmforgeError(
            f"--method bitnet makes ternary weights: --scheme {scheme!r} cannot be honoured "
            "(leave --scheme out, or use --method qat for an int scheme)"
        )
    return "ternary"


def calibration_batches(source: str, tokenizer, samples: int, seq_len: int, split: str = "train") -> list[torch.Tensor]:
    """`samples` windows [1, seq_len] spread evenly over a packed-shard split or a tokenized text file."""
    import numpy as np
    import torch

    path = Path(source)
    if (path / "index.json").is_file() or path.name == "index.json":
        from lmforge.data.shards import read_index

        index, folder = read_index(path)
        if split not in index["splits"]:
            raise LmforgeError(f"{folder}/index.json has no split {split!r} (splits: {', '.join(index['splits'])})")
        tokens = np.concatenate(
            [np.fromfile(folder / s["file"], dtype=index["dtype"]) for s in index["splits"][split]["shards"]]
            or [np.zeros(0, np.int64)]
        )
    elif path.is_file():
        if tokenizer is None:
            raise LmforgeError(f"--calib {source} is text but the model has no tokenizer.json; pass packed shards")
        tokens = np.array(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")), dtype=np.int64)
    else:
        raise LmforgeError(f"--calib {source}: not a packed-shard folder (index.json) or a text file")
    n = min(samples, len(tokens) // seq_len)
    if n == 0:
        raise LmforgeError(f"--calib {source}: {len(tokens)} tokens, fewer than one window of --seq-len {seq_len}")
    starts = np.linspace(0, len(tokens) - seq_len, n).astype(np.int64)
    return [torch.from_numpy(tokens[s : s + seq_len].astype(np.int64))[None] for s in starts]


def qat_finetune(model, batches, scheme: str, skip, steps: int, lr: float, log) -> None:
    """Fake-quantize the linears and fine-tune briefly with the causal LM loss; the STE lets the
    float weights settle where rounding hurts least. `quantize_model` then rounds them for real.
    The `ternary` scheme trains BitNet b1.58 layers (ternary weights, 8-bit activations)."""
    import torch

    from lmforge.quant import convert_bitnet, convert_qat, parse_scheme, prepare_bitnet, prepare_qat
    from lmforge.recipes._fit import FitOptions, constant_lr, run_fit
    from lmforge.train import clm_batch

    ternary = parse_scheme(scheme)["format"] == "ternary"
    if ternary:
        prepare_bitnet(model, skip)
    else:
        prepare_qat(model, scheme, skip)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    # train.fit's step with its LM loss; no run folder: quantize writes only --out
    summary = run_fit(
        model,
        opt,
        None,
        lambda step: clm_batch(batches[step % len(batches)]),
        None,
        FitOptions(steps, constant_lr(lr)),
        device=next(model.parameters()).device,
    )
    log.info("qat: %d steps, final loss %.4f", summary["steps"], summary["final_loss"])
    model.eval()
    # the packed format, rounded exactly as training saw; recorded in the manifest
    (convert_bitnet if ternary else convert_qat)(model)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))
