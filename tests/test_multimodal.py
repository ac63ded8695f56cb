"""Vision-language: ViT parity with transformers' CLIPVisionModel, InfoNCE, data, splicing,
generation with a KV cache, metrics, and that tiny training runs lower their loss."""

import base64
import io
import json
import math

import numpy as np
import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.infer.decode import decode_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig
from lmforge.multimodal import (
    CLIP,
    ClipConfig,
    VisionConfig,
    VisionLanguageModel,
    VlmConfig,
    cider_d,
    expand_image_tokens,
    info_nce,
    load_hf_vision,
    load_image,
    load_multimodal,
    make_shapes,
    prepare_chat,
    read_jsonl_folder,
    recall_at_k,
    save_hf_vision,
    save_multimodal,
    splice,
)

PIL = pytest.importorskip("PIL", reason="the vision extra (pillow) is not installed")

VC = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TEXT = ModelConfig.preset(
    "tiny", vocab_size=300, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def test_vit_matches_hf_clip_vision_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VC)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped key would show
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_vision(tmp_path / "hf").eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
        hidden, pooled = ours(x)
        penultimate, _ = ours(x, layer=-2)
    assert (hidden - ref.last_hidden_state).abs().max() <= 1e-4
    assert (pooled - ref.pooler_output).abs().max() <= 1e-4
    assert (penultimate - ref.hidden_states[-2]).abs().max() <= 1e-4
    # Export back: transformers loads our folder and computes the same thing.
    save_hf_vision(ours, tmp_path / "ours")
    again = transformers.CLIPVisionModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (again(pixel_values=x).pooler_output - pooled).abs().max() <= 1e-4


def test_info_nce_hand_example():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    # Each row and column: -log(e^2 / (e^2 + e^0)) = log(1 + e^-2).
    expected = math.log(1 + math.exp(-2))
    assert info_nce(logits).item() == pytest.approx(expected, abs=1e-6)
    assert info_nce(logits, torch.eye(2)).item() == pytest.approx(expected, abs=1e-6)
    # Asymmetric: i2t rows [3,1],[0,1] -> CE 0.1269, 0.3133; t2i columns [3,0],[1,1] -> 0.0486, 0.6931.
    logits = torch.tensor([[3.0, 1.0], [0.0, 1.0]])
    i2t = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    t2i = (math.log(1 + math.exp(-3)) + math.log(2)) / 2
    assert info_nce(logits).item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_shapes_are_deterministic_and_consistent():
    a, b, c = make_shapes(6, seed=3), make_shapes(6, seed=3), make_shapes(6, seed=4)
    assert all(np.array_equal(x.image, y.image) and x.captions == y.captions and x.qa == y.qa for x, y in zip(a, b))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))
    for ex in a:
        assert ex.image.shape == (32, 32, 3) and ex.image.dtype == np.uint8
        n = ex.captions[0].count(" left of ") + 1
        count = dict((kind, ans) for _, ans, kind in ex.qa)["count"]
        assert count == ["zero", "one", "two", "three"][n]
        assert ex.qa[1][1] == ex.captions[0].split(" left of ")[0].split()[-1]  # leftmost shape
        shapes = [phrase.split()[-1] for phrase in ex.captions[0].split(" left of ")]
        assert ex.extra_captions == [" left of ".join(f"a {s}" for s in shapes)]  # colours dropped
    single = make_shapes(20, seed=0, max_shapes=1)
    assert all(ex.label is not None and 0 <= ex.label < 18 for ex in single)


def _vlm(image_token_id=7):
    vision = VisionConfig(**VC)
    return VisionLanguageModel(VlmConfig(vision, TEXT, image_token_id)).eval()


