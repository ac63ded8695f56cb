"""Stage 4, dedup: exact (hash of the normalised text) and near-duplicate MinHash LSH.

Fast path, all numpy, no Python loop per hash:
  1. Shingle hashes without building a string per shingle or per word: prefix sums of
     `byte * M**pos` (mod 2**32) give every word's polynomial hash as `(H[end] - H[start]) * M**-start`
     (M is odd, so invertible); a k-word shingle hash is a polynomial in k word hashes (mod 2**64).
  2. All num_perm permutations at once: `(a * x + b) mod 2**32` on a [num_perm, shingles] uint32
     block, then the minimum per row (per document, with `reduceat`, when small documents share a
     block). With a odd each is a bijection of the 32-bit hash space; mod 2**32 instead of
     datasketch's mod (2**61 - 1) needs no division and moves half the bytes, and the estimates agree
     with datasketch's (tests/test_data_dedup.py).
  3. LSH: bands x rows of the signature -> bucket keys -> candidate pairs; candidates verified by
     exact Jaccard on the shingle sets (what makes precision and recall both high), union-find,
     one document kept per cluster (the first in input order, so the result is deterministic).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lmforge.common import LmforgeError
from lmforge.data.words import token_spans

_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd: invertible mod 2**64
_CHUNK = 8192  # shingles per permutation block ([128, 8192] uint32 = 4 MiB, reused)
_MAX_BUCKET_PAIRS = 64  # a bucket larger than this is linked as a chain, not all pairs


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    shingle: str = "word"  # "word" (k consecutive words) or "char" (k consecutive characters)
    ngram: int = 5
    lowercase: bool = False
    num_perm: int = 128
    bands: int = 20
    rows: int = 6  # bands * rows <= num_perm; LSH threshold ~ (1/bands)**(1/rows)
    threshold: float = 0.8  # Jaccard at or above which two documents are duplicates
    verify: bool = True  # check candidates with exact Jaccard (else trust the signature estimate)
    seed: int = 1

    def __post_init__(self) -> None:
        if self.shingle not in ("word", "char"):
            raise LmforgeError(f"dedup.shingle: {self.shingle!r} is not 'word' or 'char'")
        if self.bands * self.rows > self.num_perm:
            raise LmforgeError(f"dedup: bands x rows = {self.bands}x{self.rows} exceeds num_perm={self.num_perm}")
        if not 0.0 < self.threshold <= 1.0:
            raise LmforgeError(f"dedup.threshold must be in (0, 1], got {self.threshold}")
        if self.ngram < 1 or self.bands < 1 or self.rows < 1:
            raise LmforgeError("dedup.ngram, dedup.bands and dedup.rows must be >= 1")

    @property
    def lsh_threshold(self) -> float:
        """The Jaccard at which a pair becomes a candidate with probability ~1/2."""
        return (1.0 / self.bands) ** (1.0 / self.rows)


def exact_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _fmix64(h: np.ndarray) -> np.ndarray:
    """Murmur3's finaliser: spreads every input bit over the output (in place)."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


class _Powers:
    """M**i and M**-i mod 2**32 (M odd, so invertible), grown on demand."""

    def __init__(self) -> None:
        self.pow = np.ones(1, dtype=np.uint32)
        self.inv = np.ones(1, dtype=np.uint32)
        self._m = np.uint32(int(_MUL) & 0xFFFFFFFF)
        self._minv = np.uint32(pow(int(self._m), -1, 2**32))

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n > len(self.pow):
            size = max(n, 2 * len(self.pow))
            self.pow = self._geometric(self._m, size)
            self.inv = self._geometric(self._minv, size)
        return self.pow[:n], self.inv[:n]

    @staticmethod
    def _geometric(base: np.uint32, size: int) -> np.ndarray:
        out = np.empty(size, dtype=np.uint32)
        out[0] = 1
        with np.errstate(over="ignore"):
            np.cumprod(np.full(size - 1, base, dtype=np.uint32), out=out[1:])
        return out


