"""The decode-time gathered copy of the paged cache (PagedKVCache's mirror): reusing it gives the
keys a fresh gather gives, and the engine's outputs and logprobs do not depend on it, through
arrivals, finishes, cancels, preemption and a speculative engine."""

import torch

from lmforge.infer.engine import Engine
from lmforge.infer.paged import PagedKVCache
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer

torch.set_num_threads(1)


def test_reused_copy_equals_a_fresh_gather():
    config = ModelConfig.preset("tiny")
    H, D, bs = config.num_key_value_heads, config.head_dim, 4
    cache = PagedKVCache(config, num_blocks=40, block_size=bs)
    fresh = PagedKVCache(config, num_blocks=40, block_size=bs, mirror_bytes=0)
    g = torch.Generator().manual_seed(0)
    tables = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    lengths = [5, 9]
    reused = 0
    for _step in range(12):  # two rows decoding, one token each per step
        slots = torch.tensor([[t[n // bs] * bs + n % bs] for t, n in zip(tables, lengths)])
        nb = -(-max(n + 1 for n in lengths) // bs)
        table = torch.tensor([t[:nb] for t in tables])
        S = cache.set_step(slots, table, [(i, n) for i, n in enumerate(lengths)])
        S_fresh = fresh.set_step(slots, table)
        reused += cache._append is not None
        k, v = torch.randn(2, H, 1, D, generator=g), torch.randn(2, H, 1, D, generator=g)
        ka, va = cache.update(0, k, v)
        kb, vb = fresh.update(0, k, v)
        assert S >= S_fresh and ka.shape[2] == S
        for row, n in enumerate(lengths):  # every key a row can see is the same
            assert torch.equal(ka[row, :, : n + 1], kb[row, :, : n + 1])
            assert torch.equal(va[row, :, : n + 1], vb[row, :, : n + 1])
        lengths = [n + 1 for n in lengths]
    assert reused >= 8  # rebuilt only at the start and when the rows outgrow the headroom
    cache.set_step(slots, table)  # any other forward drops the copy
    assert cache._mirror is None


def _run(model, mirror: bool, draft=None) -> list:
    engine = Engine(model, block_size=4, num_blocks=24, max_seqs=6, draft=draft, num_speculative=3)
    for c in [engine.cache] + ([engine.spec.cache] if draft is not None else []):
        c.mirror_bytes = c.mirror_bytes if mirror else 0
    g = torch.Generator().manual_seed(3)
    prompts = [
        torch.randint(0, 512, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist() for _ in range(14)
    ]
    ids, out, step = [], {}, 0
    for i, p in enumerate(prompts):  # requests arrive while others decode; some are cancelled
        ids.append(engine.add_request(p, SamplingParams(max_new_tokens=6 + 3 * (i % 5)), logprobs=3))
        for _ in range(2):
            engine.step()
        if i % 6 == 5:
            engine.cancel(ids[i - 2])
    while engine.has_unfinished():
        step += 1
        engine.step()
    for rid in ids:
        seq = engine.requests[rid]
        out[rid] = (seq.output, [lp for _, lp, _ in seq.token_logprobs], seq.finish_reason)
    return [out[r] for r in ids], engine.stats


def test_engine_outputs_do_not_depend_on_the_copy():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", initializer_range=0.2)).eval()
    with_copy, stats = _run(model, True)
    without, _ = _run(model, False)
    _same(with_copy, without)
    assert stats["preemptions"] > 0  # 24 blocks of 4 tokens cannot hold six growing sequences
    torch.manual_seed(1)
    draft = Transformer(ModelConfig.preset("tiny", num_hidden_layers=1, initializer_range=0.2)).eval()
    _same(_run(model, True, draft)[0], _run(model, False, draft)[0])


def _same(a: list, b: list) -> None:
    """The same tokens and finish reasons; logprobs equal but for float rounding (the copy's keys
    are the same numbers, but attention sums over a few more masked slots)."""
    assert [(out, reason) for out, _, reason in a] == [(out, reason) for out, _, reason in b]
    for (_, lps_a, _), (_, lps_b, _) in zip(a, b):
        assert torch.allclose(torch.tensor(lps_a), torch.tensor(lps_b), atol=1e-5, rtol=0)
