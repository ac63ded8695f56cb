"""Metrics against hand-computed values and the reference libraries."""

import math

import pytest

from lmforge.eval import metrics as M


def test_exact_match_normalises_case_punctuation_articles():
    assert M.exact_match("The Cat!", ["cat"]) == 1.0
    assert M.exact_match("a  dog.", ["cat", "the dog"]) == 1.0
    assert M.exact_match("cats", ["cat"]) == 0.0


def test_token_f1_hand_computed():
    # pred {cat, sat, down}, ref {cat, sat, on, mat}: 2 common, P = 2/3, R = 1/2, F1 = 4/7
    assert M.token_f1("cat sat down", ["the cat sat on the mat"]) == pytest.approx(4 / 7)
    assert M.token_f1("cat sat down", ["nothing alike", "cat sat down"]) == 1.0  # best reference
    assert M.token_f1("", [""]) == 1.0 and M.token_f1("x", [""]) == 0.0


def test_rouge_l_hand_computed_and_stemmed():
    # LCS("the cat sat", "the cat sat on the mat") = 3: P = 1, R = 1/2, F = 2/3
    assert M.rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert M.rouge_l("cats running", ["cat run"]) == pytest.approx(1.0)  # Porter stemming
    assert M.rouge_l("completely different", ["nothing shared"]) == 0.0


def test_bleu_hand_computed():
    # 13a tokens; clipped n-gram precisions 5/6, 3/5, 2/4, 1/3, brevity penalty 1 (equal lengths).
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert M.bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(expected, rel=1e-6)
    assert M.bleu(["an exact copy of the words"], [["an exact copy of the words"]]) == pytest.approx(100.0)


def test_bleu_chrf_match_sacrebleu_with_multiple_references():
    import sacrebleu

    preds = ["the quick brown fox jumps", "hello there world"]
    refs = [["the quick brown fox leaps", "a quick brown fox jumps"], ["hello world"]]
    streams = [["the quick brown fox leaps", "hello world"], ["a quick brown fox jumps", "hello world"]]
    assert M.bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    assert M.chrf(preds, refs) == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score)
    assert M.chrf(["same text"], [["same text"]]) == pytest.approx(100.0)
    assert M.chrf(["xyz"], [["abc"]]) == 0.0


def test_pass_at_k_hand_computed():
    assert M.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert M.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert M.pass_at_k(3, 0, 1) == 0.0
    assert M.pass_at_k(2, 1, 2) == 1.0
    assert M.pass_at_k(200, 13, 10) == pytest.approx(1 - math.comb(187, 10) / math.comb(200, 10))
    with pytest.raises(ValueError):
        M.pass_at_k(1, 1, 5)


def test_bootstrap_ci():
    assert M.bootstrap_ci([1.0] * 20) == (1.0, 1.0)
    low, high = M.bootstrap_ci([0.0, 1.0] * 50, seed=1)  # mean 0.5, standard error 0.05
    assert 0.38 < low < 0.45 and 0.55 < high < 0.62
    assert M.bootstrap_ci([0.0, 1.0] * 50, seed=1) == (low, high)  # seeded


def test_extract_answer():
    assert M.extract_answer("so the answer is 42. done", r"answer is (\d+)") == "42"
    assert M.extract_answer("  no match here ", r"answer is (\d+)") == "no match here"
    assert M.extract_answer("x = 7", r"\d+") == "7"
