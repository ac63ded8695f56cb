"""Ternary weights (BitNet b1.58): absmean rounding and 8-bit activations by hand, straight-through
gradients, 2-bit packing, the CPU kernels against the dequantized float matmul, checkpoint round
trips, QAT on a tiny model, `lmforge quantize --method bitnet`, and the combinations it refuses."""

import pytest
import torch
import torch.nn.functional as F
from test_quant_recipe import ckpt, shards  # noqa: F401  (module fixtures: a tiny float checkpoint, packed shards)

from lmforge.checkpoint import load_model, save_model
from lmforge.cli import main as cli
from lmforge.common import LmforgeError
from lmforge.model import build_model
from lmforge.quant import (
    BitLinear,
    QuantOptions,
    TernaryLinear,
    convert_bitnet,
    dequantize_model,
    prepare_bitnet,
    quantize_model,
    swap,
    ternary_kernel,
)
from lmforge.quant.pack import pack_bits
from lmforge.quant.ternary import C_MAX_TOKENS, absmean_quantize, fake_act8, fake_ternary, unpack_ternary
from lmforge.recipes.quantize import resolve_scheme

KERNELS = ["int8", "unpack", "auto"] + (["c"] if ternary_kernel.available() else [])


def test_absmean_ternary_by_hand():
    w = torch.tensor([[0.2, -0.5, 0.05, 1.0], [-0.1, 0.3, -0.9, 0.0]])
    q, scale = absmean_quantize(w)
    assert scale.item() == pytest.approx(3.05 / 8)  # mean |w|
    # w / 0.38125 = [[0.52, -1.31, 0.13, 2.62], [-0.26, 0.79, -2.36, 0]] -> clip to [-1, 1], round
    assert q.tolist() == [[1, -1, 0, 1], [0, 1, -1, 0]] and q.dtype == torch.int8
    assert torch.allclose(fake_ternary(w), q.float() * scale)
    # an all-zero matrix stays zero (the scale is floored, never 0 / 0)
    q0, s0 = absmean_quantize(torch.zeros(3, 4))
    assert q0.abs().sum() == 0 and s0 > 0


def test_act8_per_token_absmax_by_hand():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    s = 2.0 / 127
    # 1 / s = 63.5 rounds half to even -> 64; -2 -> -127; 0.5 / s = 31.75 -> 32; a zero row stays zero
    expected = torch.tensor([[64 * s, -127 * s, 32 * s], [0.0, 0.0, 0.0]])
    assert torch.allclose(fake_act8(x), expected, atol=1e-7)


def test_straight_through_gradients_reach_the_float_weight_and_input():
    torch.manual_seed(0)
    m = BitLinear(16, 8)
    x = torch.randn(3, 16, requires_grad=True)
    dy = torch.randn(3, 8)
    m(x).backward(dy)
    with torch.no_grad():
        xq, wq = fake_act8(x), fake_ternary(m.weight)
    # the rounding is the identity backwards: the gradients of F.linear(xq, wq) land on x and W
    assert torch.allclose(m.weight.grad, dy.t() @ xq, atol=1e-5)
    assert torch.allclose(x.grad, dy @ wq, atol=1e-5)
    assert torch.allclose(m.bias.grad, dy.sum(0))


