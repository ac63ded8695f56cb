"""Speculative decoding inside the engine, with a draft model or prompt lookup: greedy outputs
identical to the plain engine for many concurrent requests (with prefix caching, preemption,
cancel, stop tokens, logprobs), sampled outputs distributed as the target's (chi-square on a
4-token vocabulary), blocks all freed."""

import copy

import pytest
import torch
from scipy.stats import chi2

from lmforge.common import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams, probabilities
from lmforge.model import ModelConfig, Transformer

torch.set_num_threads(1)


def _model(layers=2, vocab=512, seed=0, std=0.2):
    torch.manual_seed(seed)
    return Transformer(
        ModelConfig.preset("tiny", vocab_size=vocab, num_hidden_layers=layers, initializer_range=std)
    ).eval()


@pytest.fixture(scope="module")
def target():
    return _model()


@pytest.fixture(scope="module", params=["noisy-copy", "self", "stranger", "lookup"])
def draft(request, target):
    """A perturbed copy of the target (partial acceptance), the target itself (every draft accepted:
    the draft cache lags a token), an unrelated 1-layer model (almost every draft rejected), and
    prompt lookup (no model)."""
    if request.param == "lookup":
        return "lookup"
    if request.param == "self":
        return target
    if request.param == "stranger":
        return _model(layers=1, seed=5)
    noisy = copy.deepcopy(target)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.005)
    return noisy


def _spec(target, draft, **kw):
    return Engine(target, lookup=True, **kw) if draft == "lookup" else Engine(target, draft=draft, **kw)


