"""The int8 CPU kernel paths (two 4-bit planes through torch's int4 kernel; torch's int8 kernel;
the dequantise fallback) agree with dequantise + matmul for shapes each path does and does not take."""

import pytest
import torch
from torch import nn

from lmforge.quant.linear import Int8Linear


@pytest.mark.parametrize(
    "k,n,path", [(256, 64, "int4x2"), (96, 48, "int4x2"), (48, 12, "int8"), (768, 100, "int8"), (100, 64, "none")]
)
@pytest.mark.parametrize("mean", [0.0, 4.0])  # activations far from zero mean must not cancel badly
def test_int8_kernel_paths_match_dequantized_matmul(k, n, path, mean):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    q = Int8Linear.from_float(lin)
    x = torch.randn(3, k) + mean
    with torch.no_grad():
        y = q(x)
        ref = nn.functional.linear(x, q.dequantize(), lin.bias)
    assert q._cache[0] == path
    # bf16 activations: about 3e-3 relative error; the planes add no more than that.
    assert ((y - ref).norm() / ref.norm()).item() < 5e-3


def test_int8_planes_reconstruct_every_code():
    q = Int8Linear(32, 256, bias=False)
    q.weight.copy_(torch.arange(-127, 128, dtype=torch.int8).repeat(32, 2)[:, :256].t().contiguous()[:256])
    q.scales.fill_(1.0)
    eye = torch.eye(32)
    with torch.no_grad():
        y = q(eye)  # row j: column j of the weight, i.e. the codes themselves
    assert q._cache[0] == "int4x2"
    assert torch.equal(y.round(), q.weight.float().t())


def test_quantized_tied_head_is_untied_and_survives_save_and_load(tmp_path):
    from lmforge.checkpoint import load_model, save_model
    from lmforge.infer.generate import generate
    from lmforge.model import ModelConfig, Transformer
    from lmforge.quant import QuantOptions, quantize_model
    from lmforge.quant.scheme import DEFAULT_SKIP, HEAD_PATTERN

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=256, tie_word_embeddings=True)).eval()
    skip = tuple(p for p in DEFAULT_SKIP if p != HEAD_PATTERN)
    quantize_model(model, QuantOptions(method="rtn", scheme="int8", skip=skip), progress=False)
    assert isinstance(model.lm_head, Int8Linear) and not model.config.tie_word_embeddings
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the embedding keeps its float table
    save_model(model, tmp_path / "q")
    loaded = load_model(tmp_path / "q").eval()
    assert isinstance(loaded.lm_head, Int8Linear)
    prompt = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(generate(model, prompt, max_new_tokens=8), generate(loaded, prompt, max_new_tokens=8))


def test_layers_no_kernel_takes_keep_one_dequantized_copy():
    """A width the int4 kernel cannot take (688 is not a multiple of a kernel group size) is
    dequantised once, not at every call, and gives the dequantised result."""
    from lmforge.quant.linear import IntNLinear

    torch.manual_seed(0)
    lin = nn.Linear(688, 64)
    q = IntNLinear.from_float(lin, bits=4, group_size=128)  # falls back to a group that divides 688
    x = torch.randn(2, 688)
    with torch.no_grad():
        y1, y2 = q(x), q(x)
        ref = nn.functional.linear(x, q.dequantize(), lin.bias)
    assert q._cache is False and q._dense is not None
    assert torch.allclose(y1, ref, atol=1e-4) and torch.equal(y1, y2)
    q.set_quantized(q.codes(), q.scales * 2, q.zeros)  # new weights drop the copy
    assert q._dense is None
