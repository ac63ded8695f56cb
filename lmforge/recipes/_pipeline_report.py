"""The pipeline's measuring and reporting steps: decoding speed (plain, speculative with the draft
model, prompt lookup, quantized) and the run report (report.md + report.html + PNG plots).

Every figure in the report is read from a file the run itself wrote (data stats.json, training
metrics.jsonl, eval results.json, generate/results.json); a stage without its file is shown as
not available, never filled in.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmforge.common import atomic_path, atomic_write_text, human_bytes
from lmforge.recipes._common import read_metrics

# ----------------------------------------------------------------------------- generation


def measure_generation(gcfg: dict, models: dict[str, Path]) -> dict:
    """Greedy samples and decode tokens/s for every model; speculative decoding on the final model."""
    import torch

    from lmforge.checkpoint import load_model, load_tokenizer_if_any
    from lmforge.infer.fast import prepare_for_inference
    from lmforge.infer.sampling import SamplingParams
    from lmforge.infer.speculative import DraftProposer, LookupProposer

    prompts = gcfg.get("prompts") or ["def main():"]
    new = int(gcfg.get("max_new_tokens", 64))
    k = int(gcfg.get("speculative_k", 4))
    out: dict = {"max_new_tokens": new, "threads": torch.get_num_threads(), "rows": [], "samples": {}}
    tok = load_tokenizer_if_any(next(iter(models.values()))) if models else None
    if tok is None:
        return out
    loaded = {label: prepare_for_inference(load_model(path)) for label, path in models.items()}
    params = SamplingParams(max_new_tokens=new, stop_token_ids=[])
    encoded = [tok.encode(p) for p in prompts]
    plain_tokens = {}
    for label, model in loaded.items():
        if label == "draft":
            continue
        speed, tokens = _decode_speed(model, encoded, params, None, k)
        plain_tokens[label] = tokens
        out["rows"].append({"model": label, "decoding": "plain greedy", "tokens_per_s": speed})
        out["samples"][label] = [p + tok.decode(t) for p, t in zip(prompts, tokens)]
    final = "final (sft, merged)"
    if final in loaded:
        target = loaded[final]
        proposers = {"prompt lookup": LookupProposer()}
        if "draft" in loaded:
            # Drafting stops where the draft is unsure (k is then a bound): a weak draft costs less.
            proposers["speculative (draft model)"] = DraftProposer(loaded["draft"], max(map(len, encoded)) + new + k + 2,
                                                                   float(gcfg.get("draft_min_confidence", 0.4)))
        for name, proposer in proposers.items():
            speed, tokens, acc = _decode_speed(target, encoded, params, proposer, k)
            out["rows"].append({"model": final, "decoding": name, "tokens_per_s": speed, "acceptance_rate": acc,
                                "identical_to_plain": tokens == plain_tokens.get(final)})
    return out


def _decode_speed(model, encoded, params, proposer, k):
    """Median over prompts of tokens/s (and acceptance for speculative decoding)."""
    from lmforge.infer.generate import generate
    from lmforge.infer.speculative import speculative_generate

    speeds, tokens, accepted, proposed = [], [], 0, 0
    for ids in encoded:
        start = time.perf_counter()
        if proposer is None:
            row = generate(model, ids, max_new_tokens=params.max_new_tokens)[0].tolist()
        else:
            row, stats = speculative_generate(model, ids, params, proposer, k=k)
            accepted, proposed = accepted + stats.accepted, proposed + stats.proposed
        speeds.append(len(row) / (time.perf_counter() - start))
        tokens.append(row)
    speed = round(sorted(speeds)[len(speeds) // 2], 1)
    if proposer is None:
        return speed, tokens
    return speed, tokens, round(accepted / max(1, proposed), 3)


# ----------------------------------------------------------------------------- report


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None



def _loss_plot(run: Path, names: list[str]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    drawn = False
    for name in names:
        rows = read_metrics(run / name / "metrics.jsonl", missing_ok=True)
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r and "step" in r]
        if train:
            ax.plot(*zip(*train), label=f"{name} train", linewidth=1)
            drawn = True
        if val:
            ax.plot(*zip(*val), "o--", label=f"{name} validation")
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    with atomic_path(run / "loss_curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "loss_curves.png"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _data_blocks(run: Path) -> list[tuple]:
    stats = _read(run / "data" / "stats.json")
    if not stats:
        return [("p", "Data stage: not available (no data/stats.json).")]
    from lmforge.data.report import stage_rows

    blocks = [("table", [["stage", "documents out", "bytes out"]] +
               [[n, f"{d:,}", human_bytes(b) if b is not None else "-"] for n, d, b in stage_rows(stats)])]
    if stats.get("rejected"):
        blocks += [("p", "Why documents were rejected (quality rules):"),
                   ("table", [["rule", "documents"]] + [[k, str(v)] for k, v in stats["rejected"].items()])]
    if stats.get("mix"):
        blocks.append(("table", [["source", "documents in", "weight", "epochs", "tokens", "share"]] +
                       [[s, str(m.get("documents")), _fmt(m.get("weight")), _fmt(m.get("epochs")),
                         f"{m.get('tokens', 0):,}", _fmt(m.get("share"))] for s, m in stats["mix"].items()]))
    tokens = stats.get("tokens", {})
    blocks.append(("p", "Tokens: " + ", ".join(f"{k} {v.get('tokens', 0):,}" for k, v in tokens.items())
                   + f"; vocabulary {stats.get('vocab_size')}; {stats.get('mb_per_s')} MB/s."))
    return blocks


def _eval_blocks(run: Path, models: dict[str, Path]) -> tuple[list[tuple], dict[str, dict]]:
    from lmforge.eval.tasks import primary_metric

    per_model, names = {}, []
    for label, path in models.items():
        res = _read(run / "eval" / path.relative_to(run).as_posix().replace("/", "-") / "results.json")
        if res:
            per_model[label] = {t["name"]: t for t in res.get("tasks", [])}
            names += [n for n in per_model[label] if n not in names]
    if not per_model:
        return [("p", "Evaluation stage: not available (no eval results).")], {}
    header = ["model"] + [f"{n} ({(primary_metric(next(m[n] for m in per_model.values() if n in m)) or ('?',))[0]})"
                          for n in names]
    rows = [header]
    for label, tasks in per_model.items():
        rows.append([label] + [_fmt((primary_metric(tasks[n]) or (None, None))[1]) if n in tasks else "-" for n in names])
    blocks = [("table", rows)]
    flagged = []
    for label, tasks in per_model.items():
        for n, t in tasks.items():
            c = t.get("contamination") or {}
            if c:
                flagged.append([label, n, _fmt(c.get("contaminated")), _fmt(c.get("contaminated_fraction"))])
    if flagged:
        blocks += [("p", "Contamination of the evaluation sets against the training data (13-gram overlap):"),
                   ("table", [["model", "task", "contaminated examples", "fraction"]] + flagged)]
    return blocks, per_model


def write_report(cfg: dict, run: Path, models: dict[str, Path], stages: list[str]) -> dict[str, Path]:
    from lmforge.eval.report import to_html, to_markdown

    blocks: list[tuple] = [("h1", f"lmforge pipeline: {cfg.get('name', run.name)}")]
    status = []
    for s in stages:
        stamp = _read(run / ".stamps" / f"{s}.json")
        status.append([s, "done" if stamp else ("this run" if s == "report" else "not available"),
                       _fmt(stamp.get("seconds")) if stamp else "-"])
    blocks += [("table", [["stage", "status", "seconds"]] + status)]
    blocks += [("h2", "Data funnel")] + _data_blocks(run)
    blocks.append(("h2", "Training"))
    plot = _loss_plot(run, ["base", "draft", "sft"])
    blocks.append(("img", "training and validation loss", plot) if plot else ("p", "No training metrics."))
    for name in ("base", "draft", "sft"):
        rows = read_metrics(run / name / "metrics.jsonl", missing_ok=True)
        summary = next((r["summary"] for r in rows if "summary" in r), None)
        if summary:
            blocks.append(("p", f"{name}: {summary.get('steps')} steps, final loss {_fmt(summary.get('final_loss'))}, "
                                f"best validation loss {_fmt(summary.get('best_val_loss'))}, "
                                f"{_fmt(summary.get('tokens_per_s'))} tokens/s."))
    eval_blocks, per_model = _eval_blocks(run, models)
    blocks += [("h2", "Evaluation")] + eval_blocks
    gen = _read(run / "generate" / "results.json") or {}
    speed = {r["model"]: r["tokens_per_s"] for r in gen.get("rows", []) if r["decoding"] == "plain greedy"}
    blocks += [("h2", "Quantization"), ("table", [["model", "size on disk", "decode tokens/s"]] + [
        [label, human_bytes(sum(f.stat().st_size for f in path.glob("*.safetensors"))), _fmt(speed.get(label))]
        for label, path in models.items() if label.startswith("final")])]
    if gen.get("rows"):
        blocks += [("h2", "Decoding speed"), ("p", f"Batch 1, greedy, {gen['max_new_tokens']} new tokens, "
                                                    f"{gen['threads']} threads, median over prompts."),
                   ("table", [["model", "decoding", "tokens/s", "acceptance", "same tokens as plain"]] +
                    [[r["model"], r["decoding"], _fmt(r["tokens_per_s"]), _fmt(r.get("acceptance_rate")),
                      _fmt(r.get("identical_to_plain"))] for r in gen["rows"]])]
        blocks.append(("h2", "Sample generations"))
        for label, samples in gen.get("samples", {}).items():
            blocks += [("p", label), ("code", "\n\n---\n\n".join(samples))]
    else:
        blocks += [("h2", "Decoding speed"), ("p", "Generate stage: not available.")]
    paths = {"markdown": run / "report.md", "html": run / "report.html"}
    atomic_write_text(paths["markdown"], to_markdown(blocks))
    atomic_write_text(paths["html"], to_html(blocks, f"lmforge pipeline: {run.name}"))
    return paths
