"""The pipeline's run report (report.md + report.html + PNG charts): a summary of what each stage
built and whether that helped, then a section per stage with its chart and tables.

Every figure in the report is read from a file the run itself wrote (data stats.json, training
metrics.jsonl, eval results.json, generate/results.json); a stage without its file is shown as
not available, never filled in.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.common import atomic_write_text, human_bytes
from lmforge.recipes._common import read_metrics
from lmforge.recipes._pipeline_charts import _bar_plot, _eval_plot, _loss_plot
from lmforge.recipes._pipeline_speed import FINAL, _decode_blocks, _fmt, _quant_blocks, _quant_speedups, _quant_verdict

SFT_TARGET_RATIO = 1.5  # docstring ROUGE-L of final over base that makes fine-tuning worth it
SFT_MAX_CODE_BPB_RISE = 0.03  # ... while held-out code bits/byte may rise at most this much
SPEC_TARGET_SPEEDUP = 1.3  # speculative decoding with the draft over plain decoding of final ...
SPEC_TARGET_ACCEPTANCE = 0.6  # ... at this acceptance rate, that make the draft worth shipping


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _eval_dir(run: Path, path: Path) -> Path:
    return run / "eval" / path.relative_to(run).as_posix().replace("/", "-")


# ----------------------------------------------------------------------------- sections


def _data_blocks(run: Path) -> list[tuple]:
    stats = _read(run / "data" / "stats.json")
    if not stats:
        return [("p", "Data stage: not available (no data/stats.json).")]
    from lmforge.data.report import stage_rows

    rows = stage_rows(stats)
    blocks = [
        (
            "table",
            [["stage", "documents out", "bytes out"]]
            + [[n, f"{d:,}", human_bytes(b) if b is not None else "-"] for n, d, b in rows],
        )
    ]
    chart = _bar_plot(
        run,
        "data_funnel.png",
        "documents after each data stage",
        [r[0] for r in rows],
        [float(r[1]) for r in rows],
        "documents",
    )
    if chart:
        blocks.append(("img", "data funnel", chart))
    if stats.get("rejected"):
        blocks += [
            ("p", "Why documents were rejected (quality rules):"),
            ("table", [["rule", "documents"]] + [[k, str(v)] for k, v in stats["rejected"].items()]),
        ]
    if stats.get("mix"):
        blocks.append(
            (
                "table",
                [["source", "documents in", "weight", "epochs", "tokens", "share"]]
                + [
                    [
                        s,
                        str(m.get("documents")),
                        _fmt(m.get("weight")),
                        _fmt(m.get("epochs")),
                        f"{m.get('tokens', 0):,}",
                        _fmt(m.get("share")),
                    ]
                    for s, m in stats["mix"].items()
                ],
            )
        )
    tokens = stats.get("tokens", {})
    blocks.append(
        (
            "p",
            "Tokens: "
            + ", ".join(f"{k} {v.get('tokens', 0):,}" for k, v in tokens.items())
            + f"; vocabulary {stats.get('vocab_size')}; {stats.get('mb_per_s')} MB/s.",
        )
    )
    return blocks


def _summary_of(run: Path, name: str) -> dict | None:
    rows = read_metrics(run / name / "metrics.jsonl", missing_ok=True)
    return next((r["summary"] for r in rows if "summary" in r), None)


def _training_blocks(run: Path) -> list[tuple]:
    blocks: list[tuple] = []
    for names, file, title in (
        (["base", "draft"], "loss_pretrain.png", "pretraining (base) and distillation (draft)"),
        (["sft"], "loss_sft.png", "fine-tuning (validation picks the shipped checkpoint)"),
    ):
        plot = _loss_plot(run, names, file, title)
        if plot:
            blocks.append(("img", title, plot))
    for name in ("base", "sft", "draft"):
        summary = _summary_of(run, name)
        if summary:
            blocks.append(
                (
                    "p",
                    f"{name}: {summary.get('steps')} steps, final loss {_fmt(summary.get('final_loss'))}, "
                    f"best validation loss {_fmt(summary.get('best_val_loss'))}, "
                    f"{_fmt(summary.get('tokens_per_s'))} tokens/s.",
                )
            )
    return blocks or [("p", "No training metrics.")]


def _per_model_eval(run: Path, models: dict[str, Path]) -> dict[str, dict]:
    per_model = {}
    for label, path in models.items():
        res = _read(_eval_dir(run, path) / "results.json")
        if res:
            per_model[label] = {t["name"]: t for t in res.get("tasks", [])}
    return per_model


def _eval_blocks(run: Path, per_model: dict[str, dict]) -> list[tuple]:
    from lmforge.eval.tasks import primary_metric

    if not per_model:
        return [("p", "Evaluation stage: not available (no eval results).")]
    names = [n for tasks in per_model.values() for n in tasks]
    names = list(dict.fromkeys(names))
    header = ["model"] + [
        f"{n} ({(primary_metric(next(m[n] for m in per_model.values() if n in m)) or ('?',))[0]})" for n in names
    ]
    rows = [header] + [
        [label] + [_fmt((primary_metric(tasks[n]) or (None, None))[1]) if n in tasks else "-" for n in names]
        for label, tasks in per_model.items()
    ]
    blocks: list[tuple] = [
        (
            "p",
            "Held-out modules only (the data split's validation documents: no model trained "
            "on them). Fine-tuned models are asked in the chat format they were trained on, "
            "the others as code completion. Bits/byte: lower is better.",
        ),
        ("table", rows),
    ]
    chart = _eval_plot(run, per_model)
    if chart:
        blocks.append(("img", "evaluation by model", chart))
    flagged = [
        [label, n, _fmt(c.get("contaminated")), _fmt(c.get("contaminated_fraction"))]
        for label, tasks in per_model.items()
        for n, t in tasks.items()
        if (c := t.get("contamination") or {})
    ]
    if flagged:
        blocks += [
            (
                "p",
                "Contamination of the evaluation sets against everything the models trained on "
                "(pretraining documents and SFT conversations; 13-gram overlap):",
            ),
            ("table", [["model", "task", "contaminated examples", "fraction"]] + flagged),
        ]
    return blocks


# ----------------------------------------------------------------------------- summary


def _metric(per_model: dict, model: str, task: str, name: str | None = None):
    from lmforge.eval.tasks import primary_metric

    t = per_model.get(model, {}).get(task)
    if not t:
        return None
    return t["metrics"].get(name) if name else (primary_metric(t) or (None, None))[1]


def _sft_words(cfg: dict) -> str:
    """How final was fine-tuned, in the report's words: "LoRA, merged" or "full fine-tuning"."""
    method = str((cfg.get("sft") or {}).get("method", "lora"))
    names = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA"}
    return "full fine-tuning" if method == "full" else f"{names.get(method, method)}, merged"


