"""Paged KV cache + continuous batching engine: same tokens as the static-cache generator, alone or
among 32 others, under preemption (swap and recompute), with prefix caching, cancel and logprobs."""

import threading
import time

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate
from lmforge.infer.paged import BlockPool, block_hashes
from lmforge.infer.sampling import SamplingParams
from lmforge.model import KVCache, ModelConfig, Transformer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A larger init makes the logits peaked so greedy choices are far from ties.
    return Transformer(ModelConfig.preset("tiny", initializer_range=0.2)).eval()


def _prompts(n, seed=1, lo=3, hi=40):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 512, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def test_alone_equals_among_32_and_static_generate(model):
    prompts = _prompts(33)
    sp = SamplingParams(max_new_tokens=16)
    reference = [generate(model, p, max_new_tokens=16)[0].tolist() for p in prompts]
    alone = Engine(model, block_size=4).generate_batch(prompts[:1], sp)[0]
    together = Engine(model, block_size=4).generate_batch(prompts, sp)
    assert alone == together[0] == reference[0]
    assert together == reference


@torch.no_grad()
def test_paged_logits_equal_static_cache_logits(model):
    prompt = _prompts(1, seed=3)[0]
    engine = Engine(model, block_size=4)
    others = [engine.add_request(p, SamplingParams(max_new_tokens=8)) for p in _prompts(5, seed=4)]
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=8), logprobs=512)
    while engine.has_unfinished():
        engine.step()
    seq = engine.requests[rid]
    assert all(engine.requests[o].finish_reason == "length" for o in others)
    cache = KVCache.for_model(model, 1, 64)
    ids = torch.tensor([prompt])
    logits = model(ids, kv_cache=cache, start_pos=0)[:, -1]
    pos = len(prompt)
    for token, logprob, top in seq.token_logprobs:
        ref = logits.log_softmax(-1)[0]
        got = torch.zeros(512)
        for t, lp in top:
            got[t] = lp
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert logprob == pytest.approx(float(ref[token]), abs=1e-5)
        logits = model(torch.tensor([[token]]), kv_cache=cache, start_pos=pos)[:, -1]
        pos += 1


@pytest.mark.parametrize("preemption", ["swap", "recompute"])
def test_preemption_keeps_outputs(model, preemption):
    prompts = _prompts(12, seed=5)
    sp = SamplingParams(max_new_tokens=12)
    reference = [generate(model, p, max_new_tokens=12)[0].tolist() for p in prompts]
    engine = Engine(model, block_size=4, num_blocks=30, max_batch_tokens=48, preemption=preemption)
    assert engine.generate_batch(prompts, sp) == reference
    s = engine.stats
    assert s["preemptions"] > 0
    assert (s["swaps_out"] > 0) == (preemption == "swap")
    assert s["blocks_used"] == 0 and s["running"] == 0


def test_chunked_prefill_matches(model):
    prompts = _prompts(3, seed=6, lo=60, hi=90)
    reference = [generate(model, p, max_new_tokens=6)[0].tolist() for p in prompts]
    engine = Engine(model, block_size=8, max_batch_tokens=16)  # prompts run in 16-token chunks
    assert engine.generate_batch(prompts, SamplingParams(max_new_tokens=6)) == reference


def test_prefix_cache_hits_and_same_output(model):
    shared = _prompts(1, seed=7, lo=40, hi=41)[0]
    prompts = [shared + [i + 1, i + 2] for i in range(4)]
    reference = [generate(model, p, max_new_tokens=5)[0].tolist() for p in prompts]
    engine = Engine(model, block_size=8)
    first = engine.generate_batch(prompts[:1], SamplingParams(max_new_tokens=5))
    rest = engine.generate_batch(prompts[1:], SamplingParams(max_new_tokens=5))
    assert first + rest == reference
    s = engine.stats
    assert s["prefix_hit_blocks"] == 3 * 5  # 40 shared tokens = 5 full blocks, for each later prompt
    assert s["prefix_memory_saved_bytes"] > 0


def test_prefix_hash_depends_on_everything_before():
    a = block_hashes([1, 2, 3, 4, 5, 6], 3)
    b = block_hashes([9, 2, 3, 4, 5, 6], 3)
    assert len(a) == 2 and a[1] != b[1]
    assert block_hashes([1, 2, 3], 3, salt="lora-a") != block_hashes([1, 2, 3], 3)


def test_block_pool_refcounts_and_eviction():
    pool = BlockPool(3, 4)
    a, b = pool.allocate(), pool.allocate()
    assert pool.allocate() is None and pool.num_free == 0
    pool.register(a, 123)
    pool.release(a)
    assert pool.num_free == 1 and pool.lookup(123) == a  # cached block revived
    pool.release(a)
    c = pool.allocate()  # evicts the cached block
    assert c == a and pool.lookup(123) is None
    pool.release(b)
    assert pool.num_free == 1


