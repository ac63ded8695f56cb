"""Convert between Hugging Face folders, GGUF files and lmforge checkpoints.

lmforge convert --from-hf HF_DIR --out LMFORGE_DIR      (import: weights, config, tokenizer, chat template,
                                                         sampling defaults of generation_config.json)
lmforge convert --to-hf MODEL --out HF_DIR             (export: `transformers` loads the result; a quantized
                                                         model in the compressed-tensors layout)
lmforge convert --to-gguf MODEL --out OUT.gguf [--gguf-type f32|f16|bf16|q8_0|q4_0]
                                                        (llama.cpp / Ollama; default type: the model's dtype)
lmforge convert --from-gguf FILE.gguf --out LMFORGE_DIR (import, dequantized to float32)

MODEL is an lmforge checkpoint, a Hugging Face folder or a .gguf file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lmforge.common import LmforgeError

_DTYPE_TO_GGUF = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="Hugging Face folder to import")
    src.add_argument("--to-hf", metavar="MODEL", help="model to export as a Hugging Face folder")
    src.add_argument("--from-gguf", metavar="FILE", help="GGUF file to import (weights dequantized to float32)")
    src.add_argument("--to-gguf", metavar="MODEL", help="model to export as one GGUF file (llama.cpp, Ollama)")
    p.add_argument("--out", required=True, metavar="PATH", help="output folder, or file for --to-gguf (atomic)")
    p.add_argument("--dtype", default=None, help="convert weights to this dtype (float32, bfloat16, float16)")
    p.add_argument(
        "--gguf-type",
        default=None,
        choices=("f32", "f16", "bf16", "q8_0", "q4_0"),
        help="--to-gguf only: tensor type (default: the model's dtype; q8_0/q4_0 use llama.cpp's reference quantizers)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is a non-empty folder lmforge did not write"
    )


def _check_output_file(out: str, src: str, overwrite: bool) -> None:
    target, source = Path(out).resolve(), Path(src).resolve()
    if target == source or target in source.parents:
        raise LmforgeError(f"--out {out} is (or holds) the input {src}: writing there would destroy it")
    if Path(out).is_dir():
        raise LmforgeError(f"--out {out} is a folder; --to-gguf writes one file (e.g. --out model.gguf)")
    if Path(out).exists() and not overwrite:
        raise LmforgeError(f"--out {out} exists; pass --overwrite to replace it")


def main(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import (
        check_output_dir,
        load_model,
        load_tokenizer_if_any,
        read_generation_defaults,
        save_hf,
        save_model,
    )

    src = args.from_hf or args.to_hf or args.from_gguf or args.to_gguf
    if args.gguf_type is not None and not args.to_gguf:
        raise LmforgeError("--gguf-type applies to --to-gguf only")
    if args.to_gguf and args.dtype is not None:
        raise LmforgeError("--dtype does not apply to --to-gguf: choose the tensor type with --gguf-type")
    if args.from_gguf and not str(args.from_gguf).lower().endswith(".gguf"):
        raise LmforgeError(f"--from-gguf {args.from_gguf}: expected a .gguf file")
    if args.to_gguf:  # before the (slow) load: fail fast
        _check_output_file(args.out, src, args.overwrite)
    else:
        check_output_dir(args.out, [src], args.overwrite)
    model = load_model(src, dtype=args.dtype)
    tokenizer = load_tokenizer_if_any(src)
    if args.to_gguf:
        from lmforge.gguf_io import save_gguf

        dtype = next(model.parameters()).dtype
        gguf_type = args.gguf_type or _DTYPE_TO_GGUF.get(dtype, "f32")
        save_gguf(model, args.out, tokenizer=tokenizer, gguf_type=gguf_type)
        what = f"GGUF {gguf_type}"
    elif args.to_hf:
        save_hf(model, args.out, tokenizer=tokenizer, generation=read_generation_defaults(src))
        what = "Hugging Face"
    else:  # an lmforge checkpoint, keeping the source's sampling defaults for a later --to-hf
        generation = {} if args.from_gguf else read_generation_defaults(src)
        save_model(model, args.out, tokenizer=tokenizer, extra={"generation": generation} if generation else None)
        what = "lmforge"
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.out} ({what}, {model.config.arch}, {n / 1e6:.1f}M parameters"
        f"{', with tokenizer' if tokenizer else ''})"
    )
    return 0
