"""The transform manifest's API (lmforge.model.manifest) and quant.dequantize_model."""

import pytest
import torch

from lmforge.model import build_model, drop_transforms, has_transform, record_transform, transforms


def test_the_manifest_records_reads_and_drops_by_kind():
    model = build_model("tiny")
    assert transforms(model) == [] and not has_transform(model, "peft")
    record_transform(model, {"kind": "peft", "config": {"method": "lora"}})
    record_transform(model, {"kind": "quant", "modules": {}})
    assert [e["kind"] for e in transforms(model)] == ["peft", "quant"]
    assert has_transform(model, "quant") and transforms(model, "peft") == [
        {"kind": "peft", "config": {"method": "lora"}}
    ]
    transforms(model).clear()  # a copy: reading never edits the model's manifest
    assert len(transforms(model)) == 2
    drop_transforms(model, "peft", where=lambda e: e["config"]["method"] == "ia3")
    assert len(transforms(model)) == 2
    drop_transforms(model, "peft")
    assert [e["kind"] for e in transforms(model)] == ["quant"]
    with pytest.raises(ValueError, match="kind"):
        record_transform(model, {"modules": {}})


def test_dequantize_model_gives_float_linears_with_the_quantized_weights(tmp_path):
    from lmforge.checkpoint import load_model, save_model
    from lmforge.quant import QuantLinear, QuantOptions, dequantize_model, quantize_model

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids)
    quantize_model(model, QuantOptions(method="rtn", scheme="int4-g32"), None, progress=False)
    assert has_transform(model, "quant")
    with torch.no_grad():
        quantized = model(ids)
    dequantize_model(model)
    assert not has_transform(model, "quant")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        dequantized = model(ids)
    # the rounding stays: the float copy computes what the quantized model did (its kernels differ
    # only in arithmetic order), far closer to it than to the original weights
    assert (dequantized - quantized).abs().max() < 0.1 * (full - quantized).abs().max()
    save_model(model, tmp_path / "m")  # a plain float checkpoint: nothing to replay
    assert transforms(load_model(tmp_path / "m")) == []
