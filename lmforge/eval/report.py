"""Reports: `results.json` (every example's prediction), `report.md` and `report.html` with tables
and matplotlib plots, and a side-by-side comparison of two runs. Every file is written atomically.

A report is first built as a list of blocks (heading, paragraph, table, image, code) and then
rendered to Markdown and to HTML by two small renderers, so the two never drift apart.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from pathlib import Path
from typing import Any

from lmforge.common import LmforgeError, atomic_path, atomic_write_json, atomic_write_text, read_json
from lmforge.eval.tasks import primary_metric

RESULTS = "results.json"
SHOWN_EXAMPLES = 5


def make_results(model: str, task_results: list, config: dict | None = None) -> dict:
    return {
        "lmforge_eval": 1,
        "model": model,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": config or {},
        "tasks": [t.to_dict() if hasattr(t, "to_dict") else t for t in task_results],
    }


def load_results(path: str | Path) -> dict:
    """A results.json, or a report folder holding one."""
    path = Path(path)
    file = path / RESULTS if path.is_dir() else path
    data = read_json(file, "eval results")
    if not isinstance(data, dict) or "tasks" not in data:
        raise LmforgeError(f"{file}: not lmforge eval results (no 'tasks')")
    return data


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _bars(
    path: Path,
    title: str,
    labels: list[str],
    series: dict[str, list[float]],
    errors: dict[str, list[tuple[float, float]]] | None = None,
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) * max(1, len(series))), 3.6))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        yerr = None
        if errors and name in errors and any(lo != hi for lo, hi in errors[name]):
            yerr = [
                [v - lo for v, (lo, _) in zip(values, errors[name])],
                [hi - v for v, (_, hi) in zip(values, errors[name])],
            ]
        bars = ax.bar(xs, values, width, label=name, yerr=yerr, capsize=4)
        ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_title(title)
    top = max((v for vs in series.values() for v in vs if not math.isnan(v)), default=1.0)
    ax.set_ylim(0, top * 1.18 if top > 0 else 1.0)  # room for the value labels
    if len(series) > 1:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=len(series), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def _plots(results: list[dict], out_dir: Path, name: str = "") -> list[tuple[str, str]]:
    """(caption, file) of the standard plots for one or more runs (`results` one per run)."""
    runs = [r.get("label") or r["model"] for r in results]
    names = list(dict.fromkeys(t["name"] for r in results for t in r["tasks"]))
    by_run = [{t["name"]: t for t in r["tasks"]} for r in results]
    images = []
    groups = {"scores": lambda t: t["type"] not in ("perplexity",), "perplexity": lambda t: t["type"] == "perplexity"}
    for group, keep in groups.items():
        tasks = [n for n in names if any(n in b and keep(b[n]) for b in by_run)]
        if not tasks:
            continue
        series, errors = {}, {}
        for run, b in zip(runs, by_run):
            series[run] = [(primary_metric(b[n]) or ("", math.nan))[1] if n in b else math.nan for n in tasks]
            errors[run] = [_ci(b.get(n), v) for n, v in zip(tasks, series[run])]
        labels = [f"{n}\n({(primary_metric(next(b[n] for b in by_run if n in b)) or ('?',))[0]})" for n in tasks]
        title = "bits per byte by task (lower is better)" if group == "perplexity" else "score by task"
        images.append((title, _bars(out_dir / f"{name}{group}.png", title, labels, series, errors)))
    return images


def _ci(task: dict | None, value: float) -> tuple[float, float]:
    m = (task or {}).get("metrics", {})
    for key in ("win_rate", "score"):
        if f"{key}_ci_low" in m:
            return m[f"{key}_ci_low"], m[f"{key}_ci_high"]
    return value, value


# ----------------------------------------------------------------------------- blocks and renderers


def _summary_table(results: dict) -> list[list[str]]:
    rows = [["task", "type", "metric", "value", "clean subset", "contaminated", "examples"]]
    for t in results["tasks"]:
        name, value = primary_metric(t) or ("-", math.nan)
        clean = (t.get("metrics_clean") or {}).get(name)
        cont = t.get("contamination") or {}
        rows.append(
            [
                t["name"],
                t["type"],
                name,
                fmt(value),
                fmt(clean) if clean is not None else "-",
                f"{cont['contaminated']}/{cont['examples']}" if cont else "-",
                fmt(t["metrics"].get("examples", len(t["examples"]))),
            ]
        )
    return rows


def _example_preview(t: dict) -> str:
    lines = []
    for ex in t["examples"][:SHOWN_EXAMPLES]:
        shown = {
            k: ex[k]
            for k in ("id", "prediction", "answers", "gold", "results", "verdicts", "rating", "tokens")
            if k in ex
        }
        if "nll" in ex and ex.get("tokens"):
            shown["nll_per_token"] = round(ex["nll"] / ex["tokens"], 4)
        if "prompt" in ex:
            shown["prompt"] = ex["prompt"][-300:]
        lines.append(", ".join(f"{k}={v!r}" for k, v in shown.items()))
    return "\n".join(lines)


def report_blocks(results: dict, images: list[tuple[str, str]]) -> list[tuple]:
    blocks: list[tuple] = [
        ("h1", f"lmforge eval: {results['model']}"),
        ("p", f"{results['created']} - {len(results['tasks'])} task(s)."),
        ("table", _summary_table(results)),
    ]
    blocks += [("img", caption, file) for caption, file in images]
    for t in results["tasks"]:
        blocks.append(("h2", t["name"]))
        metric_rows = [["metric", "value"] + (["clean subset"] if t.get("metrics_clean") else [])]
        for k, v in t["metrics"].items():
            metric_rows.append([k, fmt(v)] + ([fmt(t["metrics_clean"].get(k))] if t.get("metrics_clean") else []))
        blocks.append(("table", metric_rows))
        if t["examples"]:
            blocks.append(
                (
                    "p",
                    f"First {min(SHOWN_EXAMPLES, len(t['examples']))} of {len(t['examples'])} examples "
                    f"(all are in {RESULTS}):",
                )
            )
            blocks.append(("code", _example_preview(t)))
    return blocks


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            out.append(("#" if b[0] == "h1" else "##") + " " + b[1])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            rows = [[_md_cell(c) for c in r] for r in b[1]]
            out += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        elif b[0] == "img":
            out.append(f"![{b[1]}]({b[2]})")
        elif b[0] == "code":
            out.append("```\n" + b[1] + "\n```")
        elif b[0] == "links":  # [(text, relative href), ...]
            out += [f"- [{text}]({href})" for text, href in b[1]]
        out.append("")
    return "\n".join(out)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}"
    "th{background:#f3f3f3}pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:12px}img{max-width:100%}"
)


def to_html(blocks: list[tuple], title: str) -> str:
    e = html.escape
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style></head><body>"
    ]
    for b in blocks:
        if b[0] in ("h1", "h2"):
            out.append(f"<{b[0]}>{e(b[1])}</{b[0]}>")
        elif b[0] == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(c)}</th>" for c in b[1][0])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b[1][1:])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif b[0] == "img":
            out.append(f"<figure><img src='{e(b[2])}' alt='{e(b[1])}'><figcaption>{e(b[1])}</figcaption></figure>")
        elif b[0] == "code":
            out.append(f"<pre>{e(b[1])}</pre>")
        elif b[0] == "links":
            out.append("<ul>" + "".join(f"<li><a href='{e(href)}'>{e(text)}</a></li>" for text, href in b[1]) + "</ul>")
    return "\n".join(out + ["</body></html>"])


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """results.json + report.md + report.html + PNG plots in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / RESULTS, results)
    blocks = report_blocks(results, _plots([results], out_dir))
    atomic_write_text(out_dir / "report.md", to_markdown(blocks))
    atomic_write_text(out_dir / "report.html", to_html(blocks, f"lmforge eval: {results['model']}"))
    return {"results": out_dir / RESULTS, "markdown": out_dir / "report.md", "html": out_dir / "report.html"}


