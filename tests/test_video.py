"""Video QA: frame sampling, generated clips deterministic and answerable only from the order,
the VLM's temporal embeddings (frames in order, max_frames enforced), and the `video` CLI."""

import json

import numpy as np
import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.model import ModelConfig
from lmforge.multimodal import VisionConfig, VisionLanguageModel, VlmConfig
from lmforge.multimodal.video import make_motion_clips, sample_frames, shuffle_frames


def test_sample_frames_uniform_and_stride():
    assert sample_frames(120, 4) == [15, 45, 75, 105]
    assert sample_frames(3, 5) == [0, 0, 1, 2, 2]  # a short clip repeats frames rather than failing
    assert sample_frames(20, 8, "stride", 3) == [0, 3, 6, 9, 12, 15, 18]
    with pytest.raises(LmforgeError, match="mode"):
        sample_frames(10, 2, "random")
    with pytest.raises(LmforgeError, match="cannot sample"):
        sample_frames(0, 2)


def test_clips_are_deterministic_and_need_the_order():
    a, b = make_motion_clips(9, seed=2), make_motion_clips(9, seed=2)
    assert all(np.array_equal(x.frames, y.frames) and x.qa == y.qa for x, y in zip(a, b))
    kinds = [c.qa[0][2] for c in a]
    assert kinds.count("move") == kinds.count("appear") == kinds.count("change") == 3
    for clip in a:
        assert clip.frames.shape == (6, 32, 32, 3)
        kind = clip.qa[0][2]
        if kind == "move":  # the shape's centre of mass travels the way the answer says
            mass = [np.argwhere(f.max(-1) > 60).mean(0) for f in clip.frames]
            dy, dx = mass[-1] - mass[0]
            way = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert way == clip.qa[0][1]
        if kind == "appear":  # every shape is on screen equally long: counting frames cannot answer
            lit = [(f.max(-1) > 60).sum() for f in clip.frames]
            assert len(set(lit)) > 1
    rng = np.random.default_rng(0)
    shuffled = shuffle_frames(a[0].frames, rng)
    assert sorted(map(bytes, shuffled)) == sorted(map(bytes, a[0].frames))


def _tiny_video_vlm(max_frames: int = 4) -> VisionLanguageModel:
    vision = VisionConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    text = ModelConfig.preset(
        "tiny",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return VisionLanguageModel(VlmConfig(vision, text, image_token_id=5, max_frames=max_frames))


def test_video_features_add_temporal_embeddings_in_frame_order():
    torch.manual_seed(0)
    model = _tiny_video_vlm()
    frames = torch.randn(2, 3, 3, 16, 16)
    with torch.no_grad():
        model.temporal.weight.normal_()
        feats = model.video_features(frames)
        assert feats.shape == (2, 3 * 4, 32)  # 3 frames x 4 patches each
        per_frame = model.vision_features(frames[0]) + model.temporal.weight[:3, None]
        assert torch.allclose(feats[0], model.projector(per_frame.flatten(0, 1)), atol=1e-6)
        swapped = model.video_features(frames[:, [1, 0, 2]])
        assert not torch.allclose(swapped[:, :4], feats[:, 4:8])  # order matters through the embedding
    with pytest.raises(LmforgeError, match="max_frames"):
        model.video_features(torch.randn(1, 5, 3, 16, 16))
    with pytest.raises(LmforgeError, match="images, not videos"):
        _tiny_video_vlm(0).video_features(frames)


def test_video_cli_trains_and_evaluates(tmp_path):
    from lmforge.cli import main

    out = tmp_path / "video"
    sets = [
        "--set",
        "train_size=12",
        "--set",
        "eval_size=6",
        "--set",
        "steps=2",
        "--set",
        "batch_size=4",
        "--set",
        "vision.hidden_size=32",
        "--set",
        "vision.intermediate_size=64",
        "--set",
        "lm_overrides.hidden_size=32",
        "--set",
        "lm_overrides.num_hidden_layers=1",
    ]
    assert main(["video", "train", "--out", str(out), *sets]) == 0
    metrics = json.loads((out / "config.json").read_text())["extra"]["metrics"]
    assert {"acc_all", "shuffled_acc_all", "acc_move", "chance"} <= set(metrics)
    assert main(["video", "eval", "--model", str(out), *sets, "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["clips"] == 6
