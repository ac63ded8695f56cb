"""Completions details against the official openai client: echo (prompt text and prompt-token
logprobs, the first null, as OpenAI), stop strings (text, logprobs and usage agree, streaming or
not), and a server decoding speculatively with --draft or --lookup (same outputs as without)."""

from __future__ import annotations

import openai
import pytest
import torch
from test_serve_utils import ServerThread, make_checkpoint, wait_until

from lmforge.checkpoint import load_model, load_tokenizer_if_any, save_model
from lmforge.common import LmforgeError
from lmforge.model import build_model
from lmforge.serve import ServeConfig, build_state
from lmforge.tokenizer import train_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_completions")
    model_dir, _ = make_checkpoint(root)
    tok = load_tokenizer_if_any(model_dir)
    torch.manual_seed(1)
    save_model(
        build_model("tiny", vocab_size=tok.vocab_size, num_hidden_layers=1, initializer_range=0.2),
        root / "draft",
        tokenizer=tok,
    )
    other = train_tokenizer(["some other text entirely, with other merges"] * 20, vocab_size=tok.vocab_size)
    save_model(build_model("tiny", vocab_size=tok.vocab_size, num_hidden_layers=1), root / "other", tokenizer=other)
    return model_dir, root / "draft", root / "other"


@pytest.fixture(scope="module")
def client(ckpt):
    with ServerThread(ServeConfig(model=str(ckpt[0]))) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)


