"""The post-training methods beat round-to-nearest where they should, SmoothQuant's migration is
exact before rounding, QAT's straight-through estimator passes gradients, the mixed-precision
allocator meets its budget."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError
from lmforge.model import build_model
from lmforge.quant import FakeQuantLinear, IntNLinear, W8A8Linear, convert_qat, prepare_qat
from lmforge.quant import formats as fmt
from lmforge.quant.awq import _tie, apply_scale, awq_block, awq_linear, scale_groups, search_clip
from lmforge.quant.calibrate import first_block_inputs, run_block
from lmforge.quant.gptq import Hessian, gptq_quantize
from lmforge.quant.mixed import allocate
from lmforge.quant.scheme import set_module
from lmforge.quant.smooth import smooth_scales, smoothquant_linear


def _correlated_inputs(t=2048, k=128, seed=0):
    """Activations like a real layer's: correlated channels of very different magnitudes."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    mags = torch.exp(torch.randn(k, generator=g))
    return (torch.randn(t, k, generator=g) @ mix) * mags


def _out_err(w, wq, x):
    return (x @ (w - wq).t()).norm().item()


@pytest.mark.parametrize("bits,group,act_order", [(4, 32, False), (3, 64, False), (4, 32, True)])
def test_gptq_layer_error_below_rtn(bits, group, act_order):
    torch.manual_seed(0)
    w, x = torch.randn(64, 128) * 0.05, _correlated_inputs()
    h = Hessian(128)
    for chunk in x.split(500):  # running accumulation equals the one-shot 2 X^T X / n
        h.add(chunk)
    assert torch.allclose(h.h, 2 * x.t() @ x / len(x), rtol=1e-4, atol=1e-4)
    rtn = fmt.group_dequantize(*fmt.rtn_group(w, bits, group))
    q, scale, zero = gptq_quantize(w, h.h, bits, group, act_order=act_order)
    gptq = fmt.group_dequantize(q, scale, zero)
    assert _out_err(w, gptq, x) < 0.8 * _out_err(w, rtn, x)


def test_awq_output_error_below_rtn_with_outlier_channels():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    x = torch.randn(1024, 128)
    x[:, :4] *= 30  # a few salient input channels, as in LLM activations
    rtn = IntNLinear.from_float(lin, bits=4, group_size=64)
    awq = awq_linear(lin, x, bits=4, group_size=64)
    with torch.no_grad():
        ref = lin(x)
        assert (awq(x) - ref).norm() < 0.8 * (rtn(x) - ref).norm()
    assert awq.spec() == {"format": "intn", "bits": 4, "group_size": 64, "input_scale": True}


BLOCK_LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


