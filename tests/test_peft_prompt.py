"""Soft prompts and prefixes: shapes, padding, KV-cache decoding equal to the full forward, folding,
initialisation, composition with LoRA."""

import pytest
import torch
from test_peft_common import OTHER_CONFIGS, batch, expected_trainable, perturb, tiny_model

from lmforge import peft
from lmforge.common import LmforgeError
from lmforge.model import KVCache

torch.set_num_threads(1)
SOFT = ["prompt", "ptuning_mlp", "ptuning_lstm", "prefix", "ptuning_v2"]


def _model(name: str):
    model = peft.apply(tiny_model(), OTHER_CONFIGS[name]())
    perturb(model, scale=0.5)
    return model


@pytest.mark.parametrize("name", SOFT)
def test_logits_keep_the_input_shape(name):
    model, x = _model(name), batch(B=2, T=7)
    logits, hidden = model(x, return_hidden=True)
    assert logits.shape == (2, 7, 512) and hidden.shape == (2, 7, 64)
    assert model(x, logits_to_keep=1).shape == (2, 1, 512)
    torch.testing.assert_close(model(x, logits_to_keep=1)[:, -1], logits[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", SOFT)
def test_left_padding_gives_the_unpadded_logits(name):
    model, x = _model(name), batch(B=1, T=6)
    want = model(x)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    got = model(padded, attention_mask=mask, position_ids=positions)[:, 3:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _decode_logits(model, x, prefill: int):
    """Prefill x[:, :prefill] into a cache, then feed one token at a time (as generation does)."""
    B, T = x.shape
    cache = KVCache.for_model(model, B, T + peft.virtual_tokens(model))
    steps = [model(x[:, :prefill], kv_cache=cache, start_pos=0)]
    for t in range(prefill, T):
        steps.append(
            model(x[:, t : t + 1], kv_cache=cache, start_pos=t, attention_mask=torch.ones(B, t + 1, dtype=torch.long))
        )
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("name", SOFT + ["lora+prefix"])
def test_kv_cache_decoding_equals_full_forward(name):
    if name == "lora+prefix":
        model = peft.apply(tiny_model(), peft.LoraConfig(r=4, target_modules=["q", "v"]))
        peft.apply(model, peft.PrefixConfig(num_virtual_tokens=3, projection=False))
        perturb(model, scale=0.5)
    else:
        model = _model(name)
    x = batch(B=2, T=9)
    with torch.no_grad():
        torch.testing.assert_close(_decode_logits(model, x, prefill=4), model(x), atol=1e-5, rtol=0)


def test_prompt_tuning_needs_cache_room_for_the_virtual_tokens():
    model, x = _model("prompt"), batch(B=1, T=5)
    assert peft.virtual_tokens(model) == 4
    with pytest.raises(LmforgeError, match="adds 4 virtual tokens; allocate peft.virtual_tokens"):
        model(x, kv_cache=KVCache.for_model(model, 1, 5), start_pos=0)


@pytest.mark.parametrize("name", ["prefix", "ptuning_mlp", "ptuning_lstm"])
def test_folding_the_reparameterisation_keeps_the_output(name):
    model, x = _model(name), batch()
    want = model(x)
    peft.merge(model)  # the encoder output is computed once and frozen into a tensor
    slot = model.peft_prefix if name == "prefix" else model.peft_prompt
    assert slot["default"].folded is not None
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)
    peft.unmerge(model)
    assert slot["default"].folded is None


def test_prompt_initialised_from_token_ids():
    model = tiny_model()
    peft.apply(model, peft.PromptTuningConfig(num_virtual_tokens=5, init="tokens", init_token_ids=[7, 8, 9]))
    want = model.model.embed_tokens.weight[[7, 8, 9, 7, 8]]
    torch.testing.assert_close(model.peft_prompt["default"].embedding.detach(), want)
    with pytest.raises(LmforgeError, match="init_token_ids: id 9999"):
        peft.apply(tiny_model(), peft.PromptTuningConfig(init="tokens", init_token_ids=[9999]))


def test_composed_methods_count_and_switch():
    model = tiny_model()
    lora, prefix = peft.LoraConfig(r=4, target_modules=["q", "v"]), peft.PrefixConfig(num_virtual_tokens=3)
    want = expected_trainable(lora, model) + expected_trainable(prefix, model)
    peft.apply(model, lora)
    peft.apply(model, prefix)
    assert peft.count_parameters(model)[0] == want
    assert [c.method for c in peft.peft_configs(model)] == ["lora", "prefix"]
    x = batch()
    peft.set_adapter(model, [])  # everything off: the base model
    torch.testing.assert_close(model(x), tiny_model()(x))


def test_packed_batches_are_refused_with_prompt_tuning():
    model, x = _model("prompt"), batch()
    with pytest.raises(LmforgeError, match="segment_ids"):
        model(x, segment_ids=torch.zeros_like(x))


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-moe"])
def test_other_families_lora_prompt_and_prefix(preset):
    # GPT-2 style (learned positions, biases, tied head) and Mixtral style (experts' linears are targets).
    torch.manual_seed(0)
    from lmforge.model import build_model

    model, x = build_model(preset).eval(), batch(B=2, T=8)
    base = model(x)
    peft.apply(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    torch.testing.assert_close(model(x), base, atol=1e-6, rtol=0)
    peft.apply(model, peft.PrefixConfig(num_virtual_tokens=2, projection=False))
    peft.apply(model, peft.PromptTuningConfig(num_virtual_tokens=3))
    perturb(model, scale=0.3)
    with torch.no_grad():
        torch.testing.assert_close(_decode_logits(model, x, prefill=5), model(x), atol=1e-5, rtol=0)
