"""The newer families against transformers on tiny random models (fp32, no download): logit parity
(<= 1e-4, with a padding mask too), greedy tokens, export back to a folder transformers loads, and
the engine, LoRA and quantization on a model with alternating sliding windows and soft-capping.

Each config is chosen so its quirk shows: sliding windows shorter than the test sequences, soft caps
small enough to bend these tiny models' scores and logits (checked: removing them changes the
output), LongRoPE's long factors reached by a sequence past `original_max_position_embeddings`.
"""

import dataclasses

import pytest
import torch

from lmforge.checkpoint import build_and_load, load_model, save_hf
from lmforge.common import LmforgeError
from lmforge.infer.generate import generate

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
ALTERNATING = ["sliding_attention", "full_attention"]
FAMILIES = ["qwen3", "qwen3_moe", "gemma2", "gemma3", "phi3", "llama32", "olmo2"]


def make_family(family: str):
    """A tiny random transformers model of `family`, its norms and biases perturbed so that a wrong
    mapping cannot hide behind ones/zeros."""
    tf = transformers
    torch.manual_seed(0)
    if family == "qwen3":  # layer 1 slides (max_window_layers=1), layer 0 is global
        cfg = tf.Qwen3Config(**TINY, head_dim=16, use_sliding_window=True, sliding_window=6, max_window_layers=1)
        model = tf.Qwen3ForCausalLM(cfg)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(
            **TINY,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=6,
            layer_types=ALTERNATING,
            attn_logit_softcapping=0.02,
            final_logit_softcapping=0.5,
        )
        model = tf.Gemma2ForCausalLM(cfg)
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **TINY,
            head_dim=16,
            sliding_window=6,
            layer_types=ALTERNATING,
            rope_theta=1_000_000.0,
            rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
        )
        model = tf.Gemma3ForCausalLM(cfg)
    elif family == "phi3":
        half = TINY["hidden_size"] // TINY["num_attention_heads"] // 2
        cfg = tf.Phi3Config(
            **TINY,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            original_max_position_embeddings=32,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(half)],
                "long_factor": [1.0 + 0.5 * i for i in range(half)],
            },
        )
        model = tf.Phi3ForCausalLM(cfg)
    elif family == "llama32":
        rope = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)
        cfg = tf.LlamaConfig(
            **TINY, tie_word_embeddings=True, rope_scaling={**rope, "original_max_position_embeddings": 64}
        )
        model = tf.LlamaForCausalLM(cfg)
    elif family == "olmo2":
        model = tf.Olmo2ForCausalLM(tf.Olmo2Config(**TINY, pad_token_id=0))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    hf = make_family(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, load_model(d)


def test_logits_match(pair):
    family, hf, ours = pair
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 29:] = 0  # right padding in row 1
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4, family
        ref, out = hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask)
    assert (out[mask.bool()] - ref[mask.bool()]).abs().max().item() <= 1e-4, family


def test_greedy_generation_matches(pair):
    family, hf, ours = pair
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    config = transformers.GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():  # no end-of-sequence id: 16 tokens whatever they are, as lmforge's call makes
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[:, 8:]
    out = generate(ours, ids, max_new_tokens=16, temperature=0.0)
    assert out.tolist() == ref.tolist(), family


def test_export_loads_in_transformers(pair, tmp_path):
    family, hf, ours = pair
    save_hf(ours, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back) is type(hf)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4, family


def test_quirks_are_exercised(tmp_path):
    """The parity above would be vacuous if a quirk did not change the output: dropping each one
    from the loaded config must move the logits."""
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    for family, fields in [
        ("gemma2", dict(attn_logit_softcapping=None)),
        ("gemma2", dict(final_logit_softcapping=None)),
        ("gemma2", dict(layer_types=None)),  # every layer slides
        ("gemma3", dict(rope_local_theta=None)),
        ("phi3", dict(rope_scaling=None)),
        ("qwen3", dict(sliding_window=None, layer_types=None)),
    ]:
        hf = make_family(family)
        hf.save_pretrained(tmp_path / family)
        ours = load_model(tmp_path / family)
        changed = dataclasses.replace(ours.config, **fields)
        other = build_and_load(changed, dict(ours.state_dict()))
        with torch.no_grad():
            assert (other(ids) - ours(ids)).abs().max().item() > 1e-3, (family, fields)


