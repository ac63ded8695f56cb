"""The pipeline report's PNG charts (matplotlib, headless): training loss curves, horizontal bars,
evaluation by model. Each returns the file name it wrote under the run folder, or None when there is
nothing to draw."""

from __future__ import annotations

from pathlib import Path

from lmforge.common import atomic_path
from lmforge.recipes._common import read_metrics


def _figure(width: float = 7, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    ax.spines[["top", "right"]].set_visible(False)
    return plt, fig, ax


def _save(plt, fig, run: Path, name: str) -> str:
    with atomic_path(run / name) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def _loss_plot(run: Path, names: list[str], file: str, title: str) -> str | None:
    plt, fig, ax = _figure()
    drawn = False
    for name in names:
        rows = read_metrics(run / name / "metrics.jsonl", missing_ok=True)
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r and "step" in r]
        if train:
            ax.plot(*zip(*train), label=f"{name} train", linewidth=1, alpha=0.8)
            drawn = True
        if val:
            ax.plot(*zip(*val), "o--", label=f"{name} validation")
            best = min(val, key=lambda sv: sv[1])
            ax.annotate(f"best {best[1]:.3f}", best, textcoords="offset points", xytext=(4, 8), fontsize=8)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(plt, fig, run, file)


def _bar_plot(run: Path, file: str, title: str, labels: list[str], values: list[float], ylabel: str) -> str | None:
    if not values:
        return None
    plt, fig, ax = _figure(7, 0.5 + 0.42 * len(values))
    ax.barh(range(len(values)), values, color="#4c78a8")
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,.3g}", va="center", fontsize=8)
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    return _save(plt, fig, run, file)


def _eval_plot(run: Path, per_model: dict[str, dict]) -> str | None:
    from lmforge.eval.tasks import primary_metric

    tasks = sorted({n for tasks in per_model.values() for n in tasks})
    if not tasks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        labels = [m for m in per_model if task in per_model[m]]
        values = [(primary_metric(per_model[m][task]) or (None, 0.0))[1] or 0.0 for m in labels]
        metric = (primary_metric(per_model[labels[0]][task]) or ("?",))[0]
        ax.bar(range(len(values)), values, color="#4c78a8")
        ax.set_xticks(
            range(len(values)), [m.replace(" (sft, merged)", "") for m in labels], rotation=35, ha="right", fontsize=7
        )
        ax.set_title(f"{task}\n{metric}", fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _save(plt, fig, run, "eval.png")
