"""PEFT methods on the tiny model: trainable counts vs formula, identity at init, merge == unmerged,
training lowers the loss and leaves the base untouched, multi-adapter selection, bad input."""

import math

import pytest
import torch
from test_peft_common import ALL_CONFIGS, LINEAR_CONFIGS, batch, expected_trainable, perturb, tiny_model, train
from torch import nn

from lmforge import peft
from lmforge.common import LmforgeError

torch.set_num_threads(1)


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_trainable_count_matches_formula_and_only_adapters_train(name):
    model = tiny_model()
    expected = expected_trainable(ALL_CONFIGS[name](), model)
    peft.apply(model, ALL_CONFIGS[name]())
    trainable, total = peft.count_parameters(model)
    assert trainable == expected
    for n, p in model.named_parameters():
        assert p.requires_grad == peft.is_adapter_key(n), n


@pytest.mark.parametrize("name", [n for n in ALL_CONFIGS if not n.startswith(("prompt", "ptuning", "prefix"))])
def test_identity_at_init(name):
    # Zero-initialised B / up-projection, lambda = 0, IA3 = 1, DoRA m = ||W||: the base output exactly.
    model, x = tiny_model(), batch()
    base = model(x)
    peft.apply(model, ALL_CONFIGS[name]())
    torch.testing.assert_close(model(x), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(LINEAR_CONFIGS) + ["prefix"])
def test_merged_equals_unmerged_and_unmerge_restores(name):
    model, x = tiny_model(), batch()
    base_weights = {k: v.clone() for k, v in peft.base_state_dict(model).items()}
    peft.apply(model, ALL_CONFIGS[name]())
    perturb(model)
    unmerged = model(x)
    peft.merge(model)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
    peft.unmerge(model)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
    for k, v in peft.base_state_dict(model).items():
        torch.testing.assert_close(v, base_weights[k], atol=1e-5, rtol=0)