def _lp(create, **kw):
    return create(model="tiny-chat", temperature=0, **kw)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_puts_the_prompt_and_its_logprobs_first(client, ckpt, stream):
    prompt = "The quick brown fox"
    tok = load_tokenizer_if_any(ckpt[0])
    ids = tok.encode(prompt)
    plain = _lp(client.completions.create, prompt=prompt, max_tokens=6, logprobs=2)
    kw = dict(prompt=prompt, max_tokens=6, logprobs=2, echo=True)
    if stream:
        chunks = [c for c in _lp(client.completions.create, stream=True, **kw) if c.choices]
        text = "".join(c.choices[0].text for c in chunks)
        lp = {
            k: sum((getattr(c.choices[0].logprobs, k) for c in chunks if c.choices[0].logprobs), [])
            for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        }
    else:
        r = _lp(client.completions.create, **kw)
        text, lp = r.choices[0].text, r.choices[0].logprobs.model_dump()
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 6
    assert text == prompt + plain.choices[0].text
    n = len(ids)
    assert len(lp["tokens"]) == n + 6 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        expected = load_model(ckpt[0])(torch.tensor([ids]))[0].log_softmax(-1)
    for i in range(1, n):
        assert lp["token_logprobs"][i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
        assert len(lp["top_logprobs"][i]) <= 2
    assert lp["token_logprobs"][n:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_echo_without_new_tokens_scores_the_prompt(client, ckpt):
    """What evaluation harnesses send for loglikelihoods: echo, max_tokens 0, logprobs."""
    r = client.completions.create(
        model="tiny-chat", prompt=["Hello there", "A server"], max_tokens=0, echo=True, logprobs=0
    )
    assert [c.text for c in r.choices] == ["Hello there", "A server"]
    assert all(c.finish_reason == "length" and c.logprobs.token_logprobs[0] is None for c in r.choices)
    assert all(lp < 0 for c in r.choices for lp in c.logprobs.token_logprobs[1:])
    assert r.usage.completion_tokens == 0
    ids = client.completions.create(model="tiny-chat", prompt=[5, 6, 7], max_tokens=2, echo=True, temperature=0)
    plain = client.completions.create(model="tiny-chat", prompt=[5, 6, 7], max_tokens=2, temperature=0)
    prompt_text = load_tokenizer_if_any(ckpt[0]).decode([5, 6, 7])
    assert ids.choices[0].logprobs is None and ids.choices[0].text == prompt_text + plain.choices[0].text


def _stop_case(client):
    full = _lp(client.completions.create, prompt="The lazy", max_tokens=32, logprobs=1)
    toks = full.choices[0].logprobs.tokens
    # A stop string made of the text of tokens 4 and 5 (printable ones), so it spans two tokens.
    for i in range(3, len(toks) - 2):
        stop = toks[i] + toks[i + 1]
        start = full.choices[0].text.find(stop)
        if stop.strip() and stop.isprintable() and start == sum(len(t) for t in toks[:i]):
            return full.choices[0].text, stop, i
    pytest.skip("no printable two-token stop string in this output")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_text_logprobs_and_usage_agree(client, stream):
    full, stop, i = _stop_case(client)
    kw = dict(prompt="The lazy", max_tokens=32, logprobs=1, stop=stop)
    if stream:
        chunks = list(_lp(client.completions.create, stream=True, stream_options={"include_usage": True}, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        tokens = sum((c.choices[0].logprobs.tokens for c in chunks if c.choices and c.choices[0].logprobs), [])
        usage, reason = chunks[-1].usage, [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        r = _lp(client.completions.create, **kw)
        c = r.choices[0]
        text, tokens, usage, reason = c.text, c.logprobs.tokens, r.usage, c.finish_reason
    assert text == full[: full.find(stop)] and reason == "stop"
    assert "".join(tokens) == text and len(tokens) == i  # the stop string's tokens are not reported...
    assert usage.completion_tokens == i + 2  # ...but were generated, and count as generated (as vLLM)


@pytest.mark.parametrize("drafter", ["draft", "lookup"])
def test_speculative_server_gives_the_same_outputs(ckpt, client, drafter):
    model_dir, draft_dir, _ = ckpt
    prompts = ["The quick brown", "Hello there", "Paged attention keeps"]
    plain = [_lp(client.completions.create, prompt=p, max_tokens=20).choices[0].text for p in prompts]
    spec_kw = dict(draft=str(draft_dir)) if drafter == "draft" else dict(lookup=True)
    with ServerThread(ServeConfig(model=str(model_dir), num_speculative=3, **spec_kw)) as s:
        spec = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        for p, text in zip(prompts, plain):
            b = _lp(spec.completions.create, prompt=p, max_tokens=20)
            assert b.choices[0].text == text and b.usage.completion_tokens == 20
        chat = [{"role": "user", "content": "Hello there"}]
        a = _lp(client.chat.completions.create, messages=chat, max_tokens=12)
        b = _lp(spec.chat.completions.create, messages=chat, max_tokens=12, stream=False)
        assert a.choices[0].message.content == b.choices[0].message.content
        # Several tokens per step: the stream still carries the same text, and seeded sampling repeats.
        chunks = list(_lp(spec.completions.create, prompt=prompts[0], max_tokens=20, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == plain[0]
        kw = dict(model="tiny-chat", prompt="The quick", max_tokens=12, temperature=1.0, seed=7, n=2)
        first, again = spec.completions.create(**kw), spec.completions.create(**kw)
        assert [c.text for c in first.choices] == [c.text for c in again.choices]
        assert wait_until(lambda: s.state.runner.stats["blocks_used"] == 0 and s.state.runner.in_flight == 0)
        assert s.state.runner.stats["drafted_tokens"] > 0


def test_a_draft_with_another_tokenizer_is_refused(ckpt):
    with pytest.raises(LmforgeError, match="same tokenizer"):
        build_state(ServeConfig(model=str(ckpt[0]), draft=str(ckpt[2])))


class _Decoder:
    """TextStream's view of a tokenizer: decode(ids) and vocab_size."""

    def __init__(self, backend):
        self.backend, self.vocab_size = backend, backend.get_vocab_size()

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)


def test_text_stream_decodes_incrementally_as_a_whole_decode():
    """Only a window of the last tokens is decoded per push; the text is still decode(all ids):
    byte-level BPE with characters split across tokens, and SentencePiece's Metaspace (a window's
    first token loses its leading space when decoded first)."""
    from tokenizers import SentencePieceBPETokenizer

    from lmforge.serve.text import TextStream

    corpus = ["naïve café – déjà vu 🙂🚀 日本語のテキスト, the quick brown fox jumps over the lazy dog"] * 30
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(corpus, vocab_size=120, min_frequency=1, show_progress=False)
    for tok in (train_tokenizer(corpus, vocab_size=300), _Decoder(sp)):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, tok.vocab_size, (300,), generator=g).tolist()
        whole = tok.decode(ids)
        for step in (1, 3):  # one token per push, and speculative decoding's several
            ts = TextStream(tok, [])
            text = "".join(ts.push(ids[i : i + step]) for i in range(0, len(ids), step)) + ts.flush()
            assert text == whole == ts.text


def _byte_fallback_tokenizer():
    """A Llama-style tokenizer: every byte a <0xNN> token, decoded by ByteFallback (a run of byte
    tokens that is not valid UTF-8 as a whole decodes to one U+FFFD per byte)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab.update({"a": 256, "b": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return _Decoder(tok)


def test_text_stream_holds_an_incomplete_character_but_not_garbage():
    """A character split over byte tokens is held until complete (byte-level BPE and byte
    fallback alike), while a stream of invalid bytes keeps flowing (it was held back to its end,
    which delayed such a stream's first text to its last token)."""
    from lmforge.serve.text import TextStream

    fallback = _byte_fallback_tokenizer()
    euro = list("€".encode())  # 3 bytes: e2 82 ac
    ids = [256] + euro + euro + [257]
    ts = TextStream(fallback, [])
    pieces = [ts.push([t]) for t in ids]
    assert "".join(pieces) + ts.flush() == "a€€b" == fallback.decode(ids)
    assert pieces[1:3] == ["", ""] and pieces[3] == "€"  # nothing of the character before its last byte
    for tok, garbage in ((fallback, 0x80), (train_tokenizer(["x"] * 5, vocab_size=300), None)):
        bad = garbage if garbage is not None else next(i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd")
        ts = TextStream(tok, [])
        streamed = "".join(ts.push([bad]) for _ in range(20))
        assert len(streamed) >= 20 - 3 and set(streamed) == {"\ufffd"}
        assert streamed + ts.flush() == tok.decode([bad] * 20)
