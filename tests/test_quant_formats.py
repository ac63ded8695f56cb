"""Quantization formats: exact packing, round-trip error bounds, packed kernels equal the
dequantize + matmul reference, the saved config, and the errors on bad input."""

import pytest
import torch
from torch import nn

from lmforge.common import LmforgeError
from lmforge.quant import FORMATS, check_config, parse_scheme, quant_config, quantize_state_dict, swap
from lmforge.quant import formats as fmt
from lmforge.quant.linear import NF4Linear
from lmforge.quant.pack import pack_bits, packed_size, unpack_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 64, 129])
def test_pack_round_trip_is_exact(bits, n):
    q = torch.randint(0, 2**bits, (5, n), dtype=torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_size(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), q)


def test_pack_is_dense():
    assert packed_size(128, 4) == 64 and packed_size(128, 2) == 32 and packed_size(128, 3) == 48
    # Two int4 per byte, low nibble first.
    assert pack_bits(torch.tensor([[3, 10]]), 4).item() == 3 | (10 << 4)


def test_int8_round_trip_within_half_a_step():
    w = torch.randn(32, 96)
    q, s = fmt.sym_quantize(w)
    err = (fmt.sym_dequantize(q, s) - w).abs()
    assert (err <= s.float()[:, None] / 2 + 1e-3 * w.abs().amax(1, keepdim=True)).all()
    assert (err.norm() / w.norm()) < 0.01


@pytest.mark.parametrize("bits,group,rel", [(4, 32, 0.12), (4, 128, 0.14), (3, 64, 0.26), (2, 32, 0.55)])
def test_group_round_trip_within_half_a_step(bits, group, rel):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(bits * group))
    q, scale, zero = fmt.rtn_group(w, bits, group)
    assert q.max() < 2**bits
    deq = fmt.group_dequantize(q, scale, zero)
    step = scale.repeat_interleave(group, dim=1)
    err = (deq - w).abs()
    # Half a step, except where the rounded integer zero point pushes a group's extreme one code
    # past the range (round(hi/s) + round(-lo/s) = 2^bits): clamped, it is off by up to one step.
    assert (err <= step + 1e-4).all() and (err > step / 2 + 1e-4).float().mean() < 0.01
    assert (deq - w).norm() / w.norm() < rel


def test_nf4_round_trip_and_double_quantised_scales():
    w = torch.randn(64, 128)
    m = NF4Linear.from_float(nn.Linear(128, 64, bias=False).requires_grad_(False).to(torch.float32))
    m.set_weight(w)
    deq = m.dequantize()
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    # Worst case: half the widest gap between NF4 levels (-1.0 to -0.696) plus the absmax int8 error.
    assert ((deq - w).reshape(-1, 64).abs() <= 0.153 * absmax + 0.01).all()
    assert (deq - w).norm() / w.norm() < 0.12
    assert m.absmax_q.dtype == torch.int8 and m.qweight.numel() == w.numel() // 2


def _layer(n=64, k=128, bias=True):
    torch.manual_seed(0)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int4-g128", "int3-g64", "int2-g32", "nf4", "w8a8"])
def test_packed_kernel_equals_dequantize_matmul(scheme):
    lin = _layer()
    q = swap(nn.Sequential(lin), scheme)[0]
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        fast = q(x)
        q.use_kernels = False
        ref = q(x)
    ref_float = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
    # Kernels take bf16 activations: agreement to bf16 precision.
    assert torch.allclose(fast, ref, atol=0.02, rtol=0.02)
    if scheme != "w8a8":  # W8A8 also rounds the activations, dequantize() covers only the weights
        assert torch.allclose(ref, ref_float, atol=1e-5)


def test_gradient_flows_to_inputs_through_quantized_linear():
    q = swap(nn.Sequential(_layer()), "nf4")[0]
    x = torch.randn(4, 128, requires_grad=True)
    q(x).sum().backward()
    assert torch.allclose(x.grad, q.dequantize().sum(0).expand(4, -1), atol=1e-5)


def test_meta_rebuild_from_config_matches_state_dict():
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32, bias=False))
    swap(model, "int4-g32")
    config = quant_config(model)
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32, bias=False))
    swap(empty, config)
    a, b = model.state_dict(), empty.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    empty.load_state_dict(a, assign=True)
    x = torch.randn(2, 128)
    assert torch.equal(empty(x), model(x))


def test_quantize_state_dict_matches_module_swap():
    model = nn.Sequential(nn.Linear(128, 64), nn.Embedding(10, 128))
    sd = {"0.weight": model[0].weight.detach(), "0.bias": model[0].bias.detach(), "embed.weight": torch.randn(10, 128)}
    out, config = quantize_state_dict(sd, "int4-g64")
    swap(model, "int4-g64")
    assert set(config["modules"]) == {"0"}
    assert torch.equal(out["0.qweight"], model[0].qweight) and "embed.weight" in out


def test_odd_width_falls_back_to_a_dividing_group_size():
    q = swap(nn.Sequential(nn.Linear(176, 16)), "int4-g128")[0]
    assert q.group_size == 88 and q.spec()["group_size"] == 88


def test_unknown_scheme_and_format_errors_name_the_value():
    with pytest.raises(LmforgeError, match="unknown quantization scheme 'int5'"):
        parse_scheme("int5")
    config = {"quant_method": "lmforge", "version": 1, "modules": {"lm.q": {"format": "fp3"}}}
    with pytest.raises(LmforgeError, match="module lm.q: quantization format .fp3. is not supported by this build"):
        check_config(config, "ckpt/lmforge_config.json")
    with pytest.raises(LmforgeError, match="version 9 is newer"):
        check_config({**config, "version": 9})
    assert parse_scheme("INT4") == {"format": "intn", "bits": 4, "group_size": 128}
    assert set(FORMATS) == {"int8", "intn", "nf4", "w8a8", "ternary", "q8_0", "q4_0"}