@pytest.mark.parametrize(
    "preset,folded",
    [
        (
            "tiny",
            ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"],
        ),  # GQA: 2 heads per v
        ("tiny-gpt2", ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm"]),
    ],
)  # GELU between up and down
def test_awq_folding_is_output_preserving_before_rounding(preset, folded):
    torch.manual_seed(0)
    model = build_model(preset).eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = model(ids)
    for block in model.model.layers:
        names = [n for n in BLOCK_LINEARS if n != "mlp.gate_proj" or block.mlp.gate_proj is not None]
        groups = scale_groups(block, names)
        assert [g.prev for g in groups if g.prev] == folded
        assert [n for g in groups for n in g.linears] == names  # every linear once, in forward order
        for grp in groups:
            if grp.prev:
                k = block.get_submodule(grp.linears[0]).in_features
                apply_scale(block, grp, _tie(torch.rand(k) * 4 + 0.1, grp.index))
    with torch.no_grad():
        assert torch.allclose(model(ids), ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, torch.ones(64))


def _with_outlier_channels(block):
    """A float-identical block whose normalised activations have a few large channels (as LLMs do):
    those norm channels * 20, the matching weight columns / 20."""
    with torch.no_grad():
        for norm, linears in (("input_layernorm", BLOCK_LINEARS[:3]), ("post_attention_layernorm", BLOCK_LINEARS[4:6])):
            block.get_submodule(norm).weight[:3] *= 20
            for n in linears:
                block.get_submodule(n).weight[:, :3] /= 20
    return block


def test_awq_block_output_error_below_rtn_and_scales_folded():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    g = torch.Generator().manual_seed(1)
    calib, held = ([torch.randint(0, 512, (4, 32), generator=g) for _ in range(n)] for n in (4, 2))
    float_block = _with_outlier_channels(model.model.layers[0])
    inputs, held_inputs = first_block_inputs(model, calib), first_block_inputs(model, held)
    ref = run_block(float_block, held_inputs)
    errs = {}
    for method in ("rtn", "awq"):
        block = copy.deepcopy(float_block)
        if method == "awq":
            awq_block(block, inputs, BLOCK_LINEARS, bits=4, group_size=32)
        else:
            for n in BLOCK_LINEARS:
                set_module(block, n, IntNLinear.from_float(block.get_submodule(n), bits=4, group_size=32))
        assert all(isinstance(block.get_submodule(n), IntNLinear) for n in BLOCK_LINEARS)
        assert all(block.get_submodule(n).input_scale is None for n in BLOCK_LINEARS)  # all folded (GQA included)
        errs[method] = sum((o[0][0] - r[0][0]).pow(2).sum().item() for o, r in zip(run_block(block, held_inputs), ref))
    assert errs["awq"] < 0.5 * errs["rtn"], errs


def test_awq_clip_search_lowers_the_error_and_keeps_each_groups_output_slope():
    torch.manual_seed(0)
    w, x = torch.randn(16, 64), _correlated_inputs(512, 64)
    ratio, gain = search_clip(w, x, 3, 32)
    scale, zero = fmt.group_params(w, 3, 32, ratio)
    q = fmt.group_dequantize(fmt.group_quantize(w, scale, zero, 3), scale * gain, zero)
    assert (ratio < 1).any() and (gain != 1).any()
    for grp in (slice(0, 32), slice(32, 64)):  # each group's output: slope 1 on its float output
        y, yq = x[:, grp] @ w[:, grp].t(), x[:, grp] @ q[:, grp].t()
        assert torch.allclose((y * yq).sum(0), (y * y).sum(0), rtol=1e-3)
    rtn = fmt.group_dequantize(*fmt.rtn_group(w, 3, 32))
    assert _out_err(w, q, x) < 0.9 * _out_err(w, rtn, x)


def test_smoothquant_migration_is_output_preserving_before_rounding():
    torch.manual_seed(0)
    lin = nn.Linear(96, 48)
    x = torch.randn(32, 96)
    x[:, 5] *= 50
    s = smooth_scales(x.abs().amax(0), lin.weight, alpha=0.5)
    with torch.no_grad():
        assert torch.allclose(F.linear(x / s, lin.weight * s, lin.bias), lin(x), atol=1e-4, rtol=1e-5)
    # The balanced channel maxima: max|X_j / s_j| == max|W_j * s_j| at alpha 0.5.
    assert torch.allclose((x / s).abs().amax(0), (lin.weight * s).abs().amax(0), rtol=1e-4)


def test_smoothquant_w8a8_beats_plain_w8a8_on_outlier_activations():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    x = torch.randn(256, 128)
    x[:, :3] *= 100
    plain, smooth = W8A8Linear.from_float(lin), smoothquant_linear(lin, x.abs().amax(0), alpha=0.5)
    with torch.no_grad():
        ref = lin(x)
        assert (smooth(x) - ref).norm() < 0.5 * (plain(x) - ref).norm()
        plain.use_kernels = False
        fallback = plain(x)
        plain.use_kernels = True
        assert torch.allclose(plain(x), fallback, atol=1e-3, rtol=1e-3)  # torch._int_mm equals the float emulation


def test_qat_straight_through_estimator_passes_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    prepare_qat(model, "int4-g16", skip=())
    fq = model[0]
    assert isinstance(fq, FakeQuantLinear) and set(dict(model.named_parameters())) == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    }
    x = torch.randn(10, 64)
    out = fq(x)
    wq = fmt.group_dequantize(*fmt.rtn_group(fq.weight.detach(), 4, 16))
    assert torch.allclose(out, F.linear(x, wq, fq.bias), atol=1e-6)
    out.sum().backward()
    # STE: dL/dW is the float linear's gradient, sum_b x_b for a sum loss (rounding treated as identity).
    assert torch.allclose(fq.weight.grad, x.sum(0).expand(32, -1), atol=1e-5)
    # A few steps of training reduce a regression loss through the fake-quantised weights.
    target = torch.randn(10, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        trained = model(x)
        convert_qat(model)
        assert isinstance(model[0], IntNLinear)
        model[0].use_kernels = model[2].use_kernels = False
        assert torch.allclose(model(x), trained, atol=1e-5)  # conversion keeps what training saw


def test_mixed_allocation_meets_budget_and_protects_sensitive_layers():
    sens = {
        "a": {"int3": 5.0, "int4": 1.0, "int8": 0.0},
        "b": {"int3": 0.02, "int4": 0.01, "int8": 0.0},
        "c": {"int3": 0.5, "int4": 0.1, "int8": 0.0},
    }
    sizes = {"a": 100, "b": 100, "c": 100}
    plan = allocate(sens, sizes, ["int3", "int4", "int8"], budget_bits=4.7)
    avg = sum({"int3": 3, "int4": 4, "int8": 8}[plan[n]] * sizes[n] for n in plan) / 300
    # The optimum (loss 0.52); a per-bit greedy stops at all-int4 (loss 1.11).
    assert avg <= 4.7 and plan == {"a": "int8", "b": "int3", "c": "int3"}
    plan = allocate(sens, sizes, ["int3", "int4", "int8"], budget_bits=4.0)
    assert plan == {"a": "int4", "b": "int4", "c": "int4"}
    with pytest.raises(LmforgeError, match="below the narrowest"):
        allocate(sens, sizes, ["int3", "int4", "int8"], budget_bits=2.5)
