"""Convert between a Hugging Face model folder and an lmforge checkpoint.

lmforge convert --from-hf HF_DIR --out LMFORGE_DIR     (import: weights, config, tokenizer, chat template)
lmforge convert --to-hf LMFORGE_DIR --out HF_DIR       (export: `transformers` loads the result)
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="Hugging Face folder to import")
    src.add_argument("--to-hf", metavar="DIR", help="lmforge checkpoint to export")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--dtype", default=None, help="convert weights to this dtype (float32, bfloat16, float16)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is a non-empty folder lmforge did not write"
    )


def main(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import check_output_dir, load_model, load_tokenizer_if_any, save_hf, save_model

    src = args.from_hf or args.to_hf
    check_output_dir(args.out, [src], args.overwrite)  # before the (slow) load: fail fast
    model = load_model(src, dtype=args.dtype)
    tokenizer = load_tokenizer_if_any(src)
    (save_model if args.from_hf else save_hf)(model, args.out, tokenizer=tokenizer)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({model.config.arch}, {n / 1e6:.1f}M parameters{', with tokenizer' if tokenizer else ''})")
    return 0
