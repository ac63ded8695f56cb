"""POPE (Li et al. 2023): does a vision-language model say an object is in the image when it is not?

Yes/no questions "is there a red circle in the image?", half about objects the image holds (answer
yes) and half about objects it does not (answer no), the absent ones drawn three ways:
    random       uniformly from the objects not in the image
    popular      the most frequent objects of the data set that are not in the image
    adversarial  the objects that most often appear *together with* this image's objects elsewhere
A model that hallucinates says yes to absent objects: precision and the yes-ratio show it, and the
adversarial split is the hardest. Scores: accuracy, precision, recall, F1 (yes is positive), yes-ratio.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from lmforge.common import LmforgeError

SPLITS = ("random", "popular", "adversarial")


def shape_objects(caption: str) -> set[str]:
    """The objects ("red circle") of a generated-shapes caption ("a small red circle left of ...")."""
    return {" ".join(phrase.split()[-2:]) for phrase in caption.split(" left of ")}


def question(obj: str) -> str:
    return f"is there a {obj} in the image?"


def pope_questions(
    objects: list[set[str]], split: str, seed: int = 0, per_image: int = 1
) -> list[tuple[int, str, str]]:
    """(image index, question, "yes" | "no") pairs: per image, `per_image` present objects and as
    many absent ones chosen by `split`. Deterministic for a seed."""
    if split not in SPLITS:
        raise LmforgeError(f"POPE split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng = np.random.default_rng(seed)
    vocabulary = sorted(set().union(*objects)) if objects else []
    frequency = Counter(o for objs in objects for o in objs)
    together: dict[str, Counter] = {o: Counter() for o in vocabulary}
    for objs in objects:
        for a in objs:
            together[a].update(b for b in objs if b != a)
    out = []
    for i, objs in enumerate(objects):
        absent = [o for o in vocabulary if o not in objs]
        k = min(per_image, len(objs), len(absent))
        for obj in rng.permutation(sorted(objs))[:k].tolist():
            out.append((i, question(obj), "yes"))
        if split == "random":
            negatives = rng.permutation(absent)[:k].tolist()
        else:
            score = (
                frequency if split == "popular" else sum((together[o] for o in objs), Counter())
            )  # co-occurrence with what is in the image
            negatives = sorted(absent, key=lambda o: (-score[o], o))[:k]
        out.extend((i, question(obj), "no") for obj in negatives)
    return out


def _yes(answer: str) -> bool:
    return answer.strip().lower().rstrip(".!").startswith("yes")


def pope_scores(predictions: list[str], answers: list[str]) -> dict:
    """Accuracy, precision, recall, F1 with "yes" as the positive class, and the share of yes answers."""
    pred = [_yes(p) for p in predictions]
    gold = [a == "yes" for a in answers]
    tp = sum(p and g for p, g in zip(pred, gold))
    precision = tp / max(1, sum(pred))
    recall = tp / max(1, sum(gold))
    return {
        "accuracy": round(float(np.mean([p == g for p, g in zip(pred, gold)])), 4) if gold else float("nan"),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(2 * precision * recall / (precision + recall), 4) if precision + recall else 0.0,
        "yes_ratio": round(float(np.mean(pred)), 4) if pred else float("nan"),
    }
