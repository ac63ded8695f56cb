"""Generation: KV-cache decode equals full forward, batched equals alone, sampling controls."""

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.infer.generate import generate, stream_text
from lmforge.infer.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample
from lmforge.model import KVCache, ModelConfig, Transformer


@pytest.fixture(scope="module", params=["tiny", "tiny-gpt2", "tiny-moe"])
def model(request):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset(request.param)).eval()


def test_cached_decode_logits_equal_full_forward(model):
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 2, 20)
        parts = [model(ids[:, :12], kv_cache=cache, start_pos=0)]
        for t in range(12, 20):
            parts.append(model(ids[:, t : t + 1], kv_cache=cache, start_pos=t))
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


def test_batched_prompts_of_different_lengths_equal_alone(model):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (3, 11, 7)]
    batched = generate(model, prompts, max_new_tokens=16)
    for i, p in enumerate(prompts):
        assert batched[i].tolist() == generate(model, p, max_new_tokens=16)[0].tolist()


def test_same_seed_same_sample_and_different_seed_differs(model):
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=50)
    a = generate(model, [1, 2, 3], seed=7, **kw)
    b = generate(model, [1, 2, 3], seed=7, **kw)
    c = generate(model, [1, 2, 3], seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stop_token_ends_rows_and_pads_with_it(model):
    ids = [1, 2, 3, 4]
    free = generate(model, ids, max_new_tokens=10)[0].tolist()
    stop = free[3]
    out = generate(model, [ids, ids], max_new_tokens=10, stop_token_ids=[stop])
    first = free.index(stop)
    assert out.shape[1] == first + 1
    assert out[0].tolist() == free[: first + 1]


def test_filters_match_transformers_processors():
    tf = pytest.importorskip("transformers")
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    ref_k = tf.TopKLogitsWarper(top_k=10)(None, logits.clone())
    assert torch.equal(filter_logits(logits, top_k=10).isinf(), ref_k.isinf())
    ref_p = tf.TopPLogitsWarper(top_p=0.8)(None, logits.clone())
    assert torch.equal(filter_logits(logits, top_p=0.8).isinf(), ref_p.isinf())
    prev = torch.tensor([[1, 5, 7], [2, 2, 3], [0, 99, 50]])
    ref_r = tf.RepetitionPenaltyLogitsProcessor(1.3)(prev, logits.clone())
    seen = torch.zeros(3, 100, dtype=torch.bool).scatter_(1, prev, True)
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), ref_r)


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    draws = sample(logits, SamplingParams(temperature=1.0), g)
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.02)


def test_bad_sampling_values_are_clear_errors():
    with pytest.raises(LmforgeError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(LmforgeError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(LmforgeError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=-3)


def test_context_overflow_for_learned_positions():
    m = Transformer(ModelConfig.preset("tiny-gpt2", max_position_embeddings=16)).eval()
    with pytest.raises(LmforgeError, match="exceeds the model's context"):
        generate(m, list(range(10)), max_new_tokens=10)


def test_stop_string_helpers():
    from lmforge.tokenizer.text import find_stop, stop_prefix_len

    assert find_stop("hello world", ["wor"]) == 6
    assert find_stop("hello", ["x"]) is None
    assert stop_prefix_len("abc\n\n", ["\n\nUser:"]) == 2
    assert stop_prefix_len("abc", ["\n\n"]) == 0


class CharTokenizer:
    """A one-character-per-token tokenizer, enough to test text streaming."""

    eos_id = None

    def encode(self, text):
        return [ord(c) % 512 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_stream_text_stops_at_stop_string(model):
    tok = CharTokenizer()
    params = SamplingParams(max_new_tokens=30)
    full = "".join(stream_text(model, tok, "ab", params))
    assert len(full) == 30
    stop = full[5:7]
    cut = full.find(stop)
    pieces = list(stream_text(model, tok, "ab", SamplingParams(max_new_tokens=30, stop_strings=[stop])))
    assert "".join(pieces) == full[:cut]


def test_prepared_model_gives_the_same_logits_and_state_dict(model):
    import copy

    from lmforge.infer.prepare import TransposedLinear, prepare_for_inference

    ids = torch.randint(0, 512, (2, 9))
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = prepare_for_inference(copy.deepcopy(model))
    # a plain Linear is left only where the C decode step runs it (it reads W [out, in] row by row)
    in_c = {id(m) for b in fast.modules() if hasattr(b, "_lmforge_layer_spec") for m in b.modules()}
    in_c |= {id(fast.lm_head)} if hasattr(fast, "_lmforge_step_spec") else set()
    assert all(id(m) in in_c for m in fast.modules() if type(m) is torch.nn.Linear)
    assert in_c or any(isinstance(m, TransposedLinear) for m in fast.modules())
    with torch.no_grad():
        assert torch.allclose(fast(ids), model(ids), atol=1e-5)
    state = fast.state_dict()
    assert set(state) == set(ref_state) and all(torch.equal(state[k], ref_state[k]) for k in state)
    assert generate(fast, [1, 2, 3], max_new_tokens=8).tolist() == generate(model, [1, 2, 3], max_new_tokens=8).tolist()


@pytest.mark.slow
def test_compiled_decode_gives_the_same_tokens():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.preset("tiny")).eval()
    assert (
        generate(m, [1, 2, 3], max_new_tokens=8, compile=True).tolist()
        == generate(m, [1, 2, 3], max_new_tokens=8).tolist()
    )


def test_generate_with_prompt_tuning_reserves_cache_slots():
    from lmforge import peft

    torch.manual_seed(0)
    m = Transformer(ModelConfig.preset("tiny")).eval()
    peft.apply(m, peft.PromptTuningConfig(num_virtual_tokens=5))
    out = generate(m, [1, 2, 3], max_new_tokens=6)
    assert out.shape == (1, 6)
    # the cached decode agrees with re-running the full sequence each step
    seq = [1, 2, 3]
    for _ in range(6):
        with torch.no_grad():
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert out[0].tolist() == seq[3:]
