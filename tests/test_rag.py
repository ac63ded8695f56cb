"""lmforge.rag: chunking (English, Chinese, Markdown, code), BM25 and dense retrieval against brute-force
references, reciprocal rank fusion, citations, incremental re-indexing, and clear errors."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("bm25s")

from lmforge.common import LmforgeError  # noqa: E402
from lmforge.rag.answer import answer_batch, build_prompt, parse_citations, strip_citations  # noqa: E402
from lmforge.rag.chunking import chunk_text, sentence_spans  # noqa: E402
from lmforge.rag.index import IndexSettings, RagIndex, build_index, indexed_text  # noqa: E402
from lmforge.rag.retrieve import Hit, rrf, search, search_batch  # noqa: E402
from lmforge.rag.terms import terms  # noqa: E402

MARKDOWN = """# Guide

Intro sentence one. Second sentence here! Is this the third? Yes.

## Install

```bash
pip install lmforge
# a comment, not a heading
```

## Caching

The cache keeps results for one hour. It is cleared on restart.
"""
CHINESE = "检索增强生成先把文档分块。然后为每一块建立索引！查询时先检索再生成答案？最后引用来源。"


# ----------------------------------------------------------------------------- chunking


def test_markdown_chunks_follow_headings_and_keep_code_fences_whole():
    chunks = chunk_text(MARKDOWN, "guide.md", max_chars=200, overlap=0)
    titles = [c.title for c in chunks]
    assert titles == ["Guide", "Guide > Install", "Guide > Caching"]  # one section per chunk
    install = chunks[1]
    assert "```bash\npip install lmforge\n# a comment, not a heading\n```" in install.text
    assert (install.start_line, install.end_line) == (5, 10)
    lines = MARKDOWN.split("\n")
    for c in chunks:  # the id and the span point at the text in the file
        assert c.id == f"guide.md:{c.start_line}-{c.end_line}"
        assert c.text.split("\n")[0].strip() in lines[c.start_line - 1]
        assert c.text.split("\n")[-1].strip() in lines[c.end_line - 1]


def test_long_prose_splits_at_english_sentence_ends_with_overlap():
    text = " ".join(f"Sentence number {i} is here." for i in range(12))
    chunks = chunk_text(text, "a.txt", max_chars=90, overlap=40)
    assert len(chunks) > 2
    for c in chunks:
        assert len(c.text) <= 90 and c.text.endswith(".")  # cut at sentence ends, never inside one
    for a, b in zip(chunks, chunks[1:]):  # the next chunk starts with the previous one's last sentence
        assert a.text.split(". ")[-1].rstrip(".") in b.text
    assert "".join(c.text for c in chunks).count("Sentence number 11 is here.") >= 1


def test_chinese_sentence_ends_split_without_spaces():
    spans = sentence_spans(CHINESE)
    assert [CHINESE[a:b] for a, b in spans] == [
        "检索增强生成先把文档分块。",
        "然后为每一块建立索引！",
        "查询时先检索再生成答案？",
        "最后引用来源。",
    ]
    chunks = chunk_text(CHINESE, "zh.txt", max_chars=30, overlap=0)
    assert all(c.text[-1] in "。！？" for c in chunks) and len(chunks) >= 2


def test_source_files_split_before_top_level_definitions():
    code = "import os\n\n\ndef first():\n    '''One.'''\n    return 1\n\n\n@decorator\ndef second():\n    return 2\n"
    chunks = chunk_text(code, "m.py", code=True, max_chars=40, overlap=0)
    assert [c.text.split("\n")[0] for c in chunks] == ["import os", "def first():", "@decorator"]
    assert chunks[2].text.endswith("return 2") and (chunks[2].start_line, chunks[2].end_line) == (9, 11)


def test_a_line_longer_than_the_chunk_is_cut_and_ids_stay_unique():
    chunks = chunk_text("x" * 250, "long.txt", max_chars=100, overlap=0)
    assert [len(c.text) for c in chunks] == [100, 100, 50]
    assert len({c.id for c in chunks}) == 3


def test_bad_chunk_settings_are_refused():
    with pytest.raises(ValueError):
        chunk_text("a", "a.txt", max_chars=10, overlap=10)
    with pytest.raises(LmforgeError, match="overlap"):
        IndexSettings(max_chars=100, overlap=200)
    with pytest.raises(LmforgeError, match="Chinese"):
        IndexSettings(chinese="words")


def test_terms_split_identifiers_and_segment_chinese():
    t = terms("What does `json.decoder.scanString` do? parse_http")
    assert {"json", "decoder", "scanstring", "scan", "string", "parse_http", "parse", "http"} <= set(t)
    assert "what" not in t and "does" not in t  # stopwords
    assert terms("检索增强", "bigram") == ["检索", "索增", "增强"]
    assert "检索" in terms("检索增强生成", "jieba")


# ----------------------------------------------------------------------------- BM25 vs brute force


def _bm25_reference(corpus: list[list[str]], query: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Lucene's BM25 from its definition (Kamphuis et al. 2020): idf = ln(1 + (N - df + .5) / (df + .5)),
    term weight tf / (tf + k1 (1 - b + b |d| / avgdl)) (Lucene drops the constant (k1 + 1) factor)."""
    n, avg = len(corpus), sum(map(len, corpus)) / len(corpus)
    df = Counter(t for doc in corpus for t in set(doc))
    out = np.zeros(n)
    for i, doc in enumerate(corpus):
        tf = Counter(doc)
        for t in set(query):
            if tf[t]:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                out[i] += idf * tf[t] / (tf[t] + k1 * (1 - b + b * len(doc) / avg))
    return out


