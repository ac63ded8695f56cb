"""Vision-language on CPU, end to end, one table: CLIP zero-shot + retrieval (shapes, digits), the
CLIP-score filter's F1 at finding 20% swapped captions, and the LLaVA-style VLM (VQA, captioning,
the noise-image control, POPE hallucination splits), each against its target; plus the ViT forward
speed against transformers' CLIPVisionModel of the same shape (median ratio). The VLM trains with
20% POPE-style yes/no object questions (`existence_share`), so POPE measures what it learnt.

    python bench/multimodal.py                 # the shipped configs (minutes on a laptop CPU)
    python bench/multimodal.py --quick         # a smoke run: few steps, targets not expected
    python bench/multimodal.py --out runs/mm   # keep the trained models (default: a temp folder)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.config import load_config  # noqa: E402
from lmforge.multimodal import VisionConfig, VisionTransformer  # noqa: E402
from lmforge.multimodal.config import ClipTrainConfig, VlmTrainConfig  # noqa: E402
from lmforge.recipes import clip as clip_recipe  # noqa: E402
from lmforge.recipes import vlm as vlm_recipe  # noqa: E402

POPE = ("accuracy", "f1", "yes_ratio")
QUICK_CLIP = ["steps=40", "train_size=400", "eval_size=100"]
QUICK_VLM = ["text_warmup_steps=30", "stage1_steps=20", "stage2_steps=40", "train_size=400", "eval_size=40"]


def vit_speed(repeats: int = 7) -> tuple[float, float]:
    """Median seconds per forward of a batch of 64 images: lmforge ViT vs transformers."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    shape = dict(
        image_size=64, patch_size=8, hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4
    )
    ours = VisionTransformer(VisionConfig(**shape)).eval()
    hf = CLIPVisionModel(CLIPVisionConfig(**shape, attn_implementation="sdpa")).eval()
    x = torch.randn(64, 3, 64, 64)

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    timed(lambda: ours(x))
    timed(lambda: hf(pixel_values=x))
    # Interleave so machine noise hits both alike.
    a, b = [], []
    for _ in range(3):
        a.append(timed(lambda: ours(x)))
        b.append(timed(lambda: hf(pixel_values=x)))
    return statistics.median(a), statistics.median(b)


def row(name: str, value, target: str = "", ok: bool | None = None) -> str:
    value = f"{value:.3f}" if isinstance(value, float) else str(value)
    mark = "" if ok is None else ("PASS" if ok else "below target")
    return f"| {name:<46} | {value:>14} | {target:>8} | {mark:<12} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="folder for the trained models (default: temporary)")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out or tempfile.mkdtemp(prefix="lmforge-mm-"))
    start = time.perf_counter()
    clip_over = QUICK_CLIP if args.quick else []
    # The digits CLIP is independent: train it in a second process on the other core meanwhile.
    digits_cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "clip",
        "train",
        "--config",
        "clip-digits",
        "--out",
        str(out / "clip-digits"),
        "--json",
        str(out / "clip-digits.json"),
    ]
    digits_cmd += [a for o in clip_over for a in ("--set", o)]
    digits_proc = subprocess.Popen(digits_cmd, stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parent.parent)
    t0 = time.perf_counter()
    shapes = clip_recipe.train(load_config(ClipTrainConfig, "clip-shapes", clip_over), str(out / "clip-shapes"))
    t_clip_shapes = time.perf_counter() - t0
    vlm_over = (QUICK_VLM if args.quick else []) + [f"vision={out / 'clip-shapes'}", "existence_share=0.2"]
    cfg = load_config(VlmTrainConfig, "vlm-shapes", vlm_over)
    t0 = time.perf_counter()
    s1 = vlm_recipe.train(cfg, 1, None, str(out / "vlm-stage1"))
    s2 = vlm_recipe.train(cfg, 2, str(out / "vlm-stage1"), str(out / "vlm-stage2"))
    t_vlm = time.perf_counter() - t0
    if digits_proc.wait() != 0:
        raise SystemExit("the digits CLIP run failed (is scikit-learn installed? pip install 'lmforge[vision]')")
    digits = json.loads((out / "clip-digits.json").read_text())
    t_clip_digits = digits["train_seconds"]
    ours, hf = vit_speed()

    lines = [row("metric", "value", "target"), "|" + "-" * 48 + "|" + "-" * 16 + "|" + "-" * 10 + "|" + "-" * 14 + "|"]
    lines += [
        row(
            "CLIP shapes zero-shot acc (18 classes)", shapes["zero_shot_acc"], ">= 0.90", shapes["zero_shot_acc"] >= 0.9
        ),
        row("CLIP shapes image->text R@1 / R@5", f"{shapes['i2t_r1']:.3f}/{shapes['i2t_r5']:.3f}"),
        row("CLIP shapes text->image R@1 / R@5", f"{shapes['t2i_r1']:.3f}/{shapes['t2i_r5']:.3f}"),
        row("CLIP filter F1, 20% swapped captions", shapes["filter_f1"], ">= 0.90", shapes["filter_f1"] >= 0.9),
        row("  precision / recall", f"{shapes['filter_precision']:.3f}/{shapes['filter_recall']:.3f}"),
        row(
            "CLIP digits zero-shot acc (10 classes)", digits["zero_shot_acc"], ">= 0.80", digits["zero_shot_acc"] >= 0.8
        ),
        row("CLIP digits text->image R@1 / R@5", f"{digits['t2i_r1']:.3f}/{digits['t2i_r5']:.3f}"),
        row("VLM stage 1 (projector only) caption CIDEr-D", s1["caption_cider"]),
        row("VLM stage 2 VQA acc (all)", s2["vqa_all"], ">= 0.85", s2["vqa_all"] >= 0.85),
        row("  colour / count / position", f"{s2['vqa_colour']:.2f}/{s2['vqa_count']:.2f}/{s2['vqa_position']:.2f}"),
        row("VLM stage 2 caption BLEU", s2["caption_bleu"]),
        row("VLM stage 2 caption CIDEr-D", s2["caption_cider"]),
        row(
            "VLM noise-image VQA acc (control)",
            s2["noise_vqa_all"],
            f"~{s2['blind_vqa_all']:.2f}",
            abs(s2["noise_vqa_all"] - s2["blind_vqa_all"]) <= 0.1,
        ),
        row("  blind baseline (best answer per question)", s2["blind_vqa_all"]),
        *(
            row(f"POPE {split}: accuracy / F1 / yes-ratio", "/".join(f"{s2[f'pope_{split}_{k}']:.2f}" for k in POPE))
            for split in ("random", "popular", "adversarial")
        ),
        row("train seconds: clip shapes / digits / vlm", f"{t_clip_shapes:.0f}/{t_clip_digits:.0f}/{t_vlm:.0f}"),
        row("ViT fwd s/batch64: lmforge / transformers", f"{ours:.4f}/{hf:.4f}"),
        row("ViT speed ratio (transformers / lmforge)", hf / ours),
    ]
    print("\n".join(lines))
    print(f"\nexample caption: {s2['caption_example']}; total {time.perf_counter() - start:.0f}s; models in {out}")
    (out / "bench.json").write_text(
        json.dumps(
            {
                "clip_shapes": shapes,
                "clip_digits": digits,
                "vlm_stage1": s1,
                "vlm_stage2": s2,
                "vit_seconds": {"lmforge": ours, "hf": hf},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
