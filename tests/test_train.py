"""Unit tests of the training building blocks, on hand-checked examples."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.train import (
    IGNORE,
    OptimConfig,
    SpikeGuard,
    apply_mlm,
    build_optimizer,
    clm_batch,
    corrupt_spans,
    lr_at,
    mlm_batch,
    param_groups,
    prefix_lm_mask,
    random_spans_noise_mask,
    span_batch,
    train_step,
)
from lmforge.train.objectives import span_lengths


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, **kw))


def test_clm_shift():
    b = clm_batch(torch.tensor([[1, 2, 3, 4]]))
    assert b["input_ids"].tolist() == [[1, 2, 3]] and b["labels"].tolist() == [[2, 3, 4]]


def test_mlm_hand_example():
    tokens = torch.tensor([10, 11, 12, 13, 14])
    selected = torch.tensor([True, False, True, True, False])
    action = torch.tensor([0, 0, 1, 2, 1])  # mask, (unselected), random, keep, (unselected)
    rand = torch.tensor([7, 7, 8, 9, 9])
    inputs, labels = apply_mlm(tokens, selected, action, rand, mask_id=99)
    assert inputs.tolist() == [99, 11, 8, 13, 14]
    assert labels.tolist() == [10, IGNORE, 12, 13, IGNORE]


def test_mlm_proportions():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (200, 500), generator=g)
    tokens[:, ::50] = 0  # separators are never selected
    b = mlm_batch(tokens, mask_id=60, vocab_size=50, generator=g, special_ids=(0,))
    sel = b["labels"] != IGNORE
    assert abs(sel.float().mean().item() - 0.15 * 0.98) < 0.005
    assert not sel[:, ::50].any()
    masked = (b["input_ids"][sel] == 60).float().mean().item()
    kept = (b["input_ids"][sel] == tokens[sel]).float().mean().item()  # includes random hits of the same id
    assert abs(masked - 0.8) < 0.01 and abs(kept - (0.1 + 0.1 / 50)) < 0.01
    assert torch.equal(b["input_ids"][~sel], tokens[~sel])


def test_span_corruption_hand_example():
    a, b, c, d, e = 1, 2, 3, 4, 5
    inputs, targets = corrupt_spans(
        torch.tensor([a, b, c, d, e]), torch.tensor([0, 1, 1, 0, 1], dtype=torch.bool), sentinels=[90, 91]
    )
    assert inputs.tolist() == [a, 90, d, 91]
    assert targets.tolist() == [90, b, c, 91, e]


def test_noise_mask_statistics():
    g = torch.Generator().manual_seed(1)
    for length in (20, 64, 101):
        m = random_spans_noise_mask(length, g)
        n_noise, n_spans = span_lengths(length)
        assert int(m.sum()) == n_noise == round(length * 0.15)
        assert not m[0]
        starts = m.clone()
        starts[1:] &= ~m[:-1]
        assert int(starts.sum()) == n_spans == max(1, round(n_noise / 3))


def test_span_batch_is_prefix_lm():
    g = torch.Generator().manual_seed(0)
    tokens = torch.arange(1, 21).view(1, 20)
    b = span_batch(tokens, sentinels=[99, 98, 97], generator=g)
    n_noise, n_spans = span_lengths(20)  # 3 noise tokens in 1 span
    n_in = 20 - n_noise + n_spans
    seq = torch.cat([b["input_ids"][0], b["labels"][0, -1:]])
    inputs, targets = seq[:n_in], seq[n_in:]
    assert targets[0] == 99 and inputs.tolist().count(99) == 1
    assert sorted(inputs[inputs != 99].tolist() + targets[1:].tolist()) == list(range(1, 21))
    assert (b["labels"][0, : n_in - 1] == IGNORE).all() and (b["labels"][0, n_in - 1 :] != IGNORE).all()
    mask = prefix_lm_mask(3, 5)[0, 0].int().tolist()
    assert mask == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_prefix_lm_attention_in_the_model():
    model = tiny().eval()
    x = torch.randint(0, 64, (1, 8))
    mask = prefix_lm_mask(5, 8)
    base = model(x, attn_mask=mask)
    y = x.clone()
    y[0, 6] = (x[0, 6] + 1) % 64  # a target token: invisible to the prefix and to earlier targets
    assert torch.allclose(base[:, :6], model(y, attn_mask=mask)[:, :6], atol=1e-6)
    z = x.clone()
    z[0, 4] = (x[0, 4] + 1) % 64  # a later prefix token: visible to the earlier prefix positions
    assert not torch.allclose(base[:, :4], model(z, attn_mask=mask)[:, :4], atol=1e-4)


def test_param_groups_no_decay_on_norms_biases_embeddings():
    model = Transformer(ModelConfig.preset("tiny-gpt2", vocab_size=64, hidden_size=32, intermediate_size=64))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert all(n.endswith("proj.weight") for n in decay_names) and decay_names
    assert "model.embed_tokens.weight" in no_decay_names and "model.embed_positions.weight" in no_decay_names
    assert any("layernorm" in n for n in no_decay_names) and any(n.endswith(".bias") for n in no_decay_names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied lm_head once


def test_schedules():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 100, cfg) == pytest.approx(0.1) and lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, cfg) == pytest.approx(0.55) and lr_at(100, 100, cfg) == pytest.approx(0.1)
    wsd = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, 100, wsd) == 1.0 and lr_at(79, 100, wsd) == 1.0
    assert lr_at(90, 100, wsd) == pytest.approx(0.5) and lr_at(100, 100, wsd) == pytest.approx(0.0)


def _batch(seed, n=4, t=16):
    g = torch.Generator().manual_seed(seed)
    return clm_batch(torch.randint(0, 64, (n, t + 1), generator=g))


def _step(model, micro, guard=None, **kw):
    opt = build_optimizer(model, OptimConfig(lr=1e-2, fused=False))
    return train_step(
        model,
        opt,
        micro,
        device=torch.device("cpu"),
        dtype=torch.float32,
        clip_grad=1.0,
        world_size=1,
        guard=guard or SpikeGuard(),
        **kw,
    )


def test_accumulation_equals_big_batch():
    big = _batch(0, n=4)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    a, b = tiny(), tiny()
    ra, rb = _step(a, [big]), _step(b, halves)
    assert abs(ra.loss - rb.loss) < 1e-6 and abs(ra.grad_norm - rb.grad_norm) < 1e-5
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_nonfinite_and_spike_steps_are_skipped():
    model = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    res = _step(model, [_batch(1)])
    assert res.skipped == "nonfinite" and math.isnan(res.loss)
    model.model.norm.weight.data.copy_(before[-1])  # norm weight is the last parameter
    guard = SpikeGuard(factor=2.0, window=3)
    for _ in range(3):
        guard.accept(1.0)  # running mean 1.0; the real loss (~4.2 = ln 64) is a spike
    res = _step(model, [_batch(1)], guard=guard)
    assert res.skipped == "spike" and res.loss > 2.0
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert all(p.grad is None for p in model.parameters())


def test_moe_aux_loss_is_added():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny-moe", vocab_size=64))
    from lmforge.train.loop import forward_loss

    loss, aux, n = forward_loss(model, _batch(2), aux_coef=0.02)
    assert n == 64 and aux.item() > 0.02  # balanced routing gives num_experts*sum(1/E * 1/E)*k ~ 1 x coef
    res = _step(model, [_batch(2)], aux_coef=0.02)
    assert res.skipped is None


def test_fused_head_loss_matches_plain_path():
    from lmforge.train.loop import forward_loss
    from lmforge.train.losses import fusable_head
    from lmforge.train.objectives import lm_loss_sum

    a, b = tiny(), tiny()
    batch = _batch(3)
    batch["labels"] = batch["labels"].clone()  # a view of the same windows as input_ids
    batch["labels"][:, :5] = IGNORE
    assert fusable_head(a) is a.lm_head
    fused, _, n = forward_loss(a, batch, 0.0)
    plain, m = lm_loss_sum(b(batch["input_ids"]), batch["labels"])
    assert n == m and abs(fused.item() - plain.item()) < 1e-4
    fused.backward()
    plain.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_early_stopping_patience():
    from lmforge.train import EarlyStopping

    stop = EarlyStopping(patience=2)
    assert stop.update(3.0) and stop.update(2.5)
    assert not stop.update(2.6) and not stop.should_stop
    assert not stop.update(2.5) and stop.should_stop  # equal is not an improvement
    assert not EarlyStopping(patience=0).should_stop