def test_cancel_frees_blocks_and_stop_tokens(model):
    engine = Engine(model, block_size=4)
    rid = engine.add_request(_prompts(1)[0], SamplingParams(max_new_tokens=50))
    engine.step()
    assert engine.stats["blocks_used"] > 0 and engine.stats["running"] == 1
    assert engine.cancel(rid) and not engine.cancel(rid)
    assert engine.stats["blocks_used"] == 0 and not engine.has_unfinished()
    prompt = _prompts(1, seed=8)[0]
    first = generate(model, prompt, max_new_tokens=3)[0].tolist()
    engine.add_request(prompt, SamplingParams(max_new_tokens=50, stop_token_ids=[first[2]]))
    events = []
    while engine.has_unfinished():
        events += engine.step()
    assert [t for e in events for t in e.new_token_ids] == first[: first.index(first[2]) + 1]
    assert events[-1].finished and events[-1].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    prompts = _prompts(4, seed=9)
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=42)
    alone = Engine(model).generate_batch(prompts[:1], sp)[0]
    together = Engine(model).generate_batch(prompts, sp)[0]
    assert alone == together


def test_threads_add_while_stepping(model):
    engine = Engine(model, block_size=4)
    ids = []

    def add():
        for p in _prompts(8, seed=10):
            ids.append(engine.add_request(p, SamplingParams(max_new_tokens=4)))

    thread = threading.Thread(target=add)
    thread.start()
    while thread.is_alive() or engine.has_unfinished():
        engine.step()
    thread.join()
    assert all(len(engine.output(i)) == 4 for i in ids)


def test_bad_requests(model):
    engine = Engine(model, max_model_len=32)
    with pytest.raises(LmforgeError, match="outside the vocabulary"):
        engine.add_request([1, 99999])
    with pytest.raises(LmforgeError, match="does not fit"):
        engine.add_request(list(range(40)))
    with pytest.raises(LmforgeError, match="at least one token"):
        engine.add_request([])


def test_repetition_penalty_matches_static_generate(model):
    prompts = _prompts(3, seed=11)
    reference = [generate(model, p, max_new_tokens=10, repetition_penalty=1.5)[0].tolist() for p in prompts]
    out = Engine(model).generate_batch(prompts, SamplingParams(max_new_tokens=10, repetition_penalty=1.5))
    assert out == reference


@pytest.mark.parametrize("preset,extra", [("tiny", {"sliding_window": 8}), ("tiny-moe", {}), ("tiny-gpt2", {})])
def test_model_families_match_static_generate(preset, extra):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, initializer_range=0.2, **extra)).eval()
    prompts = _prompts(6, seed=12, hi=30)
    reference = [generate(model, p, max_new_tokens=10)[0].tolist() for p in prompts]
    engine = Engine(model, block_size=4, max_batch_tokens=32)  # chunked prefill too
    assert engine.generate_batch(prompts, SamplingParams(max_new_tokens=10)) == reference


class _SmallTokenizer:
    """A tokenizer whose vocabulary (8 ids) is smaller than the model's padded one (512)."""

    vocab_size, eos_id = 8, None

    def decode(self, ids):
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise LmforgeError(f"decode: token id {bad[0]} is outside the vocabulary")
        return "".join("abcdefgh"[i] for i in ids)


def test_stop_strings_skip_ids_past_the_tokenizer_vocabulary(model):
    engine = Engine(model, _SmallTokenizer(), block_size=4)
    prompt = _prompts(1, seed=13)[0]
    reference = generate(model, prompt, max_new_tokens=12)[0].tolist()
    assert any(t >= 8 for t in reference)  # the model does emit ids the tokenizer cannot decode
    out = engine.generate_batch([prompt], SamplingParams(max_new_tokens=12, stop_strings=["zz"]))[0]
    assert out == reference


def test_release_forgets_requests(model):
    engine = Engine(model, block_size=4)
    done, running = (engine.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(_prompts(2), (1, 50)))
    engine.step()
    assert engine.requests[done].status.name == "FINISHED" and engine.stats["running"] == 1
    assert engine.release(done) and engine.release(running) and not engine.release(running)
    assert engine.requests == {} and engine.stats["blocks_used"] == 0 and not engine.has_unfinished()


