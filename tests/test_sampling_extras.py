"""OpenAI's sampling extras (logit_bias, min_p, presence/frequency penalties): the functions against a
hand computation, the validation ranges, and the same tokens in every path (engine, speculative
engine, decode driver)."""

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.infer.decode import decode_ids
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams, adjust_logits, filter_logits, probabilities
from lmforge.model import ModelConfig, Transformer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", initializer_range=0.2)).eval()


def test_logit_bias_and_penalties_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    p = SamplingParams(logit_bias={"0": 5.0, 3: -100}, presence_penalty=0.5, frequency_penalty=0.25)
    assert p.logit_bias == {0: 5.0, 3: -100.0}  # JSON object keys (strings) become ids
    counts = torch.tensor([[2, 0, 1, 0]])  # generated tokens: 0 twice, 2 once
    got = adjust_logits(logits, p, counts=counts)
    want = [1 + 5 - 0.5 - 0.25 * 2, 2.0, 3 - 0.5 - 0.25, 4 - 100]
    assert got[0].tolist() == pytest.approx(want)
    # A negative presence penalty encourages what was already said.
    got = adjust_logits(logits, SamplingParams(presence_penalty=-1.0), counts=counts)
    assert got[0].tolist() == pytest.approx([2.0, 2.0, 4.0, 4.0])
    # A grammar mask wins over a bias: the forbidden token's probability is exactly 0.
    allowed = torch.tensor([[False, True, True, True]])
    masked = adjust_logits(logits, SamplingParams(logit_bias={0: 100}), allowed=allowed)
    assert masked[0, 1:].tolist() == [2.0, 3.0, 4.0] and masked[0].argmax() == 3
    assert probabilities(masked, SamplingParams(temperature=1.0))[0, 0] == 0.0


def test_min_p_by_hand():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    kept = filter_logits(logits, min_p=0.2)  # threshold 0.2 x 0.5 = 0.1: only 0.05 goes
    assert torch.isinf(kept[0]).tolist() == [False, False, False, True]
    got = probabilities(logits, SamplingParams(temperature=1.0, min_p=0.2))[0]
    assert got.tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])
    got = probabilities(logits, SamplingParams(temperature=1.0, min_p=1.0))[0]  # only the top token
    assert got.tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_p=1.5), "min_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-2.01), "frequency_penalty"),
        (dict(logit_bias={1: 100.5}), r"\[-100, 100\]"),
        (dict(logit_bias={-1: 1.0}), "negative"),
        (dict(logit_bias={"x": 1.0}), "not a token id"),
        (dict(logit_bias=[1, 2]), "must map token ids"),
    ],
)
def test_out_of_range_values_are_refused(kwargs, match):
    with pytest.raises(LmforgeError, match=match):
        SamplingParams(**kwargs)


def test_range_ends_are_accepted():
    SamplingParams(min_p=1.0, presence_penalty=-2, frequency_penalty=2, logit_bias={0: -100, 5: 100})


def test_engine_and_driver_honour_the_extras(model):
    prompt = [5, 17, 300, 42, 9]
    plain = SamplingParams(max_new_tokens=12)
    base = Engine(model).generate_batch([prompt], plain)[0]
    # A +100 bias makes a token the argmax every step.
    biased = SamplingParams(max_new_tokens=6, logit_bias={77: 100})
    assert Engine(model).generate_batch([prompt], biased)[0] == [77] * 6
    # Penalties: the engine and the decode driver agree, and they change the output.
    for extra in (dict(frequency_penalty=2.0), dict(presence_penalty=2.0), dict(presence_penalty=-2.0)):
        params = SamplingParams(max_new_tokens=12, **extra)
        got = Engine(model).generate_batch([prompt], params)[0]
        assert got == decode_ids(model, params, prompt)[0]
    assert Engine(model).generate_batch([prompt], SamplingParams(max_new_tokens=12, frequency_penalty=2.0))[0] != base
    # Sampling: the engine and the driver draw the same tokens from the same seed, each extra applied once.
    sampled = SamplingParams(
        max_new_tokens=12, temperature=1.5, seed=4, logit_bias={77: 5.0}, min_p=0.05, presence_penalty=0.7
    )
    got = Engine(model).generate_batch([prompt], sampled)[0]
    assert got == decode_ids(model, sampled, prompt)[0] and 77 in got
    # min_p = 1 keeps only the top token: sampling at temperature 1 is greedy.
    top_only = SamplingParams(max_new_tokens=12, temperature=1.0, min_p=1.0, seed=3)
    assert Engine(model).generate_batch([prompt], top_only)[0] == base
    # Speculative engine: the bias shapes the drafts and the verification (same tokens); penalties
    # turn drafting off for that request (same tokens, nothing drafted).
    bias = SamplingParams(max_new_tokens=12, logit_bias={77: 3.0, 300: -5.0})
    want = Engine(model).generate_batch([prompt], bias)[0]
    spec = Engine(model, draft=model, num_speculative=3)
    assert spec.generate_batch([prompt], bias)[0] == want
    assert spec.counters["accepted_tokens"] > 0
    pen = SamplingParams(max_new_tokens=12, frequency_penalty=1.0)
    spec = Engine(model, lookup=True)
    assert spec.generate_batch([prompt], pen)[0] == Engine(model).generate_batch([prompt], pen)[0]
    assert spec.counters["drafted_tokens"] == 0
    with pytest.raises(LmforgeError, match="outside the vocabulary"):
        Engine(model).add_request(prompt, SamplingParams(logit_bias={512: 1.0}))