def _summary_rows(run: Path, models: dict[str, Path], per_model: dict, gen: dict, sft_words: str) -> list[list[str]]:
    rows = [["stage", "what it built", "headline", "verdict"]]
    stats = _read(run / "data" / "stats.json") or {}
    if stats:
        tokens = stats.get("tokens", {}).get("train", {}).get("tokens")
        rows.append(
            [
                "data",
                f"{stats.get('read', {}).get('documents', '?'):,} documents read, "
                f"{stats.get('dedup', {}).get('documents_kept', '?')} kept",
                f"{tokens:,} training tokens" if tokens else "-",
                "-",
            ]
        )
    base_bpb = _metric(per_model, "base", "stdlib_code_ppl")
    summary = _summary_of(run, "base")
    if summary:
        rows.append(
            [
                "pretrain",
                "base model",
                f"held-out code {_fmt(base_bpb)} bits/byte, prose "
                f"{_fmt(_metric(per_model, 'base', 'stdlib_prose_ppl'))}",
                f"validation loss {_fmt(summary.get('best_val_loss'))} nats/token",
            ]
        )
    final_rouge, base_rouge = (
        _metric(per_model, FINAL, "stdlib_docstring"),
        _metric(per_model, "base", "stdlib_docstring"),
    )
    final_bpb = _metric(per_model, FINAL, "stdlib_code_ppl")
    if final_rouge is not None and base_rouge:
        ratio = final_rouge / base_rouge
        rise = (final_bpb / base_bpb - 1) if final_bpb and base_bpb else None
        good = ratio >= SFT_TARGET_RATIO and (rise is None or rise <= SFT_MAX_CODE_BPB_RISE)
        rows.append(
            [
                "sft",
                f"final ({sft_words}, best validation checkpoint)",
                f"docstring ROUGE-L {base_rouge:.3f} -> {final_rouge:.3f} ({ratio:.2f}x); code bits/byte "
                f"{_fmt(base_bpb)} -> {_fmt(final_bpb)} ({'+' if (rise or 0) >= 0 else ''}{(rise or 0) * 100:.1f}%)",
                "good: the task improved, code modelling kept"
                if good
                else "worse than the targets "
                f"({SFT_TARGET_RATIO}x ROUGE-L, <= {SFT_MAX_CODE_BPB_RISE * 100:.0f}% bits/byte)",
            ]
        )
    spec = next((r for r in gen.get("rows", []) if r["decoding"].startswith("speculative")), None)
    if spec:
        speedup, same = spec.get("speedup", 0), spec.get("identical_to_plain")
        if not (same and speedup >= 1.0):
            verdict = "slower or different: see Decoding speed"
        elif speedup >= SPEC_TARGET_SPEEDUP and (spec.get("acceptance_rate") or 0) >= SPEC_TARGET_ACCEPTANCE:
            verdict = "good: faster, same output"
        else:
            verdict = (
                f"faster, same output; short of the targets ({SPEC_TARGET_SPEEDUP}x, acceptance >= "
                f"{SPEC_TARGET_ACCEPTANCE}): see Decoding speed"
            )
        rows.append(
            [
                "draft",
                "a small model distilled from final",
                f"speculative decoding {spec.get('speedup')}x plain, acceptance {spec.get('acceptance_rate')}, "
                f"identical tokens: {spec.get('identical_to_plain')}",
                verdict,
            ]
        )
    scale = gen.get("quant_at_scale")
    quant = [label for label in models if label.startswith("final ") and label != FINAL]
    if quant:
        sizes = {
            label: sum(f.stat().st_size for f in models[label].glob("*.safetensors"))
            for label in [FINAL] + quant
            if label in models
        }
        headline = ", ".join(f"{label.removeprefix('final ')} {human_bytes(sizes[label])}" for label in quant)
        if scale:
            headline += (
                "; at "
                + f"{scale['parameters'] / 1e6:.0f}M parameters: "
                + ", ".join(f"{r['scheme']} {r['speedup']:.2f}x" for r in scale["rows"] if r["scheme"] != "fp32")
            )
        rows.append(
            [
                "quantize",
                ", ".join(q.removeprefix("final ") for q in quant) + " copies of final",
                f"fp32 {human_bytes(sizes.get(FINAL, 0))} -> {headline}",
                _quant_verdict(_quant_speedups(models, gen)),
            ]
        )
    contaminated = [
        c.get("contaminated_fraction", 0)
        for tasks in per_model.values()
        for t in tasks.values()
        if (c := t.get("contamination"))
    ]
    if per_model:
        rows.append(
            [
                "eval",
                f"{len(per_model)} models x {len({n for t in per_model.values() for n in t})} tasks",
                f"largest contaminated fraction {max(contaminated):.2f}" if contaminated else "no contamination check",
                "clean: at most a few functions repeated across modules"
                if contaminated and max(contaminated) <= 0.05
                else "check the contamination table",
            ]
        )
    return rows