# ----------------------------------------------------------------------------- comparison


def compare_table(a: dict, b: dict) -> list[list[str]]:
    rows = [["task", "metric", a["label"], b["label"], "B - A"]]
    tb = {t["name"]: t for t in b["tasks"]}
    for ta in a["tasks"]:
        for metric, va in ta["metrics"].items():
            vb = tb.get(ta["name"], {}).get("metrics", {}).get(metric)
            if metric == "examples" or not isinstance(va, (int, float)):
                continue
            delta = fmt(vb - va) if isinstance(vb, (int, float)) else "-"
            rows.append([ta["name"], metric, fmt(va), fmt(vb) if vb is not None else "-", delta])
    for name in tb.keys() - {t["name"] for t in a["tasks"]}:
        rows.append([name, "(only in B)", "-", "-", "-"])
    return rows


def write_comparison(path_a: str | Path, path_b: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """compare.md + compare.html (+ plots): two runs side by side, metric by metric."""
    a, b = load_results(path_a), load_results(path_b)
    a["label"], b["label"] = f"A: {a['model']}", f"B: {b['model']}"
    if a["label"][3:] == b["label"][3:]:
        a["label"], b["label"] = f"A: {Path(path_a).name}", f"B: {Path(path_b).name}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = [
        ("h1", "lmforge eval: comparison"),
        ("p", f"A = {path_a} ({a['created']}), B = {path_b} ({b['created']})"),
        ("table", compare_table(a, b)),
    ]
    blocks += [("img", c, f) for c, f in _plots([a, b], out_dir, "compare-")]
    atomic_write_text(out_dir / "compare.md", to_markdown(blocks))
    atomic_write_text(out_dir / "compare.html", to_html(blocks, "lmforge eval: comparison"))
    return {"markdown": out_dir / "compare.md", "html": out_dir / "compare.html"}
