"""The pipeline report's speed sections: quantized copies (size, decode speed against fp32, and the
speed-up at a memory-bound size) and decoding (plain, prompt lookup, speculative with the draft, what a
verification costs), with the formatting they share with the rest of the report."""

from __future__ import annotations

from pathlib import Path

from lmforge.common import human_bytes
from lmforge.recipes._pipeline_charts import _bar_plot

FINAL = "final (sft, merged)"


def _fmt(v) -> str:
    if isinstance(v, float):  # 4 significant digits; large values in full (12,345, not 1.234e+04)
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return "-" if v is None else str(v)


def _quant_speedups(models: dict[str, Path], gen: dict) -> dict[str, float]:
    """{quantized label: its plain decode tokens/s over the fp32 final model's}, at this pipeline's size."""
    speed = {r["model"]: r["tokens_per_s"] for r in gen.get("rows", []) if r["decoding"] == "plain greedy"}
    if not speed.get(FINAL):
        return {}
    return {
        label: speed[label] / speed[FINAL]
        for label in models
        if label.startswith("final ") and label != FINAL and speed.get(label)
    }


def _quant_verdict(speedups: dict[str, float]) -> str:
    if not speedups:
        return "smaller (see Quantization)"
    at = ", ".join(f"{label.removeprefix('final ')} {r:.2f}x" for label, r in speedups.items())
    tail = "" if min(speedups.values()) >= 1 else "; the slower ones are explained in Quantization"
    return f"smaller; decode speed vs fp32 at this size: {at}{tail}"


def _quant_blocks(run: Path, models: dict[str, Path], gen: dict) -> list[tuple]:
    speed = {r["model"]: r["tokens_per_s"] for r in gen.get("rows", []) if r["decoding"] == "plain greedy"}
    blocks: list[tuple] = [
        (
            "table",
            [["model", "size on disk", "decode tokens/s (this model)"]]
            + [
                [label, human_bytes(sum(f.stat().st_size for f in path.glob("*.safetensors"))), _fmt(speed.get(label))]
                for label, path in models.items()
                if label.startswith("final")
            ],
        )
    ]
    if len(blocks[0][1]) > 2:
        blocks.append(("p", "Each quantized copy is evaluated beside the fp32 model in Evaluation (its quality cost)."))
    slower = [label.removeprefix("final ") for label, r in _quant_speedups(models, gen).items() if r < 1]
    if slower:
        blocks.append(
            (
                "p",
                f"Slower than fp32 at this size: {', '.join(slower)}. fp32 and llama.cpp's block formats "
                "(q8_0, q4_0) decode a token in one C call (infer/fused_block.py); the other formats run "
                "each block as ~100 small torch ops around torch's packed matmuls, and a model this small "
                "sits in the CPU caches, so that per-op overhead, not reading the weights, sets its speed.",
            )
        )
    scale = gen.get("quant_at_scale")
    if scale:
        blocks += [
            (
                "p",
                f"Quantization pays most where decoding is memory-bound: every weight is read once per "
                f"token, so fewer bytes per weight mean more tokens/s. Measured on a randomly initialised "
                f"{scale['preset']} ({scale['parameters'] / 1e6:.0f}M parameters; speed depends on shapes, "
                f"not weight values), batch 1, {scale['threads']} threads, {scale['new_tokens']} new tokens:",
            ),
            (
                "table",
                [["scheme", "decode tokens/s", "speed-up over fp32"]]
                + [[r["scheme"], _fmt(r["tokens_per_s"]), f"{r['speedup']:.2f}x"] for r in scale["rows"]],
            ),
        ]
        behind = [r["scheme"] for r in scale["rows"] if r["speedup"] < 1]
        if behind:
            blocks.append(
                (
                    "p",
                    f"Slower than fp32 there too: {', '.join(behind)}. It reads fewer bytes, but runs each block "
                    "as torch ops around torch's packed matmuls, while fp32, q8_0 and q4_0 decode a token in one "
                    "C call that streams their weights at close to the memory's speed.",
                )
            )
    return blocks


def _draft_vocab_note(gen: dict) -> str:
    v, quant, cost = gen.get("draft_vocab"), gen.get("draft_quant"), gen.get("verify_cost")
    scale = (gen.get("quant_at_scale") or {}).get("verify_cost")
    notes = [f" The draft's layers run in {quant.upper()} (a cheaper proposer; the target checks every token)."]
    notes = notes if quant else []
    if v:
        notes.append(
            f" The draft proposes from the {v['tokens']:,} most frequent of the {v['of']:,} token ids of the "
            f"training data ({100 * v['coverage']:.1f}% of its tokens): its head, most of a one-layer draft's "
            "weights, shrinks by that factor (the row with the whole vocabulary shows the gain)."
        )
    if cost:  # measured: a verification is k + 1 rows; where a step is arithmetic-bound they are not free
        notes.append(
            f" Verifying {cost['rows'] - 1} drafts (a forward of {cost['rows']} rows) costs {cost['steps']:.2f} "
            "decode steps of `final` here: at this size a step is bound by arithmetic, not by reading the weights "
            f"(they stay in the CPU's caches), and {cost['rows']} rows are {cost['rows']} times the arithmetic"
            + (
                f" (at {gen['quant_at_scale']['parameters'] / 1e6:.0f}M parameters: {scale['steps']:.2f} steps)."
                if scale
                else "."
            )
        )
    return "".join(notes)


def _decode_blocks(run: Path, gen: dict) -> list[tuple]:
    if not gen.get("rows"):
        return [("p", "Generate stage: not available.")]
    rows = gen["rows"]
    blocks: list[tuple] = [
        (
            "p",
            f"Batch 1, greedy, {gen['max_new_tokens']} new tokens per prompt, {gen['threads']} thread(s) (the "
            f"faster for plain decoding of `final`), median of {gen.get('repeats', 1)} interleaved repeats."
            + _draft_vocab_note(gen),
        ),
        (
            "table",
            [["model", "decoding", "tokens/s", "speed-up", "acceptance", "same tokens as plain"]]
            + [
                [
                    r["model"],
                    r["decoding"],
                    _fmt(r["tokens_per_s"]),
                    _fmt(r.get("speedup")),
                    _fmt(r.get("acceptance_rate")),
                    _fmt(r.get("identical_to_plain")),
                ]
                for r in rows
            ],
        ),
    ]
    chart = _bar_plot(
        run,
        "decode_speed.png",
        "batch-1 decode speed",
        [f"{r['model']}: {r['decoding']}" for r in rows],
        [float(r["tokens_per_s"]) for r in rows],
        "tokens/s",
    )
    if chart:
        blocks.append(("img", "decode speed", chart))
    blocks.append(("h2", "Sample generations"))
    for label, samples in gen.get("samples", {}).items():
        fmt = gen.get("sample_format", {}).get(label, "completion")
        blocks += [("p", f"{label} ({fmt}; greedy)"), ("code", "\n\n---\n\n".join(samples))]
    return blocks
