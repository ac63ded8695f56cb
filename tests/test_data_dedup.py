"""MinHash dedup: parity with datasketch on the same shingles, planted near-duplicates, determinism."""

import random

import numpy as np
import pytest

from lmforge.data.dedup import (
    DedupConfig,
    MinHasher,
    UnionFind,
    dedup_texts,
    estimate_jaccard,
    exact_jaccard,
    lsh_candidates,
)

datasketch = pytest.importorskip("datasketch")

VOCAB = [f"w{i}" for i in range(400)]


def _doc(rng: random.Random, n: int = 300) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _edit(rng: random.Random, text: str, edits: int) -> str:
    words = text.split()
    for _ in range(edits):
        words[rng.randrange(len(words))] = rng.choice(VOCAB)
    return " ".join(words)


def test_shingles_are_word_ngrams_and_hash_like_their_bytes():
    h = MinHasher(ngram=3)
    text = "a  bb ccc\ndd a bb ccc"
    assert h.shingle_strings(text) == [b"a bb ccc", b"bb ccc dd", b"ccc dd a", b"dd a bb", b"a bb ccc"]
    hashes = h.shingle_hashes(text)
    # the same words hash the same wherever they are, whatever the whitespace; different words differ
    assert hashes[0] == hashes[4] and len(set(hashes.tolist())) == 4
    assert h.shingle_hashes("x a\tbb  ccc")[1] == hashes[4]
    assert MinHasher(ngram=5).shingle_hashes("two words").shape == (1,)  # short text: one shingle
    assert MinHasher(shingle="char", ngram=3).shingle_hashes("abcd").shape == (2,)


def test_jaccard_estimates_match_datasketch_on_the_same_shingles():
    rng = random.Random(0)
    ours = MinHasher(num_perm=128, seed=1)
    diffs, errors = [], []
    for k in range(30):
        a = _doc(rng)
        b = _edit(rng, a, edits=5 + 5 * k)  # true Jaccard from ~0.9 down to ~0.1
        sa, sb = ours.shingle_strings(a), ours.shingle_strings(b)
        true = len(set(sa) & set(sb)) / len(set(sa) | set(sb))
        ma, mb = datasketch.MinHash(num_perm=128, seed=1), datasketch.MinHash(num_perm=128, seed=1)
        ma.update_batch(sa)
        mb.update_batch(sb)
        est = estimate_jaccard(*ours.signatures([a, b]))
        diffs.append(abs(est - ma.jaccard(mb)))
        errors.append(abs(est - true))
        assert exact_jaccard(ours.shingle_set(a), ours.shingle_set(b)) == pytest.approx(true)
    # both estimate the same quantity with std ~sqrt(J(1-J)/128) <= 0.044
    assert np.mean(diffs) < 0.05 and max(diffs) < 0.16
    assert np.mean(errors) < 0.04 and max(errors) < 0.13


def test_planted_near_duplicates_found_like_datasketch_lsh():
    rng = random.Random(1)
    texts = [_doc(rng) for _ in range(40)]
    planted = {}
    for i in range(0, 40, 4):  # every 4th doc gets a near copy (2 of 300 words changed) appended
        planted[len(texts)] = i
        texts.append(_edit(rng, texts[i], edits=2))
    texts.append(texts[5])  # and one exact copy
    planted[len(texts) - 1] = 5
    cfg = DedupConfig(num_perm=128, bands=20, rows=6, threshold=0.8)
    keep, cluster = dedup_texts(texts, cfg)
    assert {i: int(c) for i, c in enumerate(cluster) if c != i} == planted
    assert keep.sum() == 40

    hasher = MinHasher.from_config(cfg)
    lsh = datasketch.MinHashLSH(threshold=0.8, num_perm=128)
    found = set()
    for i, t in enumerate(texts):
        m = datasketch.MinHash(num_perm=128, seed=1)
        m.update_batch(hasher.shingle_strings(t))
        found.update((min(i, j), max(i, j)) for j in lsh.query(m))
        lsh.insert(i, m)
    assert found == {(c, d) for d, c in planted.items()}


