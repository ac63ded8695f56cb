"""Print the memory a model needs for inference, full fine-tuning, LoRA and QLoRA at a given batch
and sequence length (weights, gradients, optimizer states, activations, KV cache), without running it.

    lmforge estimate --model llama-100m --batch 4 --seq-len 1024
    lmforge estimate --model runs/pretrain-tiny/final --dtype bf16
    lmforge estimate --model llama-100m --tp 2 --pp 2 --micro-batches 4   # per-rank memory, bytes sent
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.common import LmforgeError, get_dtype, read_json
from lmforge.config import read_config_file
from lmforge.recipes._common import add_deprecated_alias, bounded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a preset name, a model folder, or a config JSON/YAML file")
    parser.add_argument("--batch-size", type=bounded(int, ge=1), default=1, help="sequences per step")
    add_deprecated_alias(parser, "--batch", "--batch-size")  # every other command says --batch-size
    parser.add_argument("--seq-len", type=bounded(int, ge=1), default=512)
    parser.add_argument("--dtype", default="float32", help="weights of frozen bases / inference and activations")
    parser.add_argument("--lora-r", type=bounded(int, ge=1), default=8)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--tp", type=bounded(int, ge=1), default=1, help="tensor-parallel degree: per-rank table")
    parser.add_argument("--pp", type=bounded(int, ge=1), default=1, help="pipeline stages: per-rank table")
    parser.add_argument("--dp", type=bounded(int, ge=1), default=1, help="data-parallel replicas: per-rank table")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="how --dp replicates")
    parser.add_argument("--micro-batches", type=bounded(int, ge=1), default=1, help="per step (pipeline depth)")
    parser.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b", help="pipeline schedule (--pp)")


def model_config(spec: str):
    from lmforge.model import PRESETS, ModelConfig

    path = Path(spec)
    if spec in PRESETS and not path.exists():
        return ModelConfig.preset(spec)
    if path.is_dir():
        if (path / "lmforge_config.json").is_file():
            return ModelConfig.from_dict(read_json(path / "lmforge_config.json")["model"])
        if (path / "config.json").is_file():
            from lmforge.model.hf_keys import config_from_hf

            return config_from_hf(read_json(path / "config.json"), str(path / "config.json"))
    if path.is_file() and path.suffix in (".yaml", ".yml", ".json"):
        data = read_config_file(path)
        data = data.get("model", data)
        preset = data.pop("preset", None) if isinstance(data, dict) else None
        return ModelConfig.preset(preset, **data) if preset else ModelConfig.from_dict(data)
    raise LmforgeError(f"--model {spec}: not a preset ({', '.join(PRESETS)}), a model folder or a config file")


def main(args: argparse.Namespace) -> int:
    from lmforge.train.memory import estimate_table

    config = model_config(args.model)
    nbytes = get_dtype(args.dtype).itemsize
    print(
        f"{args.model}: {config.num_parameters() / 1e6:.1f}M parameters, batch {args.batch_size} x {args.seq_len} "
        f"tokens, {args.dtype} (full fine-tuning keeps fp32 weights + AdamW)"
    )
    print(
        estimate_table(
            config,
            args.batch_size,
            args.seq_len,
            param_bytes=nbytes,
            act_bytes=nbytes,
            lora_r=args.lora_r,
            checkpointing=args.activation_checkpointing,
        )
    )
    if args.tp > 1 or args.pp > 1 or args.dp > 1 or args.micro_batches > 1:
        from lmforge.train.parallel_memory import parallel_table

        layout = {"tp": args.tp, "pp": args.pp, "dp": args.dp, "strategy": args.strategy}
        print(f"\nfull training per rank, micro-batch {args.batch_size} x {args.micro_batches} ({args.schedule}):")
        kw = {"micro_batches": args.micro_batches, "schedule": args.schedule, "act_bytes": nbytes}
        print(parallel_table(config, args.batch_size, args.seq_len, [{}, layout], **kw))
    return 0