def test_merge_and_unload_gives_plain_linears_with_no_inference_cost():
    model, x = tiny_model(), batch()
    peft.apply(model, peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    perturb(model)
    want = model(x)
    peft.merge_and_unload(model)
    assert not any(isinstance(m, peft.WrappedLinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    assert peft.peft_configs(model) == []
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_short_training_lowers_loss_and_leaves_base_unchanged(name):
    model = tiny_model()
    config = ALL_CONFIGS[name]()
    before = {k: v.clone() for k, v in peft.base_state_dict(model).items()}
    peft.apply(model, config)
    extra = after = None
    if isinstance(config, peft.AdaLoraConfig):
        config.total_step, config.tinit, config.tfinal = 15, 2, 4
        alloc = peft.RankAllocator(model, config)
        extra = lambda m: config.orth_reg_weight * peft.orthogonal_regularization(m)  # noqa: E731
        after = alloc.step
    # Methods with few parameters (IA3 vectors, soft prompts) need larger steps (Lester et al. use 0.3
    # for prompt tuning); input-side prompts can only steer a random base model a little, hence the
    # smaller required drop for them. The loop is deterministic, so any drop is real.
    soft_prompt = isinstance(config, (peft.PromptTuningConfig, peft.PTuningConfig))
    lr = 0.05 if soft_prompt else 0.3 if name in ("ia3", "ptuning_v2") else 1e-2
    losses = train(model, steps=15, lr=lr, after_backward=after, extra_loss=extra)
    assert losses[-1] < losses[0] - (0.03 if soft_prompt else 0.1), losses
    for k, v in peft.base_state_dict(model).items():
        assert torch.equal(v, before[k]), f"base tensor {k} changed"


def test_lora_scaling_and_rslora():
    model = tiny_model()
    peft.apply(model, peft.LoraConfig(r=4, alpha=8, adapter_name="plain"))
    peft.apply(model, peft.LoraConfig(r=4, alpha=8, use_rslora=True, adapter_name="rs"))
    q = model.model.layers[0].self_attn.q_proj
    assert q.scaling == {"plain": 2.0, "rs": 4.0}
    # A is Kaiming-uniform (bound 1/sqrt(in) with a=sqrt(5)), B zero.
    assert q.lora_A["plain"].weight.abs().max() <= 1 / math.sqrt(64) and q.lora_A["plain"].weight.std() > 0
    assert torch.count_nonzero(q.lora_B["plain"].weight) == 0


def test_lora_dropout_only_in_training():
    model, x = tiny_model(), batch()
    peft.apply(model, peft.LoraConfig(r=4, dropout=0.5))
    perturb(model)
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_dora_equals_its_definition():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    layer = peft.LoraLinear(lin)
    layer.add_adapter("d", r=2, alpha=4, use_dora=True)
    layer.active = ["d"]
    with torch.no_grad():
        layer.lora_B["d"].weight.normal_()
        layer.lora_magnitude_vector["d"].mul_(torch.linspace(0.5, 1.5, 6))
    x = torch.randn(3, 8)
    w = lin.weight + 2.0 * layer.lora_B["d"].weight @ layer.lora_A["d"].weight
    want = (layer.lora_magnitude_vector["d"] / w.norm(dim=1))[None] * (x @ w.T) + lin.bias
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_adalora_prunes_to_the_target_budget_and_reports_ranks():
    model = tiny_model()
    config = peft.AdaLoraConfig(init_r=6, target_r=2, target_modules=["q", "v"], total_step=12, tinit=2, tfinal=3)
    peft.apply(model, config)
    alloc = peft.RankAllocator(model, config)
    assert alloc.budget_at(0) == (24, False) and alloc.budget_at(12)[0] == 8
    budgets = []
    train(
        model,
        steps=12,
        lr=2e-2,
        after_backward=lambda s: budgets.append(alloc.step(s)),
        extra_loss=lambda m: config.orth_reg_weight * peft.orthogonal_regularization(m),
    )
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] == 8
    ranks = alloc.final_ranks()
    assert set(ranks) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert sum(ranks.values()) <= 8 and all(0 <= r <= 6 for r in ranks.values())


def test_orthogonal_regularization_is_zero_for_orthogonal_factors():
    model = tiny_model()
    peft.apply(model, peft.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, peft.AdaLoraLinear):
                m.lora_A["default"].copy_(torch.linalg.qr(torch.randn(64, 4))[0].T)
                m.lora_B["default"].copy_(torch.linalg.qr(torch.randn(64, 4))[0])
    assert peft.orthogonal_regularization(model).item() < 1e-5


class FakeQuantLinear(nn.Module):
    """The quantized-linear protocol peft relies on: forward and dequantize(), no `weight`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("q", torch.round(linear.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scale", scale.detach())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale

    def forward(self, x):
        y = x @ self.dequantize().to(x.dtype).T
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _quantize_all(model, cls):
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            model.set_submodule(name, cls(m))


def _nf4():
    quant = pytest.importorskip("lmforge.quant.linear")
    return lambda lin: quant.NF4Linear.from_float(lin)


@pytest.mark.parametrize("kind", ["fake", "nf4"])
def test_qlora_on_a_quantized_base(kind):
    make = FakeQuantLinear if kind == "fake" else _nf4()
    model, x = tiny_model(), batch()
    _quantize_all(model, make)
    base = model(x)
    peft.apply(model, peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    torch.testing.assert_close(model(x), base, atol=1e-5, rtol=0)
    losses = train(model, steps=8)
    assert losses[-1] < losses[0]
    q = model.model.layers[0].self_attn.q_proj
    original = q.base_layer
    want = model(x)
    peft.merge(model)  # a quantized base becomes a float nn.Linear holding dequantize() + delta
    assert isinstance(q.base_layer, nn.Linear)
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
    peft.unmerge(model)
    assert q.base_layer is original  # bit-exact: the untouched quantized module is back
    peft.merge_and_unload(model)  # what a recipe re-quantizes
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)


def test_ia3_scales_keys_values_and_ffn_input():
    model = tiny_model()
    peft.apply(model, peft.IA3Config())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert not attn.k_proj.feedforward and attn.k_proj.ia3_l["default"].shape == (32,)
    assert mlp.down_proj.feedforward and mlp.down_proj.ia3_l["default"].shape == (176,)
    x = torch.randn(2, 176)
    with torch.no_grad():
        mlp.down_proj.ia3_l["default"].uniform_(0.5, 1.5)
    torch.testing.assert_close(mlp.down_proj(x), mlp.down_proj.base_layer(x * mlp.down_proj.ia3_l["default"]))


def _two_lora_model():
    model = tiny_model()
    peft.apply(model, peft.LoraConfig(r=4, target_modules=["q", "v", "down"], adapter_name="a"))
    peft.apply(model, peft.LoraConfig(r=2, target_modules=["q", "o"], use_dora=True, adapter_name="b"))
    perturb(model)
    return model


def test_second_all_linear_lora_wraps_the_same_layers():
    model = tiny_model()
    peft.apply(model, peft.LoraConfig(r=2, target_modules="all-linear", adapter_name="a"))
    peft.apply(model, peft.LoraConfig(r=2, target_modules="all-linear", adapter_name="b"))
    layers = [m for m in model.modules() if isinstance(m, peft.LoraLinear)]
    assert len(layers) == 14 and all(m.adapter_names() == ["a", "b"] and m.active == ["b"] for m in layers)


def test_several_adapters_on_one_base_selected_per_call_and_per_row():
    model, x = _two_lora_model(), batch(B=3)
    outs = {}
    for name in ("a", "b"):
        peft.set_adapter(model, name)
        outs[name] = model(x)
    peft.set_adapter(model, [])
    outs[None] = model(x)
    torch.testing.assert_close(outs[None], tiny_model()(x))
    assert not torch.allclose(outs["a"], outs["b"])
    rows = ["b", None, "a"]
    with peft.adapter_rows(model, rows):
        mixed = model(x)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], outs[name][i], atol=1e-5, rtol=0)
    with pytest.raises(LmforgeError, match="unknown LoRA adapter"):
        with peft.adapter_rows(model, ["a", "zzz", None]):
            pass
    with pytest.raises(LmforgeError, match="no adapter named"):
        peft.set_adapter(model, "zzz")


def test_bad_configs_and_clashes_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(LmforgeError, match=r"target_modules=\['qq'\] matches no linear module.*q_proj"):
        peft.apply(model, peft.LoraConfig(target_modules=["qq"]))
    with pytest.raises(LmforgeError, match=r"LoraConfig.r=0"):
        peft.apply(model, peft.LoraConfig(r=0))
    with pytest.raises(LmforgeError, match="kind"):
        peft.apply(model, peft.AdapterConfig(kind="lora"))
    peft.apply(model, peft.LoraConfig(target_modules=["v"]))
    with pytest.raises(LmforgeError, match="already on this model"):
        peft.apply(model, peft.LoraConfig(target_modules=["q"]))
    before = model.state_dict().keys()
    with pytest.raises(LmforgeError, match="already carries a LoraLinear"):
        peft.apply(model, peft.IA3Config(target_modules=["k", "v"], feedforward_modules=[]))
    assert model.state_dict().keys() == before  # nothing half-applied
    with pytest.raises(LmforgeError, match="unknown PEFT method 'loraa'"):
        peft.config_from_dict({"method": "loraa"})


@pytest.mark.parametrize(
    "config",
    [peft.LoraConfig(r=4, use_dora=True), peft.IA3Config(), peft.AdaLoraConfig()],
    ids=["dora", "ia3", "adalora"],
)
def test_bf16_model_on_a_quantized_base_merges(config):
    # Adapters on a bias-free quantized base are fp32; the merged float copy must still take bf16 inputs.
    model, x = tiny_model().to(torch.bfloat16), batch()
    _quantize_all(model, FakeQuantLinear)
    peft.apply(model, config)
    perturb(model)
    want = model(x)
    assert want.dtype == torch.bfloat16
    peft.merge(model)
    torch.testing.assert_close(model(x).float(), want.float(), atol=3e-2, rtol=0)