def test_expand_and_splice_put_features_exactly_at_the_placeholders():
    ids, mask = expand_image_tokens([1, 7, 2, 3], [0, 0, 1, 1], 7, 3)
    assert ids == [1, 7, 7, 7, 2, 3] and mask == [0, 0, 0, 0, 1, 1]
    embeds = torch.randn(2, 6, 4)
    input_ids = torch.tensor([[1, 7, 7, 7, 2, 3], [7, 7, 7, 5, 5, 5]])
    feats = torch.randn(2, 3, 4, requires_grad=True)
    out = splice(embeds, input_ids, feats, 7)
    assert torch.equal(out[0, 1:4], feats[0].detach()) and torch.equal(out[1, :3], feats[1].detach())
    assert torch.equal(out[0, [0, 4, 5]], embeds[0, [0, 4, 5]]) and torch.equal(out[1, 3:], embeds[1, 3:])
    out.sum().backward()
    assert torch.equal(feats.grad, torch.ones_like(feats))  # differentiable into the projector
    with pytest.raises(LmforgeError, match="image-token slots"):
        splice(embeds, input_ids, feats[:1], 7)


def test_vlm_forward_uses_the_image_and_generation_matches_full_forward():
    model = _vlm()
    n = model.vlm_config.num_image_tokens
    ids = torch.tensor([[1] + [7] * n + [20, 21, 22]])
    a, b = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(model(ids, a)[0, -1], model(ids, b)[0, -1])
        embeds = model.embed(ids, a)
        fast = decode_ids(model, SamplingParams(max_new_tokens=5), inputs_embeds=embeds)[0]
        slow, cur = [], ids  # greedy by recomputing the whole sequence each step
        for _ in range(5):
            nxt = int(model(cur, a)[0, -1].argmax())
            slow.append(nxt)
            cur = torch.cat([cur, torch.tensor([[nxt]])], dim=1)
    assert fast == slow
    with pytest.raises(LmforgeError, match="no image was given"):
        model(ids)


def _png_bytes(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (10, 12), color).save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_sources_and_errors(tmp_path):
    url = "data:image/png;base64," + base64.b64encode(_png_bytes()).decode()
    arr = load_image(url)
    assert arr.shape == (12, 10, 3) and tuple(arr[0, 0]) == (255, 0, 0)
    with pytest.raises(LmforgeError, match="base64"):
        load_image("data:image/png;base64,@@@")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(LmforgeError, match="bad.png: not a readable image"):
        load_image(tmp_path / "bad.png")


def test_jsonl_folder_reports_and_skips_broken_images(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png_bytes())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    lines = [
        {"image": "ok.png", "caption": "a red box"},
        {"image": "broken.png", "caption": "x"},
        {"image": "missing.png", "caption": "y"},
        {
            "image": "ok.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}],
        },
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    examples, skipped = read_jsonl_folder(tmp_path / "data.jsonl")
    assert len(examples) == 2 and len(skipped) == 2
    assert "data.jsonl:2" in skipped[0] and "not a readable image" in skipped[0]
    assert "data.jsonl:3" in skipped[1] and "not found" in skipped[1]
    assert examples[0].captions == ["a red box"] and examples[1].qa == [("What colour?", "Red.", "qa")]


def test_prepare_chat_accepts_openai_image_url_parts():
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(["what colour is the circle? red"] * 4, vocab_size=280)
    model = VisionLanguageModel(VlmConfig(VisionConfig(**VC), TEXT, tok.token_to_id("<image>"))).eval()
    url = "data:image/png;base64," + base64.b64encode(_png_bytes()).decode()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what colour?"}],
        }
    ]
    inputs = prepare_chat(model, tok, messages)
    n = model.vlm_config.num_image_tokens
    assert int((inputs["input_ids"] == tok.token_to_id("<image>")).sum()) == n
    assert inputs["pixel_values"].shape == (1, 3, 16, 16)
    assert inputs["inputs_embeds"].shape == (*inputs["input_ids"].shape, TEXT.hidden_size)
    assert tok.decode(inputs["input_ids"][0], skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_save_and_load_round_trip(tmp_path):
    model = _vlm()
    save_multimodal(model, tmp_path / "vlm")
    again = load_multimodal(tmp_path / "vlm", kind="vlm")
    ids = torch.tensor([[1] + [7] * 16 + [3]])
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(ids, x), again(ids, x))
    with pytest.raises(LmforgeError, match="expected 'clip'"):
        load_multimodal(tmp_path / "vlm", kind="clip")


