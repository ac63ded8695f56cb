"""Logit and greedy-token parity with transformers on tiny random models of every family."""

import json

import pytest
import torch
from hf_models import FAMILIES, make_hf_model

from lmforge.checkpoint import load_model, save_hf, save_model
from lmforge.common import LmforgeError
from lmforge.infer.generate import generate

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, load_model(d), d


def test_logits_match(pair):
    family, hf, ours, _ = pair
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert (out - ref).abs().max().item() <= 1e-4, family


def test_logits_match_with_padding_mask(pair):
    family, hf, ours, _ = pair
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0  # right padding in row 1
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max().item() <= 1e-4, family


def test_greedy_generation_matches(pair):
    family, hf, ours, _ = pair
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=32,
            do_sample=False,
            min_new_tokens=32,
            pad_token_id=0,
        )[:, 12:]
    out = generate(ours, ids, max_new_tokens=32, temperature=0.0)
    assert out.tolist() == ref.tolist(), family


def test_round_trip_through_hf_export(pair, tmp_path):
    family, hf, ours, _ = pair
    save_hf(ours, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4, family


def test_lmforge_checkpoint_round_trip(pair, tmp_path):
    family, _, ours, _ = pair
    save_model(ours, tmp_path / "ck")
    again = load_model(tmp_path / "ck")
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def test_moe_aux_loss_matches_transformers(tmp_path):
    hf = make_hf_model("mixtral")
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True).aux_loss
        _, aux = ours(ids, return_aux_loss=True)
    assert abs(aux.item() - ref.item()) < 1e-5


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LmforgeError, match="not a model folder"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LmforgeError, match="unsupported model_type 'bert'"):
        load_model(tmp_path)


def test_missing_and_misshaped_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = make_hf_model("llama")
    hf.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(str(f))
    bad = dict(state)
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(bad, str(f))
    with pytest.raises(LmforgeError, match=r"model.layers.0.self_attn.q_proj.weight has shape \(3, 3\)"):
        load_model(tmp_path)
    del bad["model.layers.0.self_attn.q_proj.weight"]
    save_file(bad, str(f))
    with pytest.raises(LmforgeError, match="missing tensor.*q_proj"):
        load_model(tmp_path)
    f.write_bytes(b"garbage")
    with pytest.raises(LmforgeError, match="not a readable safetensors"):
        load_model(tmp_path)


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4
