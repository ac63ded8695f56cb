"""A draft whose head scores only a subset of the vocabulary (DraftProposer(vocab=...)): greedy
output identical to plain greedy, proposals are always ids of the subset, sampled output still
follows the target's distribution (q is 0 outside the subset), and bad subsets are clear errors."""

import pytest
import torch
from scipy.stats import chi2
from test_speculative import _model

from lmforge.common import LmforgeError
from lmforge.infer.generate import generate
from lmforge.infer.prepare import prepare_for_inference
from lmforge.infer.sampling import SamplingParams, probabilities
from lmforge.infer.speculative import DraftProposer, SubVocabHead, SubVocabLM, frequent_tokens, speculative_generate
from lmforge.quant import swap

torch.set_num_threads(1)


class _Recording(DraftProposer):
    def propose(self, tokens, k, params, generator):
        drafts, q = super().propose(tokens, k, params, generator)
        self.seen = getattr(self, "seen", []) + drafts
        return drafts, q


@pytest.mark.parametrize("prepared", [False, True])
def test_subvocab_draft_greedy_is_identical_and_proposes_only_the_subset(prepared):
    target = _model()
    # The target drafting for itself through half its vocabulary: the subset holds every token the target
    # greedily produces (so some proposals are accepted) and others, so the head really is cut.
    prompt = torch.randint(0, 512, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    reference = generate(target, prompt, max_new_tokens=30)[0].tolist()
    rest = [t for t in range(512) if t not in reference]
    subset = sorted(set(reference)) + rest[: 256 - len(set(reference))]
    draft = _model(layers=2)  # the same weights as the target
    if prepared:  # the pipeline's models are prepared for inference (transposed linear layers)
        draft = prepare_for_inference(draft)
    prop = _Recording(draft, 80, vocab=subset)
    out, stats = speculative_generate(target, prompt, SamplingParams(max_new_tokens=30), prop, k=4)
    assert out == reference
    assert prop.seen and set(prop.seen) <= set(subset)
    assert stats.acceptance_rate == 1.0  # every greedy token is in the subset: the cut head agrees with the full one
    # A subset missing the target's tokens: proposals are wrong, the output is still the target's.
    missing = [t for t in range(512) if t not in reference][:64]
    prop = _Recording(_model(layers=1, seed=5), 80, vocab=missing)
    out, stats = speculative_generate(target, prompt, SamplingParams(max_new_tokens=30), prop, k=4)
    assert out == reference and set(prop.seen) <= set(missing) and stats.accepted == 0


@pytest.mark.parametrize("scheme", [None, "q8_0", "q4_0"])
def test_subvocab_logits_are_the_full_heads_columns(scheme):
    draft = _model(layers=1, seed=3)
    if scheme:  # a block-format head keeps its blocks: the same rows, exactly
        swap(draft, scheme, skip=("embed",))
    ids = [7, 0, 300, 511, 42]
    x = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        full, sub = draft(x), SubVocabLM(draft, ids)(x)
    torch.testing.assert_close(sub, full[..., ids], rtol=1e-6, atol=1e-6)
    assert type(SubVocabLM(draft, ids).lm_head) is (type(draft.lm_head) if scheme else SubVocabHead)


def test_subvocab_sampling_follows_the_target_distribution():
    """Joint law of two sampled tokens on a 6-token vocabulary with a draft restricted to 3 ids."""
    V = 6
    target, draft = _model(vocab=V, seed=0, std=0.5), _model(layers=1, vocab=V, seed=3, std=0.5)
    prompt = [1, 3]
    params = SamplingParams(max_new_tokens=2, temperature=1.0)
    with torch.no_grad():
        p1 = probabilities(target(torch.tensor([prompt]))[:, -1], params)[0]
        p2 = probabilities(target(torch.tensor([prompt + [x] for x in range(V)]))[:, -1], params)
    joint = (p1[:, None] * p2).reshape(-1)
    n = 600
    counts = torch.zeros(V * V)
    prop = DraftProposer(draft, 16, vocab=[4, 1, 2])
    for i in range(n):
        out, _ = speculative_generate(
            target, prompt, SamplingParams(max_new_tokens=3, temperature=1.0, seed=i), prop, k=2
        )
        counts[out[0] * V + out[1]] += 1
    expected = joint * n
    keep = expected > 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum())
    assert stat < chi2.ppf(0.999, len(obs) - 1), (stat, len(obs))


def test_frequent_tokens_most_frequent_first_ties_by_id():
    counts = torch.tensor([3, 9, 0, 9, 1, 5])
    assert frequent_tokens(counts, 4) == [1, 3, 5, 0]
    assert frequent_tokens(counts, 100) == [1, 3, 5, 0, 4, 2]


@pytest.mark.parametrize(
    "ids, match", [([], "1..512"), ([0, 512], r"\[0, 512\)"), ([-1], r"\[0, 512\)"), ([3, 3], "repeat")]
)
def test_bad_subset_is_a_clear_error(ids, match):
    with pytest.raises(LmforgeError, match=match):
        DraftProposer(_model(layers=1), 32, vocab=ids)


def test_subset_of_a_model_that_is_not_a_transformer_is_a_clear_error():
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _model(layers=1)
            self.config = self.inner.config

    with pytest.raises(LmforgeError, match="lmforge Transformer"):
        DraftProposer(Wrapped(), 32, vocab=[1, 2])


def test_whole_vocabulary_subset_keeps_the_draft():
    draft = _model(layers=1)
    assert DraftProposer(draft, 32, vocab=range(512)).draft is draft