def test_metrics_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.0, 0.1, 0.2]])
    r = recall_at_k(sim, torch.eye(3, dtype=torch.bool), ks=(1, 2))
    assert r[1] == pytest.approx(2 / 3) and r[2] == pytest.approx(1.0)
    refs = [["a red circle"], ["a blue square"], ["a green triangle left of a red circle"]]
    perfect = cider_d([r[0] for r in refs], refs)
    partial = cider_d(["a red square", "a blue square", "a green circle"], refs)
    assert perfect > partial > 0
    assert cider_d(["zzz", "zzz", "zzz"], refs) == 0.0


def test_tiny_clip_training_lowers_the_loss():
    examples = make_shapes(64, seed=0, image_size=16)
    from lmforge.multimodal import to_pixels
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer([e.captions[0] for e in examples], vocab_size=300)
    model = CLIP(ClipConfig(VisionConfig(**VC), TEXT, projection_dim=16))
    pixels = to_pixels([e.image for e in examples], 16, model.config.vision.image_mean, model.config.vision.image_std)
    rows = [tok.encode(e.captions[0]) + [tok.eos_id] for e in examples]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    caps = [e.captions[0] for e in examples]
    same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
    targets = same / same.sum(1, keepdim=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = info_nce(model(pixels, ids, mask), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_tiny_vlm_projector_training_lowers_the_loss():
    import torch.nn.functional as F

    # A frozen LM with 0.02-scale tied embeddings cannot produce confident logits at all
    # (|logit| <= |e| sqrt(d) ~ 0.6); a larger init gives the projector something to steer.
    text = ModelConfig.from_dict({**TEXT.to_dict(), "initializer_range": 0.3})
    model = VisionLanguageModel(VlmConfig(VisionConfig(**VC), text, 7))
    model.language_model.requires_grad_(False)
    n = model.vlm_config.num_image_tokens
    x = torch.randn(8, 3, 16, 16)
    targets = torch.randint(10, 50, (8,))  # a different answer token per image: needs the image
    ids = torch.cat([torch.full((8, 1), 1), torch.full((8, n), 7), torch.full((8, 1), 2)], dim=1)
    opt = torch.optim.AdamW(model.projector.parameters(), lr=1e-2)
    losses = []
    model.train()
    for _ in range(30):
        loss = F.cross_entropy(model(ids, x)[:, -1], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in model.vision.parameters())  # the encoder stays frozen


def test_cli_errors_are_one_line(tmp_path, capsys):
    from lmforge.cli import main

    assert main(["vlm", "eval", "--model", str(tmp_path)]) == 2
    assert "not an lmforge CLIP/VLM/ALM folder" in capsys.readouterr().err
    assert main(["clip", "train", "--out", str(tmp_path / "o"), "--set", "nope=1"]) == 2
    assert "override 'nope': unknown field 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_pooled_image_tokens_average_the_patch_grid():
    vision = VisionConfig(**VC)  # 16 / 4 -> a 4x4 grid
    model = VisionLanguageModel(VlmConfig(vision, TEXT, 7, pool=2)).eval()
    assert model.vlm_config.num_image_tokens == 4
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        hidden, _ = model.vision(x)
        grid = hidden[:, 1:].reshape(2, 4, 4, -1)
        top_left = grid[:, :2, :2].mean(dim=(1, 2))  # pooled token 0 = mean of patches (0,0),(0,1),(1,0),(1,1)
        assert torch.allclose(model.image_features(x)[:, 0], model.projector(top_left), atol=1e-6)
    with pytest.raises(LmforgeError, match="must divide"):
        VlmConfig(vision, TEXT, 7, pool=3)


def test_hard_negative_batches_pair_near_miss_captions():
    from lmforge.recipes.clip import hard_negative_indices

    caps = ["a red circle", "a blue circle", "a red square", "a green triangle left of a blue square"] * 5
    idx = hard_negative_indices(caps, 8, np.random.default_rng(0))
    anchors, partners = idx[:4], idx[4:]
    for a, b in zip(anchors, partners):
        assert caps[a] != caps[b]
        assert len(set(caps[a].split()) & set(caps[b].split())) >= 2  # shares words: a near miss


def test_cls_patch_puts_the_class_token_first():
    vision = VisionConfig(**VC)
    model = VisionLanguageModel(VlmConfig(vision, TEXT, 7, pool=2, select_feature="cls_patch")).eval()
    assert model.vlm_config.num_image_tokens == 5  # class token + 2x2 pooled patches
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        hidden, _ = model.vision(x)
        feats = model.vision_features(x)
    assert feats.shape == (2, 5, vision.hidden_size) and torch.equal(feats[:, 0], hidden[:, 0])
    again = VlmConfig.from_dict(model.vlm_config.to_dict())
    assert again.select_feature == "cls_patch" and again.num_image_tokens == 5
    with pytest.raises(LmforgeError, match="select_feature"):
        VlmConfig(vision, TEXT, 7, select_feature="cls")


def test_info_nce_with_text_only_negatives():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 0.5]])  # column 2: a negative caption, no image
    i2t = (-logits.log_softmax(1)[[0, 1], [0, 1]]).mean()
    t2i = (-logits[:, :2].T.log_softmax(1)[[0, 1], [0, 1]]).mean()
    assert info_nce(logits).item() == pytest.approx(((i2t + t2i) / 2).item(), abs=1e-6)
    from lmforge.multimodal import same_text_targets

    # The negative equals row 1's caption: for row 1 it is a match, not a negative.
    targets = same_text_targets(["a", "b"], ["a", "b", "b"])
    assert targets.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]
    assert info_nce(logits, targets).item() < info_nce(logits).item() + 1.0