@pytest.fixture()
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "guide.md").write_text(MARKDOWN, encoding="utf-8")
    (folder / "zh.txt").write_text(CHINESE * 2, encoding="utf-8")
    rows = [
        {"id": "faiss", "text": "Faiss finds the nearest vectors quickly, exactly or approximately."},
        {"text": "BM25 ranks documents by term frequency and inverse document frequency."},
        {"text": "Reciprocal rank fusion adds one over sixty plus the rank."},
    ]
    (folder / "notes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def test_bm25_scores_match_the_formula(docs, tmp_path):
    build_index([str(docs)], tmp_path / "idx", IndexSettings(max_chars=120, overlap=0))
    index = RagIndex.load(tmp_path / "idx")
    for query in ["how long does the cache keep results", "document frequency ranks", "检索 答案"]:
        q = terms(query, "bigram")
        got = index.bm25.scores(q)
        want = _bm25_reference(index.terms, q)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        hits = search(index, query, top_k=3, mode="bm25")
        assert [h.chunk.id for h in hits][0] == index.chunks[int(np.argmax(want))].id


def test_chunk_ids_trace_records_of_jsonl_files(docs, tmp_path):
    build_index([str(docs)], tmp_path / "idx", IndexSettings())
    ids = {c.id for c in RagIndex.load(tmp_path / "idx").chunks}
    notes = str(docs / "notes.jsonl")
    assert {f"{notes}#faiss:1-1", f"{notes}#L2:1-1", f"{notes}#L3:1-1"} <= ids


# ----------------------------------------------------------------------------- dense vs brute force


class HashEmbedder:
    """A deterministic bag-of-terms embedder (no model download): enough to test the plumbing."""

    name, dim = "hash", 64

    def embed(self, texts, kind="passage"):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in terms(t, "bigram"):
                out[i, hash(w) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


@pytest.mark.parametrize("backend", ["faiss", "numpy"])
def test_dense_search_matches_brute_force(docs, tmp_path, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    emb = HashEmbedder()
    build_index([str(docs)], tmp_path / "idx", IndexSettings(max_chars=120, overlap=0), emb)
    index = RagIndex.load(tmp_path / "idx")
    index._embedder = emb
    passages = emb.embed([indexed_text(c) for c in index.chunks])
    np.testing.assert_allclose(index.vectors, passages, atol=1e-6)
    for query in ["nearest vectors", "cache results hour"]:
        sims = passages @ emb.embed([query], "query")[0]
        hits = search_batch(index, [query], top_k=4, mode="dense", backend=backend)[0]
        np.testing.assert_allclose([h.score for h in hits], np.sort(sims)[::-1][:4], atol=1e-5)
        assert index._vector_index.backend == backend


def test_rrf_fuses_by_rank_alone():
    fused = rrf([[3, 1, 2], [1, 4]], k=60)
    assert [d for d, _ in fused] == [1, 3, 4, 2]  # 1: 1/62 + 1/61 beats 3: 1/61
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert rrf([]) == []


def test_hybrid_search_fuses_bm25_and_dense(docs, tmp_path):
    emb = HashEmbedder()
    build_index([str(docs)], tmp_path / "idx", IndexSettings(max_chars=120, overlap=0), emb)
    index = RagIndex.load(tmp_path / "idx")
    index._embedder = emb
    q = "nearest vectors"
    sparse = [h.chunk.id for h in search(index, q, 10, "bm25")]
    dense = [h.chunk.id for h in search(index, q, 10, "dense")]
    pos = {c.id: i for i, c in enumerate(index.chunks)}
    want = rrf([[pos[i] for i in sparse], [pos[i] for i in dense]])
    got = search(index, q, 3, "hybrid")
    assert [h.chunk.id for h in got] == [index.chunks[i].id for i, _ in want[:3]]


# ----------------------------------------------------------------------------- citations


def test_citations_parse_and_invalid_numbers_are_kept_apart():
    assert parse_citations("A [1] and B [2, 3]; again [1][4].") == [1, 2, 3, 4]
    assert parse_citations("no citation, [x], [ ]") == []
    assert strip_citations("One hour [1][2].") == "One hour ."


class ScriptedLM:
    name = "scripted"

    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    def generate(self, prompts, max_new_tokens=64, **kw):
        self.prompts += prompts
        return [self.reply for _ in prompts]


def test_answer_numbers_passages_and_parses_citations(docs, tmp_path):
    build_index([str(docs)], tmp_path / "idx", IndexSettings(max_chars=120, overlap=0))
    index = RagIndex.load(tmp_path / "idx")
    hits = search(index, "how long does the cache keep results", 2, "bm25")
    lm = ScriptedLM("It keeps them for one hour [1], see also [7].")
    ans = answer_batch(lm, ["How long is the cache kept?"], [hits])[0]
    assert "[1] " in lm.prompts[0] and "one hour" in lm.prompts[0] and "Cite the passages" in lm.prompts[0]
    assert ans.citations == [1] and ans.invalid_citations == [7]
    assert ans.to_dict()["sources"][0]["id"] == hits[0].chunk.id


def test_chat_template_prompt_for_a_local_model():
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(["hello world"] * 3, 300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    chunk = chunk_text("The sky is blue.", "s.txt")[0]
    prompt = build_prompt(tok, "What colour is the sky?", [Hit(1, 1.0, chunk)])
    assert prompt.startswith("<|im_start|>user") and "[1] s.txt:1-1\nThe sky is blue." in prompt
    assert prompt.rstrip().endswith("<|im_start|>assistant")


# ----------------------------------------------------------------------------- incremental index, errors


def test_reindex_only_changed_files(docs, tmp_path):
    out = tmp_path / "idx"
    calls = []

    class CountingEmbedder(HashEmbedder):
        def embed(self, texts, kind="passage"):
            calls.append(len(texts))
            return super().embed(texts, kind)

    emb = CountingEmbedder()
    settings = IndexSettings(max_chars=120, overlap=0, embedder="x", embedder_fingerprint="f1")
    first = build_index([str(docs)], out, settings, emb)
    assert (first["reindexed"], first["reused"]) == (3, 0)
    again = build_index([str(docs)], out, settings, emb)
    assert (again["reindexed"], again["reused"]) == (0, 3) and calls[1:] == []  # nothing re-embedded
    (docs / "guide.md").write_text(MARKDOWN.replace("one hour", "two days"), encoding="utf-8")
    (docs / "zh.txt").unlink()
    (docs / "new.md").write_text("# New\n\nA fresh file about vectors.\n", encoding="utf-8")
    third = build_index([str(docs)], out, settings, emb)
    assert (third["reindexed"], third["reused"], third["removed"]) == (2, 1, 1)
    index = RagIndex.load(out)
    assert calls[-1] == sum(1 for c in index.chunks if not c.file.endswith("notes.jsonl"))
    assert not any(c.file.endswith("zh.txt") for c in index.chunks)
    assert "two days" in search(index, "how long does the cache keep results", 1, "bm25")[0].chunk.text
    np.testing.assert_allclose(index.vectors, emb.embed([indexed_text(c) for c in index.chunks]), atol=1e-6)
    other = build_index([str(docs)], out, IndexSettings(max_chars=60, overlap=0))  # new chunking: all again
    assert other["reindexed"] == 3 and not (out / "vectors.npy").exists()


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(LmforgeError, match="input not found"):
        build_index([str(tmp_path / "missing")], tmp_path / "idx", IndexSettings())
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n", encoding="utf-8")
    with pytest.raises(LmforgeError, match="nothing to index"):
        build_index([str(empty)], tmp_path / "idx", IndexSettings())
    assert not (tmp_path / "idx").exists()  # nothing half-written
    with pytest.raises(LmforgeError, match="not an lmforge rag index"):
        RagIndex.load(tmp_path / "nowhere")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine", encoding="utf-8")
    (empty / "blank.txt").write_text("some text", encoding="utf-8")
    with pytest.raises(LmforgeError, match="not an lmforge rag index; choose another"):
        build_index([str(empty)], precious, IndexSettings())
    assert (precious / "keep.txt").read_text() == "mine"  # never overwritten


def test_search_refuses_bad_queries_and_missing_vectors(docs, tmp_path):
    build_index([str(docs)], tmp_path / "idx", IndexSettings())
    index = RagIndex.load(tmp_path / "idx")
    with pytest.raises(LmforgeError, match="empty"):
        search(index, "  ", 3, "bm25")
    with pytest.raises(LmforgeError, match="top-k"):
        search(index, "cache", 0, "bm25")
    with pytest.raises(LmforgeError, match="mode"):
        search(index, "cache", 3, "fuzzy")
    with pytest.raises(LmforgeError, match="without an embedding model"):
        search(index, "cache", 3, "dense")
    assert search(index, "zzzunknownword", 3, "bm25") == []


def test_lm_reranking_orders_candidates_by_query_likelihood(docs, tmp_path):
    build_index([str(docs)], tmp_path / "idx", IndexSettings(max_chars=120, overlap=0))
    index = RagIndex.load(tmp_path / "idx")

    class LikesFaiss:  # log p(query | passage): high when the passage mentions Faiss
        def loglikelihood(self, requests):
            return [(0.0 if "Faiss" in ctx else -10.0, True) for ctx, _ in requests]

    q = "ranks documents by term frequency, not vectors"
    plain = search(index, q, 3, "bm25")
    reranked = search(index, q, 3, "bm25", reranker=LikesFaiss())
    assert "Faiss" not in plain[0].chunk.text and "Faiss" in reranked[0].chunk.text
    assert {h.chunk.id for h in plain} == {h.chunk.id for h in reranked}
