"""The dense side of RAG: hashed trigram features, the bi-encoder with hard negatives and dev-chosen
weights, training data from a module split, convex fusion against its formula, the encoder's tuned
fusion, and query-biased passage windows."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("bm25s")

from test_rag import HashEmbedder, docs  # noqa: E402, F401  (the docs fixture)

from lmforge.common import LmforgeError  # noqa: E402
from lmforge.rag.answer import focus, format_passages  # noqa: E402
from lmforge.rag.features import term_features, text_features  # noqa: E402
from lmforge.rag.index import IndexSettings, RagIndex, build_index  # noqa: E402
from lmforge.rag.retrieve import Hit, convex, search, search_batch  # noqa: E402


def test_trigram_features_are_stable_and_share_identifier_parts():
    a, b = text_features("scanString", 1 << 16, 64), text_features("scan_string", 1 << 16, 64)
    assert a == text_features("scanString", 1 << 16, 64)  # CRC32: the same in every process
    parts = set(text_features("scan string", 1 << 16, 64))
    assert parts <= set(a) and parts <= set(b)  # both spellings hold the features of their parts
    assert text_features("when", 1 << 16, 64) != [0]  # a BM25 stopword still names a function here
    assert len(term_features("get", 97)) == 4 and all(0 <= f < 97 for f in term_features("get", 97))  # word + 3
    assert text_features("", 1 << 16, 64) == [0] and len(text_features("a b c d", 1 << 16, 2)) == 2


def test_trigram_biencoder_with_hard_negatives_learns_and_reloads(tmp_path):
    from lmforge.rag.biencoder import BiEncoder, BiEncoderConfig, train_biencoder

    topics = ["cache", "vector", "parser", "socket", "thread", "string", "number", "file"]
    # the hard negative of each: its neighbour's code, sharing the module words ("handle", "value")
    code = {t: f"def handle_{t}(x):\n    '''Handle a {t} value.'''" for t in topics}
    triples = [(f"what handles the {t}?", code[t], code[topics[i - 1]]) for i, t in enumerate(topics)]
    cfg = BiEncoderConfig(text="trigrams", buckets=4096, hidden_size=32, projection_dim=16, steps=40, batch_size=8)
    cfg.lr = 3e-2
    scores = []

    kept = {}

    def on_eval(enc, step):  # a dev score that is best at step 30: those weights must be the ones kept
        scores.append(step)
        if step == 30:
            kept["q"] = enc.embed([triples[0][0]], "query")
        return -abs(step - 30)

    enc = train_biencoder(triples, tmp_path / "enc", cfg, on_eval, eval_every=10)
    assert scores == [10, 20, 30, 40]
    q = enc.embed([t[0] for t in triples], "query")
    d = enc.embed([t[1] for t in triples], "passage")
    assert (np.argmax(q @ d.T, axis=1) == np.arange(len(topics))).mean() >= 0.75
    assert not (tmp_path / "enc" / "tokenizer").exists()  # hashed features: no vocabulary to store
    np.testing.assert_allclose(q[:1], kept["q"], atol=1e-6)  # step 30's weights, not step 40's
    again = BiEncoder.load(tmp_path / "enc")
    np.testing.assert_allclose(again.embed([triples[0][0]], "query"), q[:1], atol=1e-5)


@pytest.fixture()
def fake_stdlib(tmp_path):
    """12 modules of 3 documented functions each (a stand-in for the stdlib: `BuiltinConfig.root`)."""
    root = tmp_path / "lib"
    root.mkdir()
    for m in range(12):
        funcs = "".join(
            f'def parse_{w}_{m}(text):\n    """Parse the {w} records of module {m} quickly."""\n    return text\n\n\n'
            for w in ("alpha", "beta", "gamma")
        )
        (root / f"mod{m}.py").write_text(funcs, encoding="utf-8")
    return root


def test_training_triples_split_modules_and_mine_hard_negatives(fake_stdlib):
    from lmforge.eval.builtin import BuiltinConfig
    from lmforge.rag.training import split_modules, training_triples

    cfg = BuiltinConfig(root=str(fake_stdlib), val_fraction=0.2)
    split = split_modules(cfg, dev_fraction=0.3)
    assert split.train and split.dev and split.test
    names = [set(p.name for p in s) for s in (split.train, split.dev, split.test)]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert sum(map(len, names)) == 12
    triples = training_triples(split.train, split.base, max_chars=120, overlap=0)
    assert len(triples) == 2 * 3 * len(split.train)  # a question and a docstring sentence per function
    for query, positive, negative in triples:
        name = query.split("`")[1].rsplit(".", 1)[-1] if "`" in query else None
        if name:
            assert f"def {name}(" in positive and f"def {name}(" not in negative
        assert negative != positive


def test_convex_fusion_matches_its_formula(docs, tmp_path):  # noqa: F811
    emb = HashEmbedder()
    build_index([str(docs)], tmp_path / "idx", IndexSettings(max_chars=120, overlap=0), emb)
    index = RagIndex.load(tmp_path / "idx")
    index._embedder = emb
    q = "nearest vectors cache"
    sparse = [(index.chunks.index(h.chunk), h.score) for h in search(index, q, 10, "bm25")]
    dense = [(index.chunks.index(h.chunk), h.score) for h in search(index, q, 10, "dense")]

    def norm(r):
        lo, hi = min(s for _, s in r), max(s for _, s in r)
        return {i: (s - lo) / (hi - lo) for i, s in r}

    a, b = norm(sparse), norm(dense)
    for alpha in (0.0, 0.3, 1.0):
        want = {i: (1 - alpha) * a.get(i, 0) + alpha * b.get(i, 0) for i in set(a) | set(b)}
        got = search(index, q, len(want), "hybrid", fusion="convex", alpha=alpha)
        assert [h.score for h in got] == pytest.approx(sorted(want.values(), reverse=True))
        assert want[index.chunks.index(got[0].chunk)] == pytest.approx(max(want.values()))
    assert convex([], [(3, 0.5)], 0.5) == [(3, 0.5)]  # one candidate alone: normalised to 1
    with pytest.raises(LmforgeError, match="alpha"):
        search(index, q, 3, "hybrid", fusion="convex", alpha=1.5)
    with pytest.raises(LmforgeError, match="unknown fusion"):
        search_batch(index, [q], 3, "hybrid", fusion="max")


def test_hybrid_search_uses_the_encoders_tuned_fusion(docs, tmp_path):  # noqa: F811
    enc = tmp_path / "enc"
    enc.mkdir()
    emb = HashEmbedder()
    settings = IndexSettings(max_chars=120, overlap=0, embedder=str(enc))
    build_index([str(docs)], tmp_path / "idx", settings, emb)
    index = RagIndex.load(tmp_path / "idx")
    index._embedder = emb
    assert index.fusion() == ("rrf", None)  # no fusion.json: reciprocal rank fusion
    (enc / "fusion.json").write_text(json.dumps({"fusion": "convex", "alpha": 1.0}))
    assert index.fusion() == ("convex", 1.0)
    q = "nearest vectors"
    dense = {h.chunk.id: h.score for h in search(index, q, 10, "dense")}
    got = [dense[h.chunk.id] for h in search(index, q, 3, "hybrid")]  # alpha 1: the dense order (ties aside)
    assert got == pytest.approx(sorted(dense.values(), reverse=True)[:3])
    (enc / "fusion.json").write_text(json.dumps({"fusion": "mean"}))
    with pytest.raises(LmforgeError, match="fusion.json: fusion must be"):
        search(index, q, 3, "hybrid")


def test_focus_shows_the_window_around_the_question_s_rarest_terms():
    from lmforge.rag.chunking import Chunk

    text = "\n".join(
        ["class Timeout:"]
        + [f"    # the timeout field {i}" for i in range(20)]
        + ["    def expired(self):", '        """Return True once the deadline has passed."""', "        pass"]
    )
    shown, skipped = focus(text, "What does `asyncio.Timeout.expired` do?", 120)
    assert shown.startswith("    def expired(self):") and "has passed" in shown and skipped == 21
    assert focus(text, "unrelated words", 50) == (text[:50], 0)  # nothing shared: the head
    assert focus("short", "expired", 50) == ("short", 0)
    hit = Hit(1, 1.0, Chunk("f.py:10-33", "f.py", None, 10, 33, "f.py", text))
    block = format_passages([hit], 120, "What does `Timeout.expired` do?")
    assert block.startswith("[1] f.py:31-33\n    def expired")  # the line span of the window shown
    assert format_passages([hit], 120).startswith("[1] f.py:10-") and "class Timeout" in format_passages([hit], 120)


def test_reader_examples_copy_from_the_window_and_mix_closed_book_questions(fake_stdlib):
    from lmforge.eval.builtin import BuiltinConfig
    from lmforge.rag.reader import reader_examples

    cfg = BuiltinConfig(root=str(fake_stdlib), val_fraction=0.2)
    rows = reader_examples(cfg, closed_book=0.0)
    assert rows and all(r["messages"][1]["content"].endswith(" [1]") for r in rows)
    for r in rows:
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"].removesuffix(" [1]")
        assert "Passages:\n[1] " in user and answer in user  # the answer is in the passage shown
    mixed = reader_examples(cfg, closed_book=0.5)
    book = [r for r in mixed if r["messages"][0]["content"].startswith("Question: ")]
    assert 0 < len(book) < len(mixed) and not any("[1]" in r["messages"][1]["content"] for r in book)


def test_counterfactual_reader_examples_answer_from_the_passage_not_the_question(fake_stdlib):
    from lmforge.eval.builtin import BuiltinConfig
    from lmforge.rag.reader import reader_examples

    rows = reader_examples(BuiltinConfig(root=str(fake_stdlib), val_fraction=0.2), closed_book=0.0, counterfactual=0.9)
    swapped = 0
    for r in rows:
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"].removesuffix(" [1]")
        assert answer in user  # always copyable from the passage shown
        _, w, m = user.rsplit("`", 2)[1].rsplit(".", 1)[1].split("_")  # parse_<w>_<m>
        swapped += answer != f"Parse the {w} records of module {m} quickly."
    assert 0 < swapped < len(rows)
