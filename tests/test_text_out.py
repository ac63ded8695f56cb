"""The one text-out path (lmforge.tokenizer.text): incremental detokenization in linear time, UTF-8
characters split over tokens, stop strings, and end-of-turn ids from the chat template; and the
callers that use it (`generate --chat` / `--stream`, the engine, eval, batch)."""

import random

import pytest
import torch
from tokenizers import SentencePieceBPETokenizer

from lmforge.checkpoint import save_model
from lmforge.cli import main
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.tokenizer.text import IncrementalDecoder, TextStream, completion_text, cut_at_stop, end_of_turn_ids

torch.set_num_threads(1)

CORPUS = ["naïve café – déjà vu 🙂🚀 日本語のテキスト, the quick brown fox jumps over the lazy dog\n"] * 30
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


class Counting:
    """A tokenizer's decode, counting the ids it is given (the work a stream does)."""

    def __init__(self, tok):
        self.tok, self.vocab_size, self.decoded = tok, tok.vocab_size, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tok.decode(ids)


class _SentencePiece:
    def __init__(self, backend):
        self.backend, self.vocab_size = backend, backend.get_vocab_size()

    def decode(self, ids):
        return self.backend.decode(ids)


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def llama3():
    """A byte-level BPE with Llama 3's special tokens and chat template (<|eot_id|> ends a turn)."""
    base = train_tokenizer(CORPUS, vocab_size=300, special_tokens=LLAMA3_SPECIALS)
    return Tokenizer(
        base.backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE
    )


def _streamed(tok, ids, stop=(), step=1):
    ts = TextStream(tok, stop)
    return "".join(ts.push(ids[i : i + step]) for i in range(0, len(ids), step)) + ts.flush(), ts


# ----------------------------------------------------------------------------- the module


def test_end_of_turn_comes_from_the_template_never_a_literal(bpe, llama3):
    assert end_of_turn_ids(llama3) == [llama3.eos_id, llama3.token_to_id("<|eot_id|>")]
    assert end_of_turn_ids(bpe) == [bpe.eos_id, bpe.token_to_id("<|im_end|>")]  # ChatML
    plain = train_tokenizer(CORPUS, vocab_size=300, special_tokens=["<|endoftext|>"])
    assert end_of_turn_ids(plain) == [plain.eos_id]  # no template: EOS only


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_streamed_text_is_the_whole_decode(bpe, kind):
    """Random ids (broken characters, specials, SentencePiece's leading spaces), one or several per push."""
    tok = bpe
    if kind == "sentencepiece":
        sp = SentencePieceBPETokenizer()
        sp.train_from_iterator(CORPUS, vocab_size=120, min_frequency=1, show_progress=False)
        tok = _SentencePiece(sp)
    rng = random.Random(0)
    for _ in range(40):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 200))]
        step = rng.choice([1, 2, 3])
        assert _streamed(tok, ids, step=step)[0] == tok.decode(ids)


def test_a_character_split_over_tokens_is_never_emitted_as_halves(bpe):
    ids = [bpe.token_to_id("x")] + [bpe.token_to_id(_byte_token(b)) for b in "€🙂".encode()]  # a token per byte
    assert bpe.decode(ids) == "x€🙂"
    ts = TextStream(bpe, [])
    pieces = [ts.push([t]) for t in ids]
    assert pieces == ["x", "", "", "€", "", "", "", "🙂"]  # never a U+FFFD half