def test_dedup_is_deterministic_and_keeps_the_first_of_a_cluster():
    rng = random.Random(2)
    base = _doc(rng)
    texts = [_doc(rng), _edit(rng, base, 1), base, _edit(rng, base, 2)]
    k1, c1 = dedup_texts(texts, DedupConfig())
    k2, c2 = dedup_texts(list(texts), DedupConfig())
    assert (c1 == c2).all() and (k1 == k2).all()
    assert c1.tolist() == [0, 1, 1, 1]


def test_threshold_decides_with_exact_jaccard():
    rng = random.Random(3)
    a = _doc(rng, 400)
    b = _edit(rng, a, 40)  # Jaccard ~0.5
    h = MinHasher()
    j = exact_jaccard(h.shingle_set(a), h.shingle_set(b))
    assert 0.3 < j < 0.7
    assert dedup_texts([a, b], DedupConfig(threshold=j - 0.01, bands=32, rows=4))[0].tolist() == [True, False]
    assert dedup_texts([a, b], DedupConfig(threshold=j + 0.01, bands=32, rows=4))[0].tolist() == [True, True]


def test_lsh_buckets_and_union_find():
    sigs = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [7, 7, 3, 4], [5, 5, 5, 5]], dtype=np.uint32)
    assert lsh_candidates(sigs, bands=2, rows=2).tolist() == [[0, 1], [0, 2]]
    uf = UnionFind(4)
    uf.union(2, 1)
    uf.union(1, 0)
    assert uf.roots().tolist() == [0, 0, 0, 3]


def test_config_errors_name_the_field():
    from lmforge.common import LmforgeError

    with pytest.raises(LmforgeError, match="bands x rows"):
        DedupConfig(num_perm=64, bands=20, rows=6)
    with pytest.raises(LmforgeError, match="dedup.shingle"):
        DedupConfig(shingle="token")


def test_char_shingles_dedup_text_without_spaces():
    rng = random.Random(4)
    chars = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"
    docs = ["".join(rng.choice(chars) for _ in range(400)) for _ in range(6)]
    near = docs[2][:200] + "改" + docs[2][201:]  # one character changed
    cfg = DedupConfig(shingle="char", ngram=5)
    keep, cluster = dedup_texts(docs + [near], cfg)
    assert cluster.tolist() == [0, 1, 2, 3, 4, 5, 2]
    h = MinHasher.from_config(cfg)
    assert h.shingle_strings("abcdef") == [b"abcde", b"bcdef"]


def test_word_shingles_of_chinese_are_characters_and_estimate_like_datasketch():
    """`shingle: word` on text without spaces: each CJK character is a word, mixed with Latin words."""
    rng = random.Random(5)
    chars = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"
    ours = MinHasher(num_perm=128, seed=1)
    a = (
        "".join(rng.choice(chars) for _ in range(300))
        + " Python 3.11 "
        + "".join(rng.choice(chars) for _ in range(100))
    )
    b = a[:50] + "改" + a[51:200] + "变" + a[201:]
    sa, sb = ours.shingle_strings(a), ours.shingle_strings(b)
    assert len(sa) == 400 + 2 - 4 and b"Python" in b" ".join(sa)
    ma, mb = datasketch.MinHash(num_perm=128, seed=1), datasketch.MinHash(num_perm=128, seed=1)
    ma.update_batch(sa)
    mb.update_batch(sb)
    true = len(set(sa) & set(sb)) / len(set(sa) | set(sb))
    assert true > 0.9  # two characters changed: ~10 of ~400 shingles, not the whole "word"
    est = estimate_jaccard(*ours.signatures([a, b]))
    assert abs(est - true) < 0.15 and abs(est - ma.jaccard(mb)) < 0.15