def test_add_and_cancel_do_not_wait_for_a_running_step():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    engine = Engine(model, block_size=4)
    first = engine.add_request(_prompts(1, seed=14)[0], SamplingParams(max_new_tokens=2))
    in_forward, go_on = threading.Event(), threading.Event()
    forward = model.forward

    def slow_forward(*args, **kwargs):
        in_forward.set()
        go_on.wait(5)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    stepping = threading.Thread(target=engine.step)
    stepping.start()
    assert in_forward.wait(5)
    start = time.perf_counter()
    second = engine.add_request(_prompts(1, seed=15)[0], SamplingParams(max_new_tokens=2))
    assert engine.cancel(second) and engine.has_unfinished()
    waited = time.perf_counter() - start
    go_on.set()
    stepping.join()
    assert waited < 2  # did not wait for the forward (it waits up to 5 s)
    assert engine.requests[second].status.name == "WAITING"  # applied at the next step, in order
    while engine.has_unfinished():
        engine.step()
    assert len(engine.output(first)) == 2 and engine.output(second) == []
    assert engine.requests[second].finish_reason == "cancelled" and engine.stats["blocks_used"] == 0


@torch.no_grad()
def test_prompt_logprobs_equal_a_full_forward(model):
    """OpenAI's echo: every prompt token's logprob (the first None), across chunked prefill,
    beside other prompts and with the prompt's prefix already cached (no hit is taken)."""
    prompts = _prompts(4, seed=16, lo=30, hi=60)
    engine = Engine(model, block_size=4, max_batch_tokens=24)
    engine.generate_batch(prompts[:1], SamplingParams(max_new_tokens=2))  # prompts[0] is now cached
    ids = [
        engine.add_request(p, SamplingParams(max_new_tokens=n), prompt_logprobs=2)
        for p, n in zip(prompts, (0, 3, 0, 1))
    ]
    events = {}
    while engine.has_unfinished():
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    for rid, prompt in zip(ids, prompts):
        ref = model(torch.tensor([prompt]))[0].log_softmax(-1)
        got = events[rid][0].prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        assert all(e.prompt_logprobs is None for e in events[rid][1:])
        for i, (token, lp, top) in enumerate(got[1:], 1):
            assert token == prompt[i] and lp == pytest.approx(float(ref[i - 1, token]), abs=1e-4)
            assert [t for t, _ in top] == ref[i - 1].topk(2).indices.tolist()
    assert [len(engine.output(i)) for i in ids] == [0, 3, 0, 1]
    assert engine.stats["prefix_hit_blocks"] == 0 and engine.stats["blocks_used"] == 0


def test_prefill_cap_while_decoding(model):
    """max_prefill_tokens: newcomers' prompts are spread over several steps while others decode
    (never more prompt tokens per step than the cap), with the same outputs."""
    prompts = _prompts(8, seed=17, lo=20, hi=40)
    reference = Engine(model, block_size=4).generate_batch(prompts, SamplingParams(max_new_tokens=6))
    engine = Engine(model, block_size=4, max_prefill_tokens=16)
    ids = [engine.add_request(prompts[0], SamplingParams(max_new_tokens=6))]
    engine.step()  # alone: no cap while nothing decodes, the whole prompt in one step
    assert engine.requests[ids[0]].num_computed == len(prompts[0])
    ids += [engine.add_request(p, SamplingParams(max_new_tokens=6)) for p in prompts[1:]]
    seen = []
    original = engine.scheduler.schedule

    def schedule():
        batch = original()
        seen.append((sum(n for s, n in batch if n > 1), any(n == 1 for s, n in batch)))
        return batch

    engine.scheduler.schedule = schedule
    while engine.has_unfinished():
        engine.step()
    assert [engine.output(i) for i in ids] == reference
    assert all(prompt_tokens <= 16 for prompt_tokens, decoding in seen if decoding)
    assert sum(1 for prompt_tokens, _ in seen if prompt_tokens) >= sum(map(len, prompts[1:])) // 16


class _LetterTokenizer:
    """Every id decodes to one letter (id mod 8), so any generated text is decodable."""

    vocab_size, eos_id = None, None

    def decode(self, ids):
        return "".join("abcdefgh"[i % 8] for i in ids)


def test_stop_string_late_in_a_long_output_is_found(model):
    """Only a tail of the output is decoded per step; a stop string that first appears after many
    tokens still ends the request exactly where the full text first contains it."""
    prompt = _prompts(1, seed=5)[0]
    reference = generate(model, prompt, max_new_tokens=60)[0].tolist()
    text = _LetterTokenizer().decode(reference)
    stop = text[40:43]
    first_end = text.index(stop) + len(stop)  # output tokens up to the first full match
    engine = Engine(model, _LetterTokenizer(), block_size=4)
    out = engine.generate_batch([prompt], SamplingParams(max_new_tokens=60, stop_strings=[stop]))[0]
    assert out == reference[:first_end]
