"""Shared helpers for the eval tests (no tests here): a tiny model + tokenizer, oracle stubs."""

from __future__ import annotations

import functools
import os

import torch

from lmforge.eval.lm import LocalLM, cut_at_stop

CORPUS = [open(os.__file__, encoding="utf-8").read()]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from lmforge.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=320)


def tiny_model(seed: int = 0, **overrides):
    from lmforge.model import build_model

    torch.manual_seed(seed)
    return build_model("tiny", vocab_size=320, **overrides).eval()


def tiny_lm(batch_size: int = 8, **overrides) -> LocalLM:
    return LocalLM(tiny_model(**overrides), tiny_tokenizer(), batch_size=batch_size, name="tiny")


class OracleLM:
    """Knows the gold answers: the gold continuation of a context scores 0, others -5; generation
    returns the gold answer (plus junk after a stop string). For tests only."""

    def __init__(self, gold_by_input: dict[str, str], junk: str = "\n\nJUNK that the stop string must cut"):
        self.gold, self.junk, self.name = gold_by_input, junk, "oracle"

    def _answer(self, prompt: str) -> str:
        # The asked example is the prompt's end (a few-shot prefix may come first).
        keys = [k for k in self.gold if prompt.endswith(k)]
        return self.gold[max(keys, key=len)] if keys else ""  # an answer-free context: no choice is gold

    def loglikelihood(self, requests):
        return [(0.0 if cont.strip() == self._answer(ctx).strip() else -5.0, True) for ctx, cont in requests]

    def generate(self, prompts, max_new_tokens=64, stop=(), temperature=0.0, seed=None):
        return [cut_at_stop(self._answer(p) + self.junk, stop) for p in prompts]