def _byte_token(b: int) -> str:
    """GPT-2's printable stand-in for byte b (the byte-level BPE's token for that byte alone)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for x in range(256):
        if x not in bs:
            bs.append(x)
            cs.append(256 + n)
            n += 1
    return chr(dict(zip(bs, cs))[b])


@pytest.mark.parametrize("what", ["text", "invalid bytes", "special tokens"])
def test_a_2000_token_stream_decodes_each_token_a_bounded_number_of_times(bpe, what):
    n = 2000
    if what == "text":
        ids = (bpe.encode("".join(CORPUS)) * 20)[:n]
    elif what == "invalid bytes":  # a model stuck on a lone continuation byte: the text still flows
        ids = [bpe.token_to_id(_byte_token(0x80))] * n
    else:
        ids = [bpe.token_to_id("<|pad|>")] * n
    tok = Counting(bpe)
    text, _ = _streamed(tok, ids, stop=["never-there"])
    assert text == bpe.decode(ids)
    assert tok.decoded <= 10 * n  # re-decoding the output at every token would be n * n / 2 = 2,000,000


def test_stop_strings_cut_and_hold_back(bpe):
    text = "the quick brown fox jumps over the lazy dog"
    ids = bpe.encode(text)
    pieces = []
    ts = TextStream(bpe, ["fox j", "lazy"])
    for t in ids:
        pieces.append(ts.push([t]))
        assert "fox" not in "".join(pieces) or ts.stopped  # "fox" is held until it is known not to be "fox j"
    assert "".join(pieces) == "the quick brown " and ts.stopped and ts.flush() == ""
    out, ts = _streamed(bpe, ids, stop=["fox!"])
    assert out == text and not ts.stopped  # a possible start that never completes is released at the end
    assert completion_text(bpe, ids, ["brown", "quick"]) == cut_at_stop(text, ["quick"]) == "the "
    assert completion_text(bpe, ids + [bpe.vocab_size + 3], []) == text  # a padded embedding's id has no text


def test_covered_counts_the_tokens_whose_text_was_released(bpe):
    ids = bpe.encode("hello there friend")
    ts = TextStream(bpe, ["there"])
    for t in ids:
        ts.push([t])
    assert ts.stopped and ts.text == "hello "
    assert 0 < ts.covered() < len(ids)  # the stop string's tokens are not covered
    assert bpe.decode(ids[: ts.covered()]).startswith("hello")


def test_incremental_decoder_settles_text_once(bpe):
    dec = IncrementalDecoder(bpe)
    ids = bpe.encode("déjà vu 🙂")
    assert "".join(dec.add(t) for t in ids) + dec.pending == "déjà vu 🙂"


# ----------------------------------------------------------------------------- the callers


def _chain_model(tok, chain: dict[int, int], first: int, max_positions: int = 512) -> Transformer:
    """A one-layer model whose greedy next token depends only on the current one: chain[t] after t,
    `first` after any token not in the chain (so after any prompt). Attention and MLP write nothing;
    each chain token's embedding is its own basis vector and the head maps it to its successor."""
    cfg = ModelConfig.preset(
        "tiny",
        vocab_size=tok.vocab_size,
        num_hidden_layers=1,
        tie_word_embeddings=False,
        max_position_embeddings=max_positions,
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or "layernorm" in n:
                p.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb[:, 0] = 1.0  # every token: basis 0, which the head maps to `first`
        head[first, 0] = 20.0
        for k, (t, nxt) in enumerate(chain.items(), start=1):
            emb[t] = 0.0
            emb[t, k] = 1.0
            head[nxt, k] = 20.0
    return model


def test_generate_chat_stops_at_a_llama3_end_of_turn(tmp_path, llama3, capsys):
    """The bug: --chat stopped only at "<|im_end|>", so a Llama 3 style model ran on past <|eot_id|>."""
    a, b, junk, eot = (llama3.token_to_id(s) for s in ("H", "i", "Z", "<|eot_id|>"))
    save_model(_chain_model(llama3, {a: b, b: eot, eot: junk, junk: junk}, first=a), tmp_path / "m", tokenizer=llama3)
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt", "hello", "--max-new-tokens", "12"]
    assert main(args + ["--chat"]) == 0
    assert capsys.readouterr().out.strip() == "Hi"
    assert main(args) == 0  # without --chat the turn's end is not a stop: the text runs on
    assert capsys.readouterr().out.strip() == "Hi" + "Z" * 9


def test_generate_stream_of_2000_tokens_costs_linear_decoding(tmp_path, bpe, capsys, monkeypatch):
    """The bug: --stream decoded the whole output again at every token (n * n / 2 ids for n tokens)."""
    ids = bpe.encode("déjà🙂 fox")  # characters split over tokens
    chain = {t: nxt for t, nxt in zip(ids, ids[1:] + ids[:1])}
    assert len(chain) == len(ids)
    save_model(_chain_model(bpe, chain, first=ids[0], max_positions=2048 + 64), tmp_path / "m", tokenizer=bpe)
    decoded = []
    real = Tokenizer.decode
    monkeypatch.setattr(Tokenizer, "decode", lambda self, i, **kw: decoded.append(len(i)) or real(self, i, **kw))
    n = 2000
    assert (
        main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--max-new-tokens", str(n), "--stream"]) == 0
    )
    out = capsys.readouterr().out
    expected = bpe.decode((ids * (n // len(ids) + 1))[:n])
    assert out.rstrip("\n") == expected and "\ufffd" not in expected[:-1]  # the last character may be cut
    assert sum(decoded) <= 10 * n, sum(decoded)


def test_the_engine_and_eval_stop_at_stop_strings_through_the_same_path(bpe):
    from lmforge.eval.lm import LocalLM
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    ids = bpe.encode("naïve 🙂 fox")
    chain = {t: nxt for t, nxt in zip(ids, ids[1:] + ids[:1])}
    assert len(chain) == len(ids)
    model = _chain_model(bpe, chain, first=ids[0]).eval()
    engine = Engine(model, bpe, max_seqs=2)
    rid = engine.add_request(bpe.encode("go"), SamplingParams(max_new_tokens=40, stop_strings=["🙂"]))
    while engine.has_unfinished():
        engine.step()
    seq = engine.requests[rid]
    assert seq.finish_reason == "stop" and completion_text(bpe, seq.output, ["🙂"]) == "naïve "
    assert len(seq.output) < 10  # it stopped at the stop string, not at max_new_tokens
    lm = LocalLM(model, bpe)
    assert lm.generate(["go", "x"], max_new_tokens=40, stop=["fox"]) == ["naïve 🙂 "] * 2