@pytest.mark.parametrize("k", [1, 4, 13, 256, 700])
def test_packing_round_trip_is_exact_four_per_byte(k):
    q = torch.randint(-1, 2, (5, k), dtype=torch.int8)
    packed = pack_bits(q + 1, 2)
    assert packed.shape == (5, -(-k // 4)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_ternary(packed, k), q)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n,k,m", [(64, 768, 1), (48, 791, 3), (33, 100, C_MAX_TOKENS + 3), (7, 1, 2), (16, 176, 1)])
def test_kernel_equals_the_dequantized_matmul(kernel, n, k, m):
    torch.manual_seed(n + k + m)
    q = TernaryLinear.from_float(torch.nn.Linear(k, n))
    q.kernel = kernel
    x = torch.randn(2, m, k)
    ref = F.linear(fake_act8(x), q.dequantize(), q.bias)
    with torch.no_grad():
        y = q(x)
    assert y.shape == (2, m, n)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ternary_kernel.available(), reason="the C kernel could not be built here")
def test_c_kernel_returns_the_same_numbers_as_torch_int_mm():
    torch.manual_seed(0)
    q = TernaryLinear.from_float(torch.nn.Linear(1000, 96, bias=False))
    x = torch.randn(5, 1000) * 3
    out = {}
    for kernel in ("c", "int8"):
        q.kernel = kernel
        with torch.no_grad():
            out[kernel] = q(x)
    assert torch.equal(out["c"], out["int8"])  # exact int32 products, the same scaling


def test_without_a_compiler_the_torch_path_is_used(monkeypatch, tmp_path):
    monkeypatch.setattr(ternary_kernel, "_LIB", None)
    monkeypatch.setattr(ternary_kernel, "_TRIED", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LMFORGE_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="ternary C kernel unavailable"):
        assert not ternary_kernel.available()
    q = TernaryLinear.from_float(torch.nn.Linear(32, 8))
    with torch.no_grad():
        assert torch.allclose(q(torch.ones(1, 32)), F.linear(fake_act8(torch.ones(1, 32)), q.dequantize(), q.bias))
    q.kernel = "c"
    with pytest.raises(LmforgeError, match="could not be built"):
        q(torch.ones(1, 32))


def _tiny_bitnet(steps: int, lr: float = 1e-2) -> tuple[torch.nn.Module, list[float]]:
    torch.manual_seed(0)
    model = prepare_bitnet(build_model("tiny")).train()
    ids = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_qat_lowers_the_loss_of_a_tiny_model():
    model, losses = _tiny_bitnet(40)
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 2 * 7  # every block linear, not the head
    assert losses[-1] < losses[0] - 1.0


def test_converted_checkpoint_round_trip_reproduces_the_logits(tmp_path):
    model, _ = _tiny_bitnet(3)
    ids = torch.tensor([[1, 5, 9, 200, 3, 17]])
    with torch.no_grad():
        trained = model(ids)
        convert_bitnet(model)
        converted = model(ids)
    assert torch.allclose(converted, trained, atol=1e-4)  # the packed model computes what QAT trained
    up = model.model.layers[0].mlp.down_proj
    assert isinstance(up, TernaryLinear) and up.qweight.shape == (64, 176 // 4)
    (entry,) = model.lmforge_transforms
    assert entry["method"] == "bitnet" and entry["modules"]["model.layers.0.mlp.down_proj"] == {"format": "ternary"}
    loaded = load_model(save_model(model, tmp_path / "ternary"))
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, TernaryLinear)
    with torch.no_grad():
        assert torch.equal(loaded(ids), converted)


def test_rtn_ternary_bf16_inputs_and_dequantize():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    quantize_model(model, QuantOptions(method="rtn", scheme="ternary"), progress=False)
    assert isinstance(model.model.layers[0].self_attn.o_proj, TernaryLinear)
    assert model.lmforge_transforms[-1]["modules"]["model.layers.0.self_attn.o_proj"]["format"] == "ternary"
    o_proj = model.model.layers[0].self_attn.o_proj
    codes = set(torch.unique(o_proj.dequantize() / o_proj.weight_scale).tolist())
    assert codes <= {-1.0, 0.0, 1.0}
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    with torch.no_grad():  # bf16 activations: the same int8 rounding, the output in bf16
        y = o_proj(x)
        assert y.dtype == torch.bfloat16
        assert torch.allclose(y.float(), F.linear(fake_act8(x.float()), o_proj.dequantize()), rtol=1e-2, atol=1e-2)
    dequantize_model(model)
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear and not model.lmforge_transforms


def test_quantize_command_bitnet_end_to_end(ckpt, shards, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "bitnet"
    args = ["quantize", "--model", str(ckpt), "--out", str(out), "--method", "bitnet", "--calib", str(shards)]
    assert cli(args + ["--calib-samples", "8", "--seq-len", "64", "--qat-steps", "3", "--qat-lr", "1e-3"]) == 0
    assert '"scheme": "ternary"' in capsys.readouterr().out
    model = load_model(out)
    assert model.lmforge_transforms[0]["method"] == "bitnet"
    assert isinstance(model.model.layers[0].mlp.up_proj, TernaryLinear)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_refused_combinations_say_why(ckpt, shards, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "never"
    args = ["quantize", "--model", str(ckpt), "--out", str(out), "--calib", str(shards)]
    assert cli(args + ["--method", "bitnet", "--scheme", "int4-g128"]) == 2
    assert "--method bitnet makes ternary weights: --scheme 'int4-g128' cannot be honoured" in capsys.readouterr().err
    assert cli(args + ["--method", "gptq", "--scheme", "ternary", "--calib-samples", "16", "--seq-len", "64"]) == 2
    assert "gptq needs a group-wise int scheme" in capsys.readouterr().err
    assert not out.exists()
    assert resolve_scheme("bitnet", None) == resolve_scheme("bitnet", "Ternary") == "ternary"
    assert resolve_scheme("qat", None) == "int4-g128"
    quantized = swap(build_model("tiny"), "int4-g64")
    with pytest.raises(LmforgeError, match="already quantized"):
        prepare_bitnet(quantized)
    with pytest.raises(LmforgeError, match="no BitLinear layer"):
        convert_bitnet(build_model("tiny"))
    with pytest.raises(LmforgeError, match="no linear layer left"):
        prepare_bitnet(build_model("tiny"), skip=(".",))
    q = TernaryLinear.from_float(torch.nn.Linear(8, 4))
    q.kernel = "avx9000"
    with pytest.raises(LmforgeError, match="kernel 'avx9000'"):
        with torch.no_grad():
            q(torch.ones(1, 8))


@pytest.mark.skipif(not ternary_kernel.available(), reason="no C compiler here")
@pytest.mark.parametrize("flags", [(), ("-mno-avx512bw",), ("-mno-avx2",)], ids=["native", "avx2", "scalar"])
def test_every_simd_path_of_the_c_kernel_matches(flags, monkeypatch):
    """This machine's widest path, the AVX2 one and the portable loop (other CPUs take those)."""
    monkeypatch.setattr(ternary_kernel, "_LIB", ternary_kernel._build(flags))
    torch.manual_seed(1)
    q = TernaryLinear.from_float(torch.nn.Linear(4 * 64 * 3 + 37, 24))  # 3 AVX-512 blocks, 6 AVX2 ones, a tail
    q.kernel = "c"
    x = torch.randn(3, q.in_features)
    with torch.no_grad():
        assert torch.allclose(q(x), F.linear(fake_act8(x), q.dequantize(), q.bias), rtol=1e-5, atol=1e-5)