def test_near_miss_captions_swap_exactly_one_word():
    from lmforge.recipes.clip import near_miss_captions

    caps = ["a small red circle", "a large blue square left of a small red circle", "a lonely caption"]
    corpus = {}
    for text in caps[:2] + ["a large green square", "a small red triangle left of a large blue circle"]:
        corpus.setdefault(len(text.split()), []).append(text.split())
    out = near_miss_captions(caps, corpus, 2, np.random.default_rng(0))
    assert len(out) == 6
    for cap, neg in zip(caps * 2, out):
        diff = [a != b for a, b in zip(cap.split(), neg.split())]
        assert len(neg.split()) == len(cap.split()) and sum(diff) == (0 if cap == "a lonely caption" else 1)


def test_vlm_stage2_can_tune_the_image_encoder(tmp_path):
    """`vision_lr > 0`: stage 2 trains the encoder too (features per batch, not cached) and saves it."""
    from lmforge.multimodal.config import VlmTrainConfig
    from lmforge.recipes import vlm as recipe
    from lmforge.tokenizer import train_tokenizer

    examples = make_shapes(16, seed=0, image_size=16)
    tok = train_tokenizer([c for e in examples for c in e.captions] + ["describe the image."], vocab_size=300)
    text = ModelConfig.from_dict({**TEXT.to_dict(), "vocab_size": tok.vocab_size})
    model = VisionLanguageModel(VlmConfig(VisionConfig(**VC), text, tok.token_to_id("<image>"), pool=2))
    cfg = VlmTrainConfig(batch_size=4, vision_lr=1e-3, warmup_steps=1, device="cpu")
    opt = recipe.stage_optimizer(model, 2, cfg)
    assert [g["base_lr"] for g in opt.param_groups] == [cfg.lr, cfg.lm_lr, cfg.vision_lr]
    assert not recipe.stage_optimizer(model, 1, cfg).param_groups[1:]  # stage 1: the projector only
    opt = recipe.stage_optimizer(model, 2, cfg)
    before = model.vision.patch_embed.weight.detach().clone()
    pairs = recipe.conversations(examples, 0.2, captions_only=False)
    recipe.fit(model, tok, examples, pairs, opt, 3, cfg, "cpu")
    assert not torch.equal(before, model.vision.patch_embed.weight)