def _prompts(n, seed=1, lo=3, hi=40, shared=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 512, (shared,), generator=g).tolist()
    return [
        prefix + torch.randint(0, 512, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def test_greedy_equals_plain_engine_among_many(target, draft):
    prompts = _prompts(24, shared=0) + _prompts(8, seed=2, shared=20)  # the last 8 share 20 tokens
    sp = SamplingParams(max_new_tokens=20)
    plain = Engine(target, block_size=4).generate_batch(prompts, sp)
    engine = _spec(target, draft, block_size=4, num_speculative=3)
    ids = [engine.add_request(p, sp) for p in prompts[:25]]
    engine.step()  # the first prompt with the shared prefix is in the cache for the later ones
    ids += [engine.add_request(p, sp) for p in prompts[25:]]
    while engine.has_unfinished():
        engine.step()
    assert [engine.output(i) for i in ids] == plain
    s = engine.stats
    assert s["blocks_used"] == 0 and s["running"] == 0 and s["prefix_hit_blocks"] > 0
    assert s["drafted_tokens"] > 0 and (draft != "lookup" or s["accepted_tokens"] > 0)
    stats = engine.acceptance(0)
    assert stats["steps"] > 0 and stats["drafted"] >= stats["accepted"]
    if draft is target:
        assert s["accepted_tokens"] == s["drafted_tokens"] and stats["tokens_per_step"] > 3


@pytest.mark.parametrize("preemption", ["swap", "recompute"])
def test_preemption_keeps_outputs(target, draft, preemption):
    prompts = _prompts(12, seed=5)
    sp = SamplingParams(max_new_tokens=12)
    plain = Engine(target, block_size=4).generate_batch(prompts, sp)
    engine = _spec(
        target, draft, block_size=4, num_blocks=34, max_batch_tokens=48, preemption=preemption, num_speculative=3
    )
    assert engine.generate_batch(prompts, sp) == plain
    s = engine.stats
    assert s["preemptions"] > 0 and (s["swaps_out"] > 0) == (preemption == "swap")
    assert s["blocks_used"] == 0 and s["running"] == 0


def test_cancel_stop_tokens_and_logprobs(target):
    _draft = _model(layers=1, seed=5)  # built for its seeded RNG use, as the other tests do
    prompts = _prompts(6, seed=8)
    plain = Engine(target, block_size=4)
    ref = plain.generate_batch(prompts, SamplingParams(max_new_tokens=16))
    engine = Engine(target, block_size=4, draft=target, num_speculative=4)
    # A stop token in the middle of an accepted run of drafts ends the output right there.
    stop = ref[1][5]
    ids = [
        engine.add_request(p, SamplingParams(max_new_tokens=16, stop_token_ids=[stop] if i == 1 else []), logprobs=3)
        for i, p in enumerate(prompts)
    ]
    engine.step()
    engine.step()
    assert engine.cancel(ids[0])
    while engine.has_unfinished():
        engine.step()
    assert engine.requests[ids[0]].finish_reason == "cancelled" and len(engine.output(ids[0])) < 16
    assert engine.output(ids[1]) == ref[1][: ref[1].index(stop) + 1]
    assert engine.requests[ids[1]].finish_reason == "stop"
    assert [engine.output(i) for i in ids[2:]] == ref[2:]
    assert engine.stats["blocks_used"] == 0
    # Logprobs of drafted tokens come from the target's verify forward: same as plain decoding's.
    rid = plain.add_request(prompts[2], SamplingParams(max_new_tokens=16), logprobs=3)
    while plain.has_unfinished():
        plain.step()
    for (t1, lp1, top1), (t2, lp2, top2) in zip(
        plain.requests[rid].token_logprobs, engine.requests[ids[2]].token_logprobs, strict=True
    ):
        assert t1 == t2 and lp1 == pytest.approx(lp2, abs=1e-4)
        assert [t for t, _ in top1] == [t for t, _ in top2]


def test_seeded_sampling_is_batch_independent(target):
    draft = _model(layers=1, seed=5)
    prompts = _prompts(5, seed=9)
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, seed=42)
    alone = Engine(target, draft=draft).generate_batch(prompts[:1], sp)[0]
    together = Engine(target, draft=draft).generate_batch(prompts, sp)
    assert alone == together[0] and len(alone) == 12


@pytest.mark.parametrize("drafter", ["draft", "lookup"])
def test_sampled_outputs_follow_the_target_distribution(drafter):
    """Joint law of the first three sampled tokens (the 2nd and 3rd come from one speculative
    step: accepted draft + bonus, or a corrected draft) against the target's exact law."""
    V = 4
    target, draft = _model(vocab=V, seed=0, std=0.5), _model(layers=1, vocab=V, seed=3, std=0.5)
    prompt, params = [1, 3, 2, 1, 3, 0, 1], SamplingParams(max_new_tokens=3, temperature=1.0)
    with torch.no_grad():
        p1 = probabilities(target(torch.tensor([prompt]))[:, -1], params)[0]
        p2 = probabilities(target(torch.tensor([prompt + [a] for a in range(V)]))[:, -1], params)
        seqs = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = probabilities(target(seqs)[:, -1], params).reshape(V, V, V)
    joint = (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1)
    n = 1500
    engine = _spec(
        target, draft if drafter == "draft" else "lookup", num_speculative=2, max_seqs=128, prefix_caching=False
    )
    sps = [SamplingParams(max_new_tokens=3, temperature=1.0, seed=i) for i in range(n)]
    outs = engine.generate_batch([prompt] * n, sps)
    counts = torch.zeros(V**3)
    for a, b, c in outs:
        counts[a * V * V + b * V + c] += 1
    assert engine.stats["accepted_tokens"] > 0 and engine.stats["accepted_tokens"] < engine.stats["drafted_tokens"]
    expected = joint * n
    keep = expected >= 5  # pool the rare cells into one
    obs = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    exp = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    stat = float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum())
    assert stat < chi2.ppf(0.999, len(obs) - 1), (counts / n, joint)
    assert engine.stats["blocks_used"] == 0


def test_draft_with_another_vocabulary_is_refused(target):
    with pytest.raises(LmforgeError, match="same tokenizer"):
        Engine(target, draft=_model(layers=1, vocab=256))
    with pytest.raises(LmforgeError, match="num_speculative"):
        Engine(target, draft=target, num_speculative=0)
    with pytest.raises(LmforgeError, match="not both"):
        Engine(target, draft=target, lookup=True)


@pytest.mark.parametrize("preset,extra", [("tiny", {"sliding_window": 8}), ("tiny-moe", {}), ("tiny-gpt2", {})])
def test_model_families(preset, extra):
    """Sliding-window attention, MoE and learned positions verify drafts like plain decoding."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, initializer_range=0.2, **extra)).eval()
    prompts = _prompts(6, seed=12, hi=30)
    sp = SamplingParams(max_new_tokens=12)
    reference = Engine(model, block_size=4).generate_batch(prompts, sp)
    for kw in (dict(draft=model), dict(lookup=True)):
        assert (
            Engine(model, block_size=4, max_batch_tokens=32, num_speculative=3, **kw).generate_batch(prompts, sp)
            == reference
        )