def test_unsupported_variants_are_refused(tmp_path):
    import json

    from lmforge.model.hf_config import config_from_hf

    moe = make_family("qwen3_moe").config.to_dict()
    with pytest.raises(LmforgeError, match="mlp_only_layers"):
        config_from_hf({**moe, "mlp_only_layers": [0]})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {}}))
    with pytest.raises(LmforgeError, match="vision-language"):
        load_model(tmp_path)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    """Gemma 2 as lmforge loads it: alternating windows of 6, both soft caps, (1+w) norms."""
    d = tmp_path_factory.mktemp("gemma2-engine")
    make_family("gemma2").save_pretrained(d)
    return load_model(d)


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 128, (3 + 4 * i,), generator=g).tolist() for i in range(n)]  # 3..23 > the window


def test_engine_equals_generate_with_windows_and_softcaps(gemma2, tmp_path):
    """The paged engine (packed prefill, padded decode over block tables) gives generate()'s tokens
    for a model whose layers differ in window and whose sliding layers have their own RoPE base."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    make_family("gemma3").save_pretrained(tmp_path)
    for model in (gemma2, load_model(tmp_path)):
        prompts = _prompts(6)
        reference = [generate(model, p, max_new_tokens=12)[0].tolist() for p in prompts]
        out = Engine(model, block_size=4).generate_batch(prompts, SamplingParams(max_new_tokens=12))
        assert out == reference, model.config.arch
    # StreamingLLM's eviction re-rotates cached keys with one RoPE table: refused, not silently wrong.
    from lmforge.infer.decode import decode_ids
    from lmforge.infer.streaming import AttentionSinks

    with pytest.raises(LmforgeError, match="local RoPE base"):
        decode_ids(model, SamplingParams(max_new_tokens=4), [prompts[0]], sinks=AttentionSinks(2, 8))


def test_speculative_decoding_with_windows(gemma2):
    """Draft verification (several tokens per forward over the static cache) keeps greedy output."""
    from lmforge.infer.decode import decode_ids
    from lmforge.infer.sampling import SamplingParams
    from lmforge.infer.speculative import DraftProposer

    prompt = _prompts(6)[-1]
    out = decode_ids(gemma2, SamplingParams(max_new_tokens=16), [prompt], proposer=DraftProposer(gemma2, 64), k=4)
    assert out[0] == generate(gemma2, prompt, max_new_tokens=16)[0].tolist()


def test_lora_on_a_new_family(gemma2, tmp_path):
    """LoRA wraps Gemma's projections: merged equals unmerged, and the adapter survives a save/load
    (the manifest replays it on the meta-device model)."""
    import copy

    from lmforge import peft
    from lmforge.checkpoint import save_model

    model = peft.apply(copy.deepcopy(gemma2), peft.LoraConfig(r=4, target_modules=["q", "k", "v", "o", "gate", "down"]))
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.allclose(model(ids), gemma2(ids), atol=1e-6)  # B = 0: the base output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
        adapted = model(ids)
        assert (adapted - gemma2(ids)).abs().max() > 1e-3
        save_model(model, tmp_path / "lora")
        assert torch.allclose(load_model(tmp_path / "lora")(ids), adapted, atol=1e-6)
        peft.merge(model)
        assert torch.allclose(model(ids), adapted, atol=1e-5)


def test_quantized_new_family_generates_in_engine(gemma2, tmp_path):
    """int8 weights on Gemma 2: close to the float logits, saved and reloaded exactly, and the
    engine gives generate()'s tokens on the quantized model."""
    import copy

    from lmforge.checkpoint import save_model
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.quant import swap

    q = swap(copy.deepcopy(gemma2), "int8")
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert (q(ids) - gemma2(ids)).abs().max() < 0.02
        save_model(q, tmp_path / "q")
        assert torch.equal(load_model(tmp_path / "q")(ids), q(ids))
    prompts = _prompts(4)
    reference = [generate(q, p, max_new_tokens=8)[0].tolist() for p in prompts]
    assert Engine(q, block_size=4).generate_batch(prompts, SamplingParams(max_new_tokens=8)) == reference
