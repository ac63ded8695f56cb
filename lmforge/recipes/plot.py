"""Draw a training run's curves (training loss with a moving average, validation loss, learning
rate, gradient norm) from its metrics.jsonl to a PNG.

    lmforge plot runs/pretrain-tiny                  # -> runs/pretrain-tiny/loss.png
    lmforge plot runs/a runs/b --out compare.png     # several runs on the same axes
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.common import LmforgeError, atomic_path
from lmforge.recipes._common import read_metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files)")
    parser.add_argument("--out", default=None, help="PNG path (default: <first run>/loss.png)")
    parser.add_argument("--smooth", type=int, default=20, help="moving-average window for the training loss")


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in args.runs:
        rows = read_metrics(run)
        name = Path(run).name if Path(run).is_dir() else Path(run).parent.name
        train = [r for r in rows if "loss" in r and r.get("skip_reason") is None]
        val = [r for r in rows if "val_loss" in r]
        if not train:
            raise LmforgeError(f"{run}: no training steps in its metrics")
        steps = [r["step"] for r in train]
        (line,) = axes[0].plot(steps, [r["loss"] for r in train], alpha=0.25)
        axes[0].plot(
            steps,
            moving_average([r["loss"] for r in train], args.smooth),
            color=line.get_color(),
            label=f"{name} train",
        )
        if val:
            axes[0].plot(
                [r["step"] for r in val],
                [r["val_loss"] for r in val],
                "o--",
                color=line.get_color(),
                label=f"{name} val",
            )
        axes[1].plot(steps, [r["lr"] for r in train], label=name)
        axes[2].plot(steps, [r["grad_norm"] for r in train], label=name)
    for ax, title in zip(axes, ("loss", "learning rate", "gradient norm")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    axes[2].set_yscale("log")
    out = (
        Path(args.out)
        if args.out
        else (Path(args.runs[0]) if Path(args.runs[0]).is_dir() else Path(args.runs[0]).parent) / "loss.png"
    )
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    print(f"wrote {out}")
    return 0
