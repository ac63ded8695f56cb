"""CLIP-score filtering: Otsu's cut separates two score groups, the seeded mismatched set is
what it says, F1 is computed by hand, and `clip filter` writes the kept lines and reports the
dropped and unreadable ones."""

import json

import pytest
import torch
from vlm_utils import tiny_text_config

from lmforge.common import LmforgeError
from lmforge.multimodal import CLIP, ClipConfig, VisionConfig, make_shapes, save_multimodal
from lmforge.multimodal.filtering import (
    clip_score_metric,
    clip_scores,
    detection_f1,
    mismatch_captions,
    otsu_threshold,
)
from lmforge.tokenizer import train_tokenizer


def test_otsu_separates_two_groups():
    gen = torch.Generator().manual_seed(0)
    low = 0.05 + 0.03 * torch.randn(200, generator=gen)
    high = 0.6 + 0.05 * torch.randn(800, generator=gen)
    cut = otsu_threshold(torch.cat([low, high]))
    assert 0.15 < cut < 0.45
    assert otsu_threshold(torch.full((5,), 0.3)) == pytest.approx(0.3)


def test_mismatch_captions_and_f1():
    caps = [f"caption {i}" for i in range(50)]
    noisy, bad = mismatch_captions(caps, 0.2, seed=1)
    assert sum(bad) == 10 and all((n != c) == b for n, c, b in zip(noisy, caps, bad))
    assert mismatch_captions(caps, 0.2, seed=1) == (noisy, bad)
    assert detection_f1([True, True, False, False], [True, False, True, False]) == {
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
    }
    assert clip_score_metric(torch.tensor([0.4, -0.2])) == pytest.approx(2.5 * 0.4 / 2)


def _tiny_clip(tmp_path, examples):
    tok = train_tokenizer([e.captions[0] for e in examples], vocab_size=300)
    text = tiny_text_config(tok.vocab_size, max_positions=64)
    vision = VisionConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    model = CLIP(ClipConfig(vision, text, projection_dim=16)).eval()
    save_multimodal(model, tmp_path / "clip", tok)
    return model, tok


def test_clip_filter_cli_keeps_lines_above_the_threshold(tmp_path, capsys):
    from PIL import Image

    from lmforge.cli import main

    examples = make_shapes(12, seed=0, image_size=16)
    model, tok = _tiny_clip(tmp_path, examples)
    lines = []
    for i, ex in enumerate(examples):
        Image.fromarray(ex.image).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": ex.captions[0]}))
    lines.insert(3, json.dumps({"image": "missing.png", "caption": "x"}))
    lines.insert(5, "{not json")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    scores = clip_scores(model, tok, [ex.image for ex in examples], [ex.captions[0] for ex in examples])
    threshold = float(scores.median())
    out = tmp_path / "kept.jsonl"
    report = tmp_path / "report.json"
    args = ["clip", "filter", "--model", str(tmp_path / "clip"), "--data", str(pairs), "--filtered", str(out)]
    assert main([*args, "--threshold", str(threshold), "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    kept_lines = out.read_text().splitlines()
    expected = [
        json.dumps({"image": f"{i}.png", "caption": ex.captions[0]})
        for i, ex in enumerate(examples)
        if scores[i] >= threshold
    ]
    assert kept_lines == expected  # unchanged lines, in order
    assert got["kept"] == len(expected) and got["dropped"] == 12 - len(expected)
    assert sorted(u["line"] for u in got["unreadable"]) == [4, 6]
    assert all(d["score"] < threshold for d in got["dropped_pairs"])
    assert main([*args, "--threshold", "high"]) == 2
    assert "--threshold" in capsys.readouterr().err
    with pytest.raises(LmforgeError, match="pairs must match"):
        clip_scores(model, tok, [examples[0].image], [])
