"""POPE question sets (balanced, negatives absent, split rules by hand), POPE scores, the VQA soft
score against the official leave-one-out formula, and POPE/existence wired into the VLM recipe."""

import pytest

from lmforge.multimodal.metrics import normalize_answer, vqa_accuracy
from lmforge.multimodal.pope import pope_questions, pope_scores, shape_objects
from lmforge.multimodal.shapes import make_shapes


def test_shape_objects_parse_captions():
    assert shape_objects("a small red circle left of a large blue square") == {"red circle", "blue square"}


def test_pope_questions_are_balanced_and_follow_the_split_rules():
    objects = [{"a", "b"}, {"a", "c"}, {"a", "b"}, {"d"}]
    for split in ("random", "popular", "adversarial"):
        items = pope_questions(objects, split, seed=0)
        for i, q, ans in items:
            obj = q.removeprefix("is there a ").removesuffix(" in the image?")
            assert (obj in objects[i]) == (ans == "yes")
        assert sum(a == "yes" for *_, a in items) == sum(a == "no" for *_, a in items)
    popular = pope_questions(objects, "popular", seed=0)
    assert [q for i, q, a in popular if i == 3 and a == "no"] == ["is there a a in the image?"]  # 'a' is most frequent
    adversarial = pope_questions(objects, "adversarial", seed=0)
    # image 1 holds {a, c}: 'b' co-occurs with 'a' twice, 'd' never -> the adversarial negative is 'b'
    assert [q for i, q, a in adversarial if i == 1 and a == "no"] == ["is there a b in the image?"]
    assert pope_questions(objects, "random", seed=5) == pope_questions(objects, "random", seed=5)
    with pytest.raises(Exception, match="split"):
        pope_questions(objects, "hard")


def test_pope_scores_by_hand():
    s = pope_scores(["Yes", "no", "yes.", "No"], ["yes", "yes", "no", "no"])
    assert s == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}
    always_yes = pope_scores(["yes"] * 4, ["yes", "yes", "no", "no"])
    assert always_yes["yes_ratio"] == 1.0 and always_yes["precision"] == 0.5 and always_yes["recall"] == 1.0


def _official_vqa(pred: str, refs: list[str]) -> float:
    # The VQA v2 evaluation script's loop: each annotator left out in turn.
    accs = []
    for k in range(len(refs)):
        others = refs[:k] + refs[k + 1 :]
        accs.append(min(1.0, sum(o == pred for o in others) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize("matches", range(0, 11))
def test_vqa_accuracy_matches_the_official_formula(matches):
    refs = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("2", refs) == pytest.approx(_official_vqa("2", refs))


def test_vqa_normalisation():
    assert normalize_answer("The Two dogs!") == "2 dogs"
    assert vqa_accuracy("A red circle.", ["red circle"]) == 1.0


def test_vlm_existence_questions_enter_training():
    from lmforge.recipes.vlm import conversations

    examples = make_shapes(20, seed=0)
    plain = conversations(examples, 0.2, False)
    mixed = conversations(examples, 0.2, False, existence_share=0.25, seed=0)
    yes_no = [p for p in mixed if p[1].startswith("is there a ")]
    assert not any(p[1].startswith("is there a ") for p in plain)
    questions = [p for p in mixed if p[1] != "describe the image."]
    assert len(yes_no) == pytest.approx(0.25 * len(questions), abs=2)
    assert {a for _, _, a in yes_no} == {"yes", "no"}
