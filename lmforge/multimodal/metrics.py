"""Evaluation metrics: retrieval recall@k, zero-shot accuracy, CIDEr-D and BLEU for captions, and
VQA's soft accuracy over several reference answers."""

from __future__ import annotations

import math
import re
from collections import Counter
from itertools import combinations

import torch


def recall_at_k(similarity: torch.Tensor, match: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """similarity [Q, C]; match [Q, C] bool (True where candidate c is a correct answer for query q,
    e.g. the same caption text). Recall@k = fraction of queries with a match in their top k."""
    top = similarity.topk(max(ks), dim=1).indices
    hits = match.gather(1, top)
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Unit image embeddings [N, P] vs unit class embeddings [K, P]: nearest class == label."""
    return (image_emb @ class_emb.T).argmax(dim=1).eq(labels).float().mean().item()


# ----------------------------------------------------------------------------- CIDEr-D


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _tfidf(counts: Counter, df: Counter, log_n: float) -> dict:
    return {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in counts.items()}


def cider_d(candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, as in pycocoevalcap): per n-gram order, the cosine of
    TF-IDF vectors with counts clipped to the reference's and a Gaussian length penalty; averaged
    over orders 1..n and references, times 10. Document frequencies come from the references."""
    tokenize = [[c.lower().split() for c in refs] for refs in references]
    cands = [c.lower().split() for c in candidates]
    log_n = math.log(float(len(references)))
    scores = []
    for order in range(1, n + 1):
        df = Counter()
        for refs in tokenize:
            df.update({g for r in refs for g in _ngrams(r, order)})
        per_image = []
        for cand, refs in zip(cands, tokenize):
            vc = _tfidf(_ngrams(cand, order), df, log_n)
            norm_c = math.sqrt(sum(v * v for v in vc.values()))
            sims = []
            for ref in refs:
                vr = _tfidf(_ngrams(ref, order), df, log_n)
                norm_r = math.sqrt(sum(v * v for v in vr.values()))
                dot = sum(min(vc[g], vr[g]) * vr[g] for g in vc if g in vr)  # clipped ("-D")
                cos = dot / (norm_c * norm_r) if norm_c and norm_r else 0.0
                sims.append(cos * math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2)))
            per_image.append(sum(sims) / len(sims) if sims else 0.0)
        scores.append(per_image)
    per_image = [sum(s[i] for s in scores) / n for i in range(len(candidates))]
    return 10.0 * sum(per_image) / max(1, len(per_image))


def bleu(candidates: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) with every reference set padded to the same count."""
    try:
        import sacrebleu
    except ImportError:
        return float("nan")
    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    return sacrebleu.corpus_bleu(candidates, streams).score


# ----------------------------------------------------------------------------- VQA accuracy

_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = dict(zip("zero one two three four five six seven eight nine ten".split(), map(str, range(11))))


def normalize_answer(text: str) -> str:
    """VQA's answer normalisation (simplified): lower case, punctuation dropped, articles removed,
    number words as digits."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """The VQA soft score: an answer is fully right when at least 3 annotators gave it,
    min(1, matches / 3), averaged over the ways of leaving one annotator out (10 choose 9 for
    VQA v2's ten answers), so agreeing with fewer annotators earns partial credit."""
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    subsets = list(combinations(range(len(refs)), len(refs) - 1))
    return sum(min(1.0, sum(refs[i] == pred for i in s) / 3.0) for s in subsets) / len(subsets)