def _artefacts(run: Path, models: dict[str, Path]) -> list[tuple[str, str]]:
    links = [
        ("data report", "data/stats.md"),
        ("pretraining metrics", "base/metrics.jsonl"),
        ("SFT metrics", "sft/metrics.jsonl"),
        ("SFT training conversations", "sft/train_data.jsonl"),
        ("decode results", "generate/results.json"),
        ("stage logs", "logs/"),
    ]
    for label, path in models.items():
        rel = path.relative_to(run).as_posix()
        links.append((f"model: {label}", rel + "/"))
        links.append((f"eval report: {label}", _eval_dir(run, path).relative_to(run).as_posix() + "/report.html"))
    return [(text, href) for text, href in links if (run / href).exists()]


def write_report(cfg: dict, run: Path, models: dict[str, Path], stages: list[str]) -> dict[str, Path]:
    from lmforge.eval.report import to_html, to_markdown

    gen = _read(run / "generate" / "results.json") or {}
    per_model = _per_model_eval(run, models)
    stamps = {s: _read(run / ".stamps" / f"{s}.json") for s in stages}
    seconds = sum(st.get("seconds", 0) for st in stamps.values() if st)
    params = ""
    config = (_read(models["base"] / "lmforge_config.json") or {}).get("model") if "base" in models else None
    if config:
        from lmforge.model import ModelConfig

        params = f" of {ModelConfig.from_dict(config).num_parameters() / 1e6:.1f}M parameters"
    blocks: list[tuple] = [
        ("h1", f"lmforge pipeline: {cfg.get('name', run.name)}"),
        (
            "p",
            f"What was built: a language model{params} pretrained on the run's corpus, fine-tuned on the "
            f"signature -> docstring task ({_sft_words(cfg)}: `final`), a draft model distilled from `final` for "
            f"speculative decoding, and quantized copies; every stage measured on held-out data. "
            f"Stage time {seconds / 60:.1f} min.",
        ),
        ("h2", "Summary"),
        ("table", _summary_rows(run, models, per_model, gen, _sft_words(cfg))),
        (
            "table",
            [["stage", "status", "seconds"]]
            + [
                [
                    s,
                    "done" if st else ("this run" if s == "report" else "not available"),
                    _fmt(st.get("seconds")) if st else "-",
                ]
                for s, st in stamps.items()
            ],
        ),
        ("h2", "Artefacts"),
        ("links", _artefacts(run, models)),
        ("h2", "Data funnel"),
    ] + _data_blocks(run)
    blocks += [("h2", "Training")] + _training_blocks(run)
    blocks += [("h2", "Evaluation")] + _eval_blocks(run, per_model)
    blocks += [("h2", "Quantization")] + _quant_blocks(run, models, gen)
    blocks += [("h2", "Decoding speed")] + _decode_blocks(run, gen)
    paths = {"markdown": run / "report.md", "html": run / "report.html"}
    atomic_write_text(paths["markdown"], to_markdown(blocks))
    atomic_write_text(paths["html"], to_html(blocks, f"lmforge pipeline: {run.name}"))
    return paths
