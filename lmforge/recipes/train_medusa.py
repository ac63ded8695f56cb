"""Train Medusa decoding heads on a frozen base model. Head k learns to predict the token k + 1
places after the next one from the base model's last hidden state; `lmforge generate --medusa DIR`
then verifies a tree of their guesses per forward pass. Data: a .txt/.jsonl ("text" field) file,
or the built-in stdlib corpus; --self-distill trains on the base model's own greedy continuations
instead (what the heads will be asked to predict at inference)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from lmforge.common import DEVICE_PATTERN, LmforgeError, checked, get_device, read_jsonl, seed_everything
from lmforge.recipes._common import add_config_arguments, load_config, overrides_from_args
from lmforge.recipes._fit import FitOptions, LoopState, add_resume_argument, run_dir_for, run_fit


@dataclasses.dataclass
class MedusaTrainConfig:
    """The hyperparameters (flags, `--set field=value` or a `--config` YAML), every value checked."""

    data: str | None = None  # training text: .txt or .jsonl with a 'text' field (None: the stdlib corpus)
    max_bytes: int = checked(1_000_000, ge=1)  # bytes of text to use
    self_distill: int = checked(0, ge=0)  # > 0: train on this many greedy continuations of the base model
    heads: int = checked(3, ge=1)
    layers: int = checked(1, ge=1)  # residual blocks per head
    steps: int = checked(300, ge=1)
    batch_size: int = checked(8, ge=1)
    seq_len: int = checked(128, ge=2)
    lr: float = checked(1e-3, gt=0)
    seed: int = checked(0, ge=0)
    device: str = checked("auto", pattern=DEVICE_PATTERN)


FLAGS = {f"--{f.name.replace('_', '-')}": f.name for f in dataclasses.fields(MedusaTrainConfig)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model folder (lmforge checkpoint or Hugging Face folder)")
    p.add_argument("--out", required=True, help="folder for the heads (medusa_config.json + safetensors)")
    add_config_arguments(p, None, FLAGS)
    add_resume_argument(p)  # checkpoints and metrics.jsonl are in <out>.train/


def read_text(path: str | None, max_bytes: int) -> str:
    if path is None:
        from lmforge.data.stdlib import stdlib_files

        parts, size = [], 0
        for f in stdlib_files():
            text = f.read_text(encoding="utf-8", errors="replace")
            parts.append(text)
            size += len(text)
            if size >= max_bytes:
                break
        return "\n".join(parts)[:max_bytes]
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"--data {path}: no such file")
    if p.suffix == ".jsonl":
        texts = []
        for where, row in read_jsonl(p, "--data file"):
            if "text" not in row:
                raise LmforgeError(f"{where}: no 'text' field")
            texts.append(row["text"])
        return "\n".join(texts)[:max_bytes]
    return p.read_text(encoding="utf-8", errors="replace")[:max_bytes]


def self_distill(model, stream: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """n rows of [short data prompt + the base model's greedy continuation], seq_len tokens each."""
    from lmforge.infer.generate import generate

    prompt_len = max(4, seq_len // 8)
    starts = torch.randint(0, len(stream) - prompt_len, (n,), generator=gen)
    prompts = stream[starts[:, None] + torch.arange(prompt_len)]
    rows = []
    for i in range(0, n, 16):
        batch = prompts[i : i + 16].to(next(model.parameters()).device)
        rows.append(torch.cat([batch.cpu(), generate(model, batch, max_new_tokens=seq_len - prompt_len)], dim=1))
    return torch.cat(rows)


def main(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import load_model, load_tokenizer_if_any
    from lmforge.infer.medusa import MedusaHeads, medusa_loss, save_medusa
    from lmforge.train import OptimConfig, build_optimizer

    cfg = load_config(MedusaTrainConfig, args.config, overrides_from_args(args, FLAGS))
    seed_everything(cfg.seed)
    device = get_device(cfg.device)
    model = load_model(args.model, device=device).eval().requires_grad_(False)
    tokenizer = load_tokenizer_if_any(args.model)
    if tokenizer is None:
        raise LmforgeError(f"{args.model} has no tokenizer.json: train-medusa needs one to tokenize the data")
    stream = torch.tensor(tokenizer.encode(read_text(cfg.data, cfg.max_bytes)), dtype=torch.long)
    if len(stream) < cfg.seq_len + 1:
        raise LmforgeError(f"only {len(stream)} tokens of training text; need more than --seq-len {cfg.seq_len}")
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = self_distill(model, stream, cfg.self_distill, cfg.seq_len, gen) if cfg.self_distill else None

    heads = MedusaHeads(model.config.hidden_size, cfg.heads, cfg.layers).to(device)
    # Linear warmup over 20 steps, then a linear decay to 10% (train/optim.py's WSD, all decay).
    optim_cfg = OptimConfig(
        lr=cfg.lr, weight_decay=0.0, schedule="wsd", decay_fraction=1.0, warmup_steps=min(20, cfg.steps)
    )
    start, accs = time.perf_counter(), []

    def next_batch(step: int) -> dict:
        if rows is not None:
            return {"input_ids": rows[torch.randint(0, len(rows), (cfg.batch_size,), generator=gen)]}
        starts = torch.randint(0, len(stream) - cfg.seq_len, (cfg.batch_size,), generator=gen)
        return {"input_ids": stream[starts[:, None] + torch.arange(cfg.seq_len)]}

    def loss_fn(b: dict):
        loss, accs[:] = medusa_loss(model, heads, b["input_ids"])
        return loss, {f"head{k + 1}_top1": a for k, a in enumerate(accs)}

    result = run_fit(
        heads,
        build_optimizer(heads, optim_cfg),
        loss_fn,
        next_batch,
        run_dir_for(args.out),
        FitOptions(cfg.steps, optim_cfg, save_every=max(1, cfg.steps // 4), resume=args.resume),
        LoopState(generators=[gen]),
        device=device,
    )
    loss = result["final_loss"] if result["final_loss"] is not None else float("nan")  # nan: resumed when done
    summary = dict(
        steps=cfg.steps,
        final_loss=round(loss, 4),
        head_top1_accuracy=[round(a, 4) for a in accs],
        seconds=round(time.perf_counter() - start, 1),
        base_model=str(args.model),
    )
    save_medusa(heads.cpu(), args.out, extra={"training": summary})
    print(json.dumps(summary))
    return 0
