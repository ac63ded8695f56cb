"""Whole-model quantization: every method quantizes the tiny Transformer layer by layer, saves,
loads without re-quantizing and generates the same tokens; bad input fails clearly."""

import copy
import json

import pytest
import torch

from lmforge.checkpoint import load_model, save_model
from lmforge.common import LmforgeError
from lmforge.model import ModelConfig, build_model
from lmforge.quant import FORMATS, IntNLinear, QuantLinear, QuantOptions, convert_qat, prepare_qat, quantize_model
from lmforge.quant.calibrate import first_block_inputs, run_block


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (4, 32), generator=g) for _ in range(4)]


@torch.no_grad()
def greedy(model, n=6):
    ids = torch.tensor([[1, 5, 9, 2]])
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], 1)
    return ids[0, 4:].tolist()


@pytest.mark.parametrize(
    "method,scheme",
    [
        ("rtn", "int8"),
        ("rtn", "int4-g32"),
        ("rtn", "nf4"),
        ("gptq", "int4-g32"),
        ("gptq", "int3-g64"),
        ("awq", "int4-g32"),
        ("smoothquant", "w8a8"),
        ("mixed", "int4-g32"),
    ],
)
def test_quantized_model_saves_loads_and_generates_the_same(model, calib, tmp_path, method, scheme):
    q = copy.deepcopy(model)
    opts = QuantOptions(
        method=method,
        scheme=scheme,
        act_order=scheme == "int3-g64",
        choices=("int3-g32", "int4-g32", "int8"),
        min_calib_tokens=256,
    )
    stats = quantize_model(q, opts, calib, progress=False)
    assert stats["peak_rss_bytes"] > 0
    swapped = [n for n, m in q.named_modules() if isinstance(m, QuantLinear)]
    assert len(swapped) == 14 and not any("lm_head" in n for n in swapped)  # 2 blocks x 7 linears
    save_model(q, tmp_path / "q")
    entry = json.loads((tmp_path / "q" / "lmforge_config.json").read_text())["transforms"][0]
    assert entry["kind"] == "quant" and entry["method"] == method
    loaded = load_model(tmp_path / "q")
    assert type(loaded.model.layers[1].mlp.down_proj) is type(q.model.layers[1].mlp.down_proj)
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), q(ids))
    assert greedy(loaded) == greedy(q)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_awq_folds_its_scales_and_reloads(calib, tmp_path, preset):
    torch.manual_seed(0)
    fp = build_model(preset).eval()
    q = copy.deepcopy(fp)
    quantize_model(q, QuantOptions(method="awq", scheme="int4-g32", min_calib_tokens=256), calib, progress=False)
    kept = sorted(
        {n.split(".", 3)[-1] for n, m in q.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None}
    )
    # Scales live in the norms / previous linears; only GPT-2's down_proj (after the GELU) keeps its own.
    assert kept == ([] if preset == "tiny" else ["mlp.down_proj"])
    assert not torch.equal(q.model.layers[0].input_layernorm.weight, fp.model.layers[0].input_layernorm.weight)
    save_model(q, tmp_path / "awq")
    loaded = load_model(tmp_path / "awq")
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), q(ids))
        assert (q(ids) - fp(ids)).abs().mean() < 0.1 * fp(ids).abs().mean()  # still the same model
    assert greedy(loaded) == greedy(q)


def test_qat_model_converts_saves_and_loads(model, tmp_path):
    q = prepare_qat(copy.deepcopy(model), "int4-g32")
    with torch.no_grad():
        before = q(torch.tensor([[1, 2, 3]]))
    convert_qat(q)
    assert isinstance(q.model.layers[0].self_attn.q_proj, IntNLinear)
    assert [e["method"] for e in q.lmforge_transforms] == ["qat"]
    save_model(q, tmp_path / "qat")
    loaded = load_model(tmp_path / "qat")
    with torch.no_grad():
        assert torch.allclose(loaded(torch.tensor([[1, 2, 3]])), before, atol=0.05)


