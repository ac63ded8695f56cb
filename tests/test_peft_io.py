"""Adapter files: save -> load identical for every method, base-model checks, several adapters from
disk, lmforge checkpoints with adapters, and parity with Hugging Face `peft` both ways."""

import json

import pytest
import torch
from test_peft_common import ALL_CONFIGS, batch, perturb, tiny_model

from lmforge import peft
from lmforge.common import LmforgeError

torch.set_num_threads(1)
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_save_then_load_gives_identical_outputs(name, tmp_path):
    model, x = peft.apply(tiny_model(), ALL_CONFIGS[name]()), batch()
    perturb(model)
    want = model(x)
    peft.save_adapter(model, tmp_path, base_model_name="tiny-test")
    saved = json.loads((tmp_path / "lmforge_adapter.json").read_text())
    assert saved["base_model"] == "tiny-test" and saved["adapters"][0]["method"] == ALL_CONFIGS[name]().method
    fresh = tiny_model()
    peft.load_adapter(fresh, tmp_path, base_model_name="tiny-test")
    torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)
    # Only adapter tensors are in the file (small), and they are trainable again after loading.
    from safetensors.torch import load_file

    assert all(peft.is_adapter_key(k) for k in load_file(str(tmp_path / "lmforge_adapter.safetensors")))
    assert peft.count_parameters(fresh)[0] == peft.count_parameters(model)[0]
    peft.load_adapter(model, tmp_path)  # onto a model that has the adapter already: tensors only
    torch.testing.assert_close(model(x), want, atol=0, rtol=0)


def test_adapter_on_the_wrong_base_is_a_clear_error(tmp_path):
    model = peft.apply(tiny_model(), peft.LoraConfig())
    peft.save_adapter(model, tmp_path, base_model_name="tiny-test")
    with pytest.raises(LmforgeError, match="trained on base model 'tiny-test', not 'other'"):
        peft.load_adapter(tiny_model(), tmp_path, base_model_name="other")
    with pytest.raises(LmforgeError, match="num_hidden_layers: adapter 2 vs model 3"):
        peft.load_adapter(tiny_model(num_hidden_layers=3), tmp_path)
    with pytest.raises(LmforgeError, match="not an adapter folder"):
        peft.load_adapter(tiny_model(), tmp_path / "nothing")


def test_several_saved_adapters_load_under_new_names(tmp_path):
    x, outs = batch(), {}
    for i, name in enumerate(("sql", "chat")):
        model = peft.apply(tiny_model(), peft.LoraConfig(r=2, target_modules=["q", "v"]))
        perturb(model, seed=10 + i)
        outs[name] = model(x)
        peft.save_adapter(model, tmp_path / name)
    served = tiny_model()
    for name in outs:
        peft.load_adapter(served, tmp_path / name, adapter_name=name)
    for name, want in outs.items():
        peft.set_adapter(served, name)
        torch.testing.assert_close(served(x), want, atol=0, rtol=0)
    with peft.adapter_rows(served, ["chat", "sql"]):
        mixed = served(x)
    torch.testing.assert_close(mixed, torch.stack([outs["chat"][0], outs["sql"][1]]), atol=1e-5, rtol=0)


def test_lmforge_checkpoint_replays_adapters(tmp_path):
    checkpoint = pytest.importorskip("lmforge.checkpoint")
    model = peft.apply(tiny_model(), peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    peft.apply(model, peft.PrefixConfig(num_virtual_tokens=3))
    perturb(model)
    x = batch()
    checkpoint.save_model(model, tmp_path)
    loaded = checkpoint.load_model(tmp_path)  # meta build -> peft.replay -> load by assignment
    assert [c.method for c in peft.peft_configs(loaded)] == ["lora", "prefix"]
    # Float rounding only (DoRA's norms computed on differently laid-out tensors give ~1e-7 on some
    # CPUs); a missing or wrong adapter moves the logits by orders of magnitude more.
    torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- parity with peft


@pytest.fixture
def hf_base(tmp_path):
    """A tiny lmforge model, its HF export, and that export loaded by transformers."""
    checkpoint = pytest.importorskip("lmforge.checkpoint")
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    with torch.no_grad():  # non-trivial norms so a wrong mapping cannot hide
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    checkpoint.save_hf(model, tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    return model, hf, tmp_path


VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lmforge_lora_loads_in_peft_with_the_same_logits(hf_base, variant):
    hf_peft = pytest.importorskip("peft")
    model, hf, tmp = hf_base
    x = batch(B=2, T=11)
    with torch.no_grad():
        base = hf(x).logits
    torch.testing.assert_close(model(x), base, atol=1e-4, rtol=0)
    peft.apply(model, peft.LoraConfig(r=4, alpha=8, target_modules=ALL_PROJ, **VARIANTS[variant]))
    perturb(model, scale=0.2)
    peft.export_peft(model, tmp / "adapter", base_model_name=str(tmp / "base"))
    theirs = hf_peft.PeftModel.from_pretrained(hf, tmp / "adapter").eval()
    with torch.no_grad():
        ours = model(x)
        assert (ours - base).abs().max() > 0.05  # the adapter really changes the output
        torch.testing.assert_close(ours, theirs(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_made_lora_imports_with_the_same_logits(hf_base, variant):
    hf_peft = pytest.importorskip("peft")
    checkpoint = pytest.importorskip("lmforge.checkpoint")
    _, hf, tmp = hf_base
    cfg = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **VARIANTS[variant])
    theirs = hf_peft.get_peft_model(hf, cfg)
    with torch.no_grad():  # peft's B starts at zero: move it so the adapter does something
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.2)
    theirs.save_pretrained(tmp / "peft_adapter")
    ours = checkpoint.load_model(tmp / "base")
    peft.load_adapter(ours, tmp / "peft_adapter")  # PEFT format detected from adapter_config.json
    x = batch(B=2, T=11)
    with torch.no_grad():
        want = theirs.eval()(x).logits
        with theirs.disable_adapter():
            assert (want - theirs(x).logits).abs().max() > 0.05  # the adapter really changes the output
        torch.testing.assert_close(ours(x), want, atol=1e-4, rtol=0)


def test_unsupported_peft_adapters_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(LmforgeError, match="peft_type 'PROMPT_TUNING' is not supported"):
        peft.import_peft(tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "fan_in_fan_out": True}))
    with pytest.raises(LmforgeError, match="fan_in_fan_out=True is not supported"):
        peft.import_peft(tiny_model(), tmp_path)
