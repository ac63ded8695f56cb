"""lmforge pretraining against a plain nanoGPT-style loop: same model, same data, same tokens, and
the loss each reaches in the same wall time. One run prints both side by side.

    python bench/pretrain.py --data runs/pipeline-tiny/data            # a folder from `lmforge data prepare`
    python bench/pretrain.py --data DIR --steps 600 --optim muon --lr 0.003 --baseline-lr 0.002

The peer is nanoGPT's train.py loop written out here: AdamW (fused, betas 0.9/0.95, weight decay 0.1
on matrices), linear warmup + cosine decay, gradient clipping at 1.0, random windows of the token
stream (`get_batch`), `F.cross_entropy` on full logits. lmforge runs its own recipe in-process
(`lmforge pretrain`, any optimizer: --optim adamw|muon). Both train the same `--preset` model on
the same number of tokens (steps x batch x seq_len); the validation loss (nats/token and bits/byte
on the data's val split, the same windows for both) is read at the end, and for the same-wall-time
comparison the peer's curve is read at lmforge's finishing time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.common import apply_threads_policy  # noqa: E402

apply_threads_policy()  # before torch loads OpenMP: both loops wait for threads the way lmforge does

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lmforge.data.shards import data_tokenizer, read_index  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402


def token_stream(folder: Path, split: str) -> np.ndarray:
    index, _ = read_index(folder)
    parts = [
        np.memmap(folder / s["file"], dtype=np.dtype(index["dtype"]), mode="r")
        for s in index["splits"][split]["shards"]
        if s["tokens"] > 0
    ]
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def val_windows(folder: Path, seq_len: int, n: int) -> torch.Tensor:
    val = token_stream(folder, "val")
    starts = np.linspace(0, len(val) - seq_len - 2, n).astype(np.int64)
    return torch.from_numpy(np.stack([val[s : s + seq_len + 1] for s in starts]))


@torch.no_grad()
def val_loss(model: torch.nn.Module, windows: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    for rows in windows.split(16):
        logits = model(rows[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="sum"))
    model.train()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def nanogpt_loop(
    cfg: ModelConfig,
    train: np.ndarray,
    val: torch.Tensor,
    steps: int,
    batch: int,
    seq_len: int,
    lr: float,
    eval_every: int,
    seed: int,
) -> dict:
    """nanoGPT's train.py, minus DDP and mixed precision (a CPU run): the peer."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        fused=True,
    )
    warmup, min_lr = max(1, steps // 30), lr * 0.1
    gen = np.random.default_rng(seed)
    curve, start = [], time.perf_counter()
    for step in range(steps):
        it_lr = (
            lr * (step + 1) / warmup
            if step < warmup
            else min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        )
        for g in opt.param_groups:
            g["lr"] = it_lr
        ix = gen.integers(0, len(train) - seq_len - 1, batch)
        rows = torch.from_numpy(np.stack([train[i : i + seq_len + 1] for i in ix]))
        logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            curve.append((elapsed, step + 1, val_loss(model, val)))
            print(f"peer step {step + 1}: {elapsed:.0f} s, val loss {curve[-1][2]:.4f}", file=sys.stderr, flush=True)
            start += time.perf_counter() - start - elapsed  # evaluation time is not training time
    return {"curve": curve}


def lmforge_run(
    folder: Path,
    preset: str,
    steps: int,
    batch: int,
    seq_len: int,
    lr: float,
    optim: str,
    eval_every: int,
    val: torch.Tensor,
    seed: int,
) -> dict:
    """`lmforge pretrain` in-process; the validation curve re-scored on the shared windows from
    the checkpoints it saves every eval_every steps."""
    from lmforge.checkpoint import load_model
    from lmforge.cli import main as cli

    with tempfile.TemporaryDirectory() as out:
        argv = [
            "pretrain",
            "--data",
            str(folder),
            "--preset",
            preset,
            "--steps",
            str(steps),
            "--runs-dir",
            out,
            "--name",
            "run",
            "--seq-len",
            str(seq_len),
            "--batch-size",
            str(batch),
            "--lr",
            str(lr),
            "--set",
            f"optim.name={optim}",
            "--set",
            "train.eval_every=0",
            "--set",
            f"train.seed={seed}",
            "--set",
            "train.save_every=0",
            "--set",
            "optim.warmup_steps=" + str(max(1, steps // 30)),
        ]
        start = time.perf_counter()
        if cli(argv) != 0:
            raise SystemExit("lmforge pretrain failed")
        elapsed = time.perf_counter() - start
        model = load_model(Path(out) / "run" / "final")
        return {"curve": [(elapsed, steps, val_loss(model, val))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder from `lmforge data prepare` (train + val splits)")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.003, help="lmforge's learning rate")
    p.add_argument("--optim", default="muon", choices=["adamw", "muon"], help="lmforge's optimizer")
    p.add_argument("--baseline-lr", type=float, default=0.002, help="the nanoGPT loop's AdamW learning rate")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    folder = Path(args.data)
    tok = data_tokenizer(folder)
    cfg = ModelConfig.preset(args.preset, vocab_size=tok.vocab_size)
    val = val_windows(folder, args.seq_len, args.eval_windows)
    bytes_per_token = sum(len(tok.decode(r.tolist()).encode()) for r in val[:, 1:]) / val[:, 1:].numel()
    train = token_stream(folder, "train")
    tokens = args.steps * args.batch * args.seq_len
    print(
        f"model {args.preset} ({cfg.num_parameters() / 1e6:.2f}M parameters), {tokens:,} training tokens, "
        f"{torch.get_num_threads()} threads"
    )
    peer = nanogpt_loop(
        cfg, train, val, args.steps, args.batch, args.seq_len, args.baseline_lr, max(1, args.steps // 10), args.seed
    )
    ours = lmforge_run(
        folder,
        args.preset,
        args.steps,
        args.batch,
        args.seq_len,
        args.lr,
        args.optim,
        max(1, args.steps // 10),
        val,
        args.seed,
    )
    t_ours, _, loss_ours = ours["curve"][-1]
    t_peer, _, loss_peer = peer["curve"][-1]
    # The peer's loss at lmforge's wall time (its curve is sampled every tenth of the run).
    at_same_time = min(peer["curve"], key=lambda c: abs(c[0] - t_ours))
    bpb = 1 / (math.log(2) * bytes_per_token)
    rows = [("nanoGPT-style loop (AdamW)", t_peer, loss_peer), (f"lmforge pretrain ({args.optim})", t_ours, loss_ours)]
    print("\n| loop | seconds | val loss (nats/token) | val bits/byte |\n|---|---|---|---|")
    for name, t, loss in rows:
        print(f"| {name} | {t:.0f} | {loss:.4f} | {loss * bpb:.4f} |")
    print(
        f"\nsame tokens: lmforge {loss_ours * bpb:.4f} vs peer {loss_peer * bpb:.4f} bits/byte "
        f"({(loss_peer - loss_ours) / loss_peer * 100:+.1f}% lower loss), {t_peer / t_ours:.2f}x the peer's speed"
    )
    print(
        f"same wall time ({t_ours:.0f} s): peer at {at_same_time[0]:.0f} s, step {at_same_time[1]}: "
        f"{at_same_time[2] * bpb:.4f} bits/byte"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "peer": peer, "lmforge": ours, "bits_per_nat_token": bpb}, indent=1)
        )


if __name__ == "__main__":
    main()