def test_int4_g128_linears_about_4x_smaller_than_fp16():
    config = ModelConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        tie_word_embeddings=True,
    )
    m = build_model(config).eval()
    fp16 = sum(p.numel() * 2 for n, p in m.named_parameters() if "layers" in n and p.ndim == 2)
    quantize_model(m, QuantOptions(method="rtn", scheme="int4-g128"))
    q = sum(t.numel() * t.element_size() for n, t in m.state_dict().items() if "layers" in n and "norm" not in n)
    assert 3.7 < fp16 / q < 4.0  # 4.19 bits per weight: 4 + (fp16 scale + uint8 zero) / 128


def test_layer_by_layer_inputs_come_from_the_quantized_previous_block(model, calib):
    q = copy.deepcopy(model)
    seen = []
    from lmforge.quant.calibrate import calibrate_blocks

    def record_inputs(block, inputs, names):
        seen.append(inputs[0][0][0].clone())
        for n in names:  # crude quantization so that the difference is visible
            lin = block.get_submodule(n)
            lin.weight.data = lin.weight.data.sign() * lin.weight.data.abs().mean()

    calibrate_blocks(
        q, calib[:1], [n for n, _ in q.named_modules() if n.endswith("_proj")], record_inputs, progress=False
    )
    expected = run_block(q.model.layers[0], first_block_inputs(q, calib[:1]))[0][0][0]
    assert torch.allclose(seen[1], expected)
    float_next = run_block(model.model.layers[0], first_block_inputs(model, calib[:1]))[0][0][0]
    assert not torch.allclose(seen[1], float_next)


def test_too_little_calibration_data_is_a_clear_error(model):
    with pytest.raises(LmforgeError, match="calibration data: 16 calibration tokens, need at least 512"):
        quantize_model(
            copy.deepcopy(model), QuantOptions(method="gptq", scheme="int4-g32"), [torch.zeros(1, 16, dtype=torch.long)]
        )
    with pytest.raises(LmforgeError, match="unknown quantization method 'foo'"):
        quantize_model(copy.deepcopy(model), QuantOptions(method="foo"))


def test_checkpoint_with_an_unknown_format_gives_a_clear_error(model, tmp_path, monkeypatch):
    q = copy.deepcopy(model)
    quantize_model(q, QuantOptions(method="rtn", scheme="int4-g32"))
    save_model(q, tmp_path / "q")
    # A build of lmforge that predates the group-wise format:
    monkeypatch.delitem(FORMATS, "intn")
    with pytest.raises(LmforgeError, match=r"format 'intn' is not supported by this build of lmforge"):
        load_model(tmp_path / "q")
    monkeypatch.undo()
    # A checkpoint written by a newer lmforge with a format this one never heard of:
    path = tmp_path / "q" / "lmforge_config.json"
    meta = json.loads(path.read_text())
    meta["transforms"][0]["modules"]["model.layers.0.mlp.up_proj"]["format"] = "fp6"
    path.write_text(json.dumps(meta))
    with pytest.raises(LmforgeError, match=r"module model.layers.0.mlp.up_proj: quantization format 'fp6'"):
        load_model(tmp_path / "q")


def test_swapped_model_records_itself_and_qlora_reloads(model, tmp_path):
    from lmforge import peft
    from lmforge.quant import swap

    q = swap(copy.deepcopy(model), "nf4")
    assert [e["kind"] for e in q.lmforge_transforms] == ["quant"]
    peft.apply(q, peft.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    ids = torch.randint(0, 512, (2, 10))
    q(ids).float().pow(2).mean().backward()  # QLoRA: gradients reach the adapters through the NF4 base
    assert all(p.grad is not None for p in q.parameters() if p.requires_grad)
    save_model(q, tmp_path / "qlora")
    loaded = load_model(tmp_path / "qlora")
    with torch.no_grad():
        assert torch.equal(loaded(ids), q(ids))
