"""StreamingLLM sink cache: equal to plain decoding while everything fits, re-rotation is exact,
and generation runs far past the cache (and the model's position limit) with fixed memory."""

import torch

from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.streaming import SinkKVCache, stream_generate_sinks
from lmforge.model import ModelConfig, Transformer
from lmforge.model.layers import RotaryEmbedding, apply_rope

torch.set_num_threads(1)


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", initializer_range=0.2, **kw)).eval()


def test_equal_to_plain_decoding_while_it_fits():
    model = _model()
    prompt = list(range(5, 25))
    out = list(stream_generate_sinks(model, prompt, SamplingParams(max_new_tokens=20), sinks=4, window=60))
    assert out == generate(model, prompt, max_new_tokens=20)[0].tolist()


def test_eviction_re_rotates_kept_keys_exactly():
    cfg = ModelConfig.preset("tiny")
    rotary = RotaryEmbedding(cfg.head_dim)
    cache = SinkKVCache(cfg, 1, sinks=2, window=6)
    raw = torch.randn(1, cfg.num_key_value_heads, 8, cfg.head_dim)
    rotated = apply_rope(raw, *rotary(torch.arange(8)[None], raw.dtype))
    for layer in range(cfg.num_hidden_layers):
        cache.update(layer, rotated, rotated, 0)
    cache.length = 8
    cache.make_room(3, rotary)  # drop the 3 oldest non-sink tokens (slots 2, 3, 4)
    kept = raw[:, :, 5:8]  # now in slots 2, 3, 4
    expected = apply_rope(kept, *rotary(torch.arange(2, 5)[None], raw.dtype))
    torch.testing.assert_close(cache.k[0][:, :, 2:5], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.k[0][:, :, :2], rotated[:, :, :2])  # sinks untouched
    assert cache.length == 5 and cache.evicted == 3


def test_generates_past_the_context_with_bounded_memory():
    model = _model(max_position_embeddings=64)
    prompt = list(range(1, 100))  # longer than the model's context already
    gen = stream_generate_sinks(model, prompt, SamplingParams(max_new_tokens=150), sinks=4, window=28, chunk=8)
    out = list(gen)
    assert len(out) == 150 and all(0 <= t < 512 for t in out)
    learned = _model(max_position_embeddings=64, position="learned")
    assert len(list(stream_generate_sinks(learned, prompt, SamplingParams(max_new_tokens=80), 4, 28))) == 80
