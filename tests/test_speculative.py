"""Speculative decoding: greedy output identical to plain greedy (draft model, prompt lookup), and
sampled output distributed exactly as the target's (chi-square on a tiny-vocab model)."""

import pytest
import torch
from scipy.stats import chi2, chisquare

from lmforge.common import LmforgeError
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams, probabilities
from lmforge.infer.speculative import DraftProposer, LookupProposer, speculative_generate, verify
from lmforge.model import ModelConfig, Transformer

torch.set_num_threads(1)


def _model(layers=2, vocab=512, seed=0, std=0.2):
    torch.manual_seed(seed)
    return Transformer(
        ModelConfig.preset("tiny", vocab_size=vocab, num_hidden_layers=layers, initializer_range=std)
    ).eval()


@pytest.mark.parametrize("proposer", ["draft", "draft-confidence", "self-draft", "lookup"])
def test_greedy_identical_to_plain_greedy(proposer):
    target = _model()
    prompt = torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(1)).tolist() * 2
    reference = generate(target, prompt, max_new_tokens=25)[0].tolist()
    prop = {
        "draft": lambda: DraftProposer(_model(layers=1, seed=5), 80),
        "draft-confidence": lambda: DraftProposer(_model(layers=1, seed=5), 80, min_confidence=0.5),
        "self-draft": lambda: DraftProposer(target, 80),
        "lookup": lambda: LookupProposer(3),
    }[proposer]()
    out, stats = speculative_generate(target, prompt, SamplingParams(max_new_tokens=25), prop, k=4)
    assert out == reference
    assert stats.new_tokens == 25
    if proposer == "self-draft":  # the target drafting for itself is always right
        assert stats.acceptance_rate == 1.0 and stats.steps == 5


def test_lookup_proposes_what_followed_the_last_ngram():
    prop = LookupProposer(max_ngram=2)
    tokens = [5, 6, 7, 8, 9, 1, 6, 7]
    assert prop.propose(tokens, 3, SamplingParams(), None)[0] == [8, 9, 1]
    assert prop.propose([1, 2, 3], 3, SamplingParams(), None)[0] == []


def test_verify_rejection_sampling_is_exact():
    """One drafted token from q, checked against p: the first output token must follow p."""
    g = torch.Generator().manual_seed(0)
    V = 6
    p = torch.softmax(torch.randn(2, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(1, V, generator=g) * 1.5, -1)
    n = 6000
    counts = torch.zeros(V)
    for _ in range(n):
        x = int(torch.multinomial(q[0], 1, generator=g))
        counts[verify(p, q, [x], g)[0][0]] += 1
    stat, pvalue = chisquare(counts.numpy(), (p[0] * n).numpy())
    assert pvalue > 1e-3, (counts / n, p[0])
    # A deterministic proposal (prompt lookup) is exact too.
    counts = torch.zeros(V)
    for _ in range(n):
        counts[verify(p, None, [2], g)[0][0]] += 1
    assert chisquare(counts.numpy(), (p[0] * n).numpy())[1] > 1e-3


@pytest.mark.parametrize("min_confidence", [0.0, 0.4])
def test_sampled_sequences_follow_the_target_distribution(min_confidence):
    """End to end on a 4-token vocabulary: the joint law of the first two sampled tokens matches
    the target's exact law p(x1) p(x2 | x1), computed from full forwards; also when the draft
    stops early on its own low-confidence samples (three tokens generated so two can be drafted)."""
    V = 4
    target, draft = _model(vocab=V, seed=0, std=0.5), _model(layers=1, vocab=V, seed=3, std=0.5)
    prompt = [1, 3]
    params = SamplingParams(max_new_tokens=2, temperature=1.0)
    with torch.no_grad():
        p1 = probabilities(target(torch.tensor([prompt]))[:, -1], params)[0]
        nxt = torch.tensor([prompt + [x] for x in range(V)])
        p2 = probabilities(target(nxt)[:, -1], params)  # [V, V]
    joint = (p1[:, None] * p2).reshape(-1)
    n = 800
    counts = torch.zeros(V * V)
    prop = DraftProposer(draft, 16, min_confidence=min_confidence)
    for i in range(n):
        out, _ = speculative_generate(
            target, prompt, SamplingParams(max_new_tokens=3, temperature=1.0, seed=i), prop, k=2
        )
        counts[out[0] * V + out[1]] += 1
    expected = joint * n
    keep = expected > 5  # pool rare cells so the chi-square approximation holds
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum())
    assert stat < chi2.ppf(0.999, len(obs) - 1), (stat, len(obs))


def test_speculative_rejects_repetition_penalty():
    with pytest.raises(LmforgeError, match="repetition_penalty"):
        speculative_generate(_model(), [1, 2], SamplingParams(repetition_penalty=1.2), LookupProposer())


def _latest_follow(tokens: list[int], k: int, max_ngram: int) -> list[int]:
    """Prompt lookup by brute force: scan every earlier start, longest n-gram first."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tokens[-n:]:
                return tokens[start + n : start + n + k]
    return []


def test_lookup_index_equals_a_full_scan_as_the_sequence_grows():
    g = torch.Generator().manual_seed(0)
    for vocab in (3, 8, 50):  # many, some and few repeats
        prop = LookupProposer(max_ngram=3)
        tokens = torch.randint(0, vocab, (5,), generator=g).tolist()
        for _ in range(120):
            k = int(torch.randint(1, 5, (1,), generator=g))
            assert prop.propose(tokens, k, SamplingParams(), None)[0] == _latest_follow(tokens, k, 3)
            tokens = (
                tokens + torch.randint(0, vocab, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
            )
    other = [4, 4, 2, 4, 4]  # not a continuation of what the proposer saw: it starts over
    assert prop.propose(other, 2, SamplingParams(), None)[0] == _latest_follow(other, 2, 3) == [2, 4]