class MinHasher:
    """Shingling + MinHash signatures, vectorised over the shingles of each document.

    A shingle is `ngram` consecutive words (runs of bytes above the space, so whitespace between
    words does not matter; each CJK character is a word: `lmforge.data.words`) or `ngram`
    consecutive characters; `shingle_strings` spells them out
    (b" ".join of the words) for comparison with other implementations.
    """

    def __init__(
        self, num_perm: int = 128, seed: int = 1, shingle: str = "word", ngram: int = 5, lowercase: bool = False
    ) -> None:
        self.num_perm, self.shingle, self.ngram, self.lowercase = num_perm, shingle, ngram, lowercase
        rng = np.random.default_rng(seed)
        self.a = (rng.integers(1, 2**32, size=num_perm, dtype=np.uint64) | np.uint64(1)).astype(np.uint32)
        self.b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
        self._powers = _Powers()

    @classmethod
    def from_config(cls, cfg: DedupConfig) -> MinHasher:
        return cls(cfg.num_perm, cfg.seed, cfg.shingle, cfg.ngram, cfg.lowercase)

    def units(self, text: str) -> np.ndarray:
        """The text as integers: UTF-8 bytes (word shingles) or code points (character shingles)."""
        if self.lowercase:
            text = text.lower()
        if self.shingle == "word":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)

    def _word_spans(self, text: str, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Byte spans of the words (`lmforge.data.words.token_spans`: CJK characters one word each)."""
        return token_spans(text.lower() if self.lowercase else text, units)

    def token_hashes(self, text: str) -> np.ndarray:
        """One uint64 per word (32-bit polynomial hash of its bytes from prefix sums, length in the
        high half) or per character (its code point)."""
        units = self.units(text)
        if self.shingle == "char":
            return units.astype(np.uint64)
        starts, ends = self._word_spans(text, units)
        if len(starts) == 0:
            return np.zeros(0, dtype=np.uint64)
        pw, inv = self._powers.get(len(units))
        with np.errstate(over="ignore"):
            prefix = np.empty(len(units) + 1, dtype=np.uint32)
            prefix[0] = 0
            np.multiply(units, pw, out=prefix[1:], dtype=np.uint32)
            np.cumsum(prefix[1:], out=prefix[1:])
            h = ((prefix[ends] - prefix[starts]) * inv[starts]).astype(np.uint64)
        h |= (ends - starts).astype(np.uint64) << np.uint64(32)
        return h

    def shingle_hashes(self, text: str) -> np.ndarray:
        """64-bit hash of every shingle, in order; a text shorter than one shingle is one shingle."""
        return self.combine(self.token_hashes(text), self.ngram, whole_if_short=True)

    @staticmethod
    def combine(tokens: np.ndarray, k: int, whole_if_short: bool = False) -> np.ndarray:
        """Hashes of every k consecutive tokens: a polynomial in the token hashes, then fmix64."""
        n = len(tokens)
        if n < k:
            if n == 0 or not whole_if_short:
                return np.zeros(0, dtype=np.uint64)
            k = n
        m = n - k + 1
        with np.errstate(over="ignore"):
            h = tokens[:m] * _MUL
            for j in range(1, k):
                h += tokens[j : j + m]
                h *= _MUL
            h += np.uint64(k)
        return _fmix64(h)

    def shingle_strings(self, text: str) -> list[bytes]:
        """The shingles spelled out (slow; for tests and for feeding other MinHash libraries)."""
        units = self.units(text)
        if self.shingle == "char":
            items, sep = [chr(c).encode("utf-8") for c in units.tolist()], b""
        else:
            items, sep = [units[s:e].tobytes() for s, e in zip(*self._word_spans(text, units))], b" "
        k = min(self.ngram, len(items))
        return [sep.join(items[i : i + k]) for i in range(len(items) - k + 1)] if items else []

    def shingle_set(self, text: str) -> np.ndarray:
        return np.unique(self.shingle_hashes(text))

    def signature_of_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """[num_perm] uint32 minimum of (a*x + b) mod 2**32 over the shingles (all 0xFFFFFFFF if none)."""
        return self.signatures_of_hashes([hashes])[0]

    def signatures_of_hashes(self, docs: list[np.ndarray]) -> np.ndarray:
        """[docs, num_perm] signatures. Small documents share one [num_perm, _CHUNK] block (minimum per
        document with `reduceat`); the block is laid out permutation-major so the minimum runs along
        contiguous memory, about twice as fast as the shingle-major layout."""
        out = np.full((len(docs), self.num_perm), 0xFFFFFFFF, dtype=np.uint32)
        buf = np.empty((self.num_perm, _CHUNK), dtype=np.uint32)
        a, b = self.a[:, None], self.b[:, None]

        def block_min(x: np.ndarray, starts: list[int]) -> np.ndarray:  # -> [num_perm, len(starts)]
            blk = buf[:, : len(x)]
            np.multiply(a, (x >> np.uint64(32)).astype(np.uint32)[None, :], out=blk)  # wraps mod 2**32
            blk += b
            return np.minimum.reduceat(blk, starts, axis=1)

        pending: list[int] = []
        size = 0
        for i, h in enumerate(docs):
            if len(h) > _CHUNK:  # a large document: its own blocks, minimum across them
                for off in range(0, len(h), _CHUNK):
                    np.minimum(out[i], block_min(h[off : off + _CHUNK], [0])[:, 0], out=out[i])
                continue
            if len(h) == 0:
                continue
            if size + len(h) > _CHUNK:
                self._flush(docs, pending, out, block_min)
                pending, size = [], 0
            pending.append(i)
            size += len(h)
        self._flush(docs, pending, out, block_min)
        return out

    @staticmethod
    def _flush(docs: list[np.ndarray], pending: list[int], out: np.ndarray, block_min) -> None:
        if pending:
            lens = [len(docs[i]) for i in pending]
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).tolist()
            out[pending] = block_min(np.concatenate([docs[i] for i in pending]), starts).T

    def signatures(self, texts: list[str], group: int = 1 << 20) -> np.ndarray:
        """[texts, num_perm]; shingle hashes are held for about `group` shingles at a time."""
        parts, hashes, size = [], [], 0
        for t in texts:
            hashes.append(self.shingle_hashes(t))
            size += len(hashes[-1])
            if size >= group:
                parts.append(self.signatures_of_hashes(hashes))
                hashes, size = [], 0
        parts.append(self.signatures_of_hashes(hashes))
        return np.concatenate(parts)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def exact_jaccard(set_a: np.ndarray, set_b: np.ndarray) -> float:
    """Jaccard of two sorted unique hash arrays (`MinHasher.shingle_set`)."""
    if len(set_a) == 0 and len(set_b) == 0:
        return 1.0
    inter = len(np.intersect1d(set_a, set_b, assume_unique=True))
    return inter / (len(set_a) + len(set_b) - inter)


def lsh_candidates(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[pairs, 2] int64 (i < j, unique, sorted) of documents sharing at least one band bucket."""
    n = len(sigs)
    found = []
    for band in range(bands):
        cols = sigs[:, band * rows : (band + 1) * rows].astype(np.uint64)
        key = np.full(n, band, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for c in range(rows):
                key = _fmix64(key * _MUL + cols[:, c])
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
        sizes = np.diff(np.append(starts, n))
        for s, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            found.append(_bucket_pairs(order[s : s + size]))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    pairs.sort(axis=1)
    return np.unique(pairs, axis=0)


def _bucket_pairs(members: np.ndarray) -> np.ndarray:
    members = np.sort(members)
    if len(members) > _MAX_BUCKET_PAIRS:  # boilerplate buckets: a chain keeps them connected cheaply
        return np.stack([members[:-1], members[1:]], axis=1)
    i, j = np.triu_indices(len(members), k=1)
    return np.stack([members[i], members[j]], axis=1)


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index becomes the root: the first document of a cluster is kept
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        """Root of every element by pointer jumping (vectorised: log(depth) passes, not a loop per element)."""
        p = self.parent.copy()
        while True:
            q = p[p]
            if (q == p).all():
                return p
            p = q


@dataclass
class NearDupResult:
    cluster: np.ndarray  # [n] int64: index of the kept document of each document's cluster
    candidates: int
    verified: int  # candidate pairs at or above the threshold

    @property
    def keep(self) -> np.ndarray:
        return self.cluster == np.arange(len(self.cluster))


def near_duplicates(
    sigs: np.ndarray, cfg: DedupConfig, shingle_sets: Callable[[list[int]], dict[int, np.ndarray]] | None = None
) -> NearDupResult:
    """Clusters of near-duplicates. `shingle_sets(indices)` gives those documents' shingle sets for
    verification; it is asked only for documents in candidate pairs, so texts need not all be in memory."""
    pairs = lsh_candidates(sigs, cfg.bands, cfg.rows)
    verify = cfg.verify and shingle_sets is not None
    sets = shingle_sets(np.unique(pairs).tolist()) if verify and len(pairs) else {}
    uf = UnionFind(len(sigs))
    verified = 0
    for i, j in pairs.tolist():
        if verify:
            similar = exact_jaccard(sets[i], sets[j]) >= cfg.threshold
        else:
            similar = estimate_jaccard(sigs[i], sigs[j]) >= cfg.threshold
        if similar:
            verified += 1
            uf.union(i, j)
    return NearDupResult(cluster=uf.roots(), candidates=len(pairs), verified=verified)


def dedup_texts(texts: list[str], cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """In-memory convenience: -> (keep mask, cluster: index of each text's kept representative).
    Exact duplicates first (cheap), then MinHash LSH over the exact-unique texts."""
    n = len(texts)
    cluster = np.arange(n, dtype=np.int64)
    if cfg.exact:
        first: dict[str, int] = {}
        for i, t in enumerate(texts):
            cluster[i] = first.setdefault(exact_hash(t), i)
    unique = np.flatnonzero(cluster == np.arange(n))
    if cfg.near and len(unique) > 1:
        hasher = MinHasher.from_config(cfg)
        sigs = hasher.signatures([texts[i] for i in unique])
        near = near_duplicates(sigs, cfg, lambda idx: {k: hasher.shingle_set(texts[unique[k]]) for k in idx})
        rep = unique[near.cluster]  # representative (global index) of each exact-unique text
        cluster = rep[np.searchsorted(unique, cluster)]
    return cluster == np.arange(n), cluster
