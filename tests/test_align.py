"""Post-training: losses on hand-computed examples, and each method's effect in a short run."""

import math

import pytest
import torch

from lmforge.config import load_config
from lmforge.recipes import align as recipe
from lmforge.train import align as A
from lmforge.train import align_data as D
from lmforge.train.align_config import AlignConfig


def test_dpo_loss_hand_computed():
    # h = (-1 - -2) - (-3 - -2.5) = 1.5; loss = -log sigmoid(0.1 * 1.5)
    out = A.dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), beta=0.1)
    assert out.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.15))), abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.05)
    ipo = A.dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.5]),
        beta=0.1,
        loss_type="ipo",
    )
    assert ipo.loss.item() == pytest.approx((1.5 - 5.0) ** 2)
    smooth = A.dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.5]),
        beta=0.1,
        label_smoothing=0.2,
    )
    s = 1 / (1 + math.exp(-0.15))
    assert smooth.loss.item() == pytest.approx(-0.8 * math.log(s) - 0.2 * math.log(1 - s), abs=1e-6)


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    adv, ret = A.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # lam = gamma = 1: advantage = total future reward - value
    assert torch.allclose(adv, torch.tensor([[0.5, 0.5, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0]]))


def test_grpo_advantages_are_group_normalised():
    adv = A.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0]), group_size=4)
    assert adv[:4].mean().abs() < 1e-6 and adv[0] > 0 > adv[1]
    assert torch.all(adv[4:] == 0)  # no signal when every sample scores the same


def test_distill_and_kl_are_zero_when_equal_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert A.distill_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert A.distill_loss(logits, torch.randn(2, 5, 11), kind="reverse").item() > 0
    lp = torch.log_softmax(torch.randn(4), -1)
    assert torch.all(A.kl_penalty(lp, lp) == 0)


def test_arithmetic_reward():
    assert D.arithmetic_reward(" 19 and", "19") == 1.0
    assert D.arithmetic_reward("190", "19") == 0.0
    assert D.arithmetic_reward("x19", "19") == 0.0


def test_read_pairs_errors_name_the_line(tmp_path):
    from lmforge.common import LmforgeError

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    with pytest.raises(LmforgeError, match=r"p.jsonl:2: field 'chosen'"):
        D.read_pairs(f)


def _cfg(method, steps, **sets):
    overrides = [f"method={method}", f"train.steps={steps}"] + [f"{k}={v}" for k, v in sets.items()]
    return load_config(AlignConfig, "align-default", overrides)


def test_dpo_raises_margin_and_preference_accuracy(tmp_path):
    torch.manual_seed(0)
    out = recipe.run_dpo(_cfg("dpo", 20), torch.device("cpu"), tmp_path)
    assert out["after"]["margin"] > out["before"]["margin"] + 0.5
    assert out["after"]["policy_prefers_chosen"] > out["before"]["policy_prefers_chosen"]
    assert out["after"]["reward_accuracy"] >= 0.9


def test_dpo_with_lora_uses_the_base_as_reference(tmp_path):
    torch.manual_seed(0)
    out = recipe.run_dpo(_cfg("dpo", 15, **{"peft.method": "lora", "train.lr": 0.01}), torch.device("cpu"), tmp_path)
    assert out["before"]["margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at init
    assert out["after"]["margin"] > 0.3


def test_reward_model_beats_chance(tmp_path):
    torch.manual_seed(0)
    out = recipe.run_reward(_cfg("reward", 20), torch.device("cpu"), tmp_path)
    assert out["after"]["pairwise_accuracy"] >= 0.8
    rm = recipe.load_reward_model(str(tmp_path / "final"), torch.device("cpu"))
    assert isinstance(rm, A.RewardModel)


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_rl_raises_reward_with_bounded_kl(tmp_path, method):
    torch.manual_seed(0)
    out = getattr(recipe, f"run_{method}")(_cfg(method, 25), torch.device("cpu"), tmp_path)
    assert out["after"]["mean_reward"] > out["before"]["mean_reward"] + 0.05
    assert out["after"]["max_kl"] < 2.0


def test_distillation_raises_agreement(tmp_path):
    from lmforge.checkpoint import save_model
    from lmforge.model import build_model
    from lmforge.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer([f"def f{i}(x): return x + {i}  # adds {i}" for i in range(200)], vocab_size=300)
    # An untied random teacher has context-dependent argmaxes a fresh student does not share.
    teacher = build_model("tiny", vocab_size=tok.vocab_size, tie_word_embeddings=False)
    save_model(teacher, tmp_path / "teacher", tokenizer=tok)
    out = recipe.run_distill(
        _cfg("distill", 40, **{"model.teacher": tmp_path / "teacher", "train.lr": 0.005}),
        torch.device("cpu"),
        tmp_path / "student",
    )
    assert out["after"]["greedy_agreement"] > out["before"]["greedy_agreement"] + 0.1


class PrincipleJudge:
    """A test judge that applies the written principle exactly (brackets + final period)."""

    def generate(self, prompts, **kw):
        import re

        out = []
        for p in prompts:
            a = re.search(r"Assistant A's Answer\]\n(.*?)\n\[The End", p, re.S).group(1)
            b = re.search(r"Assistant B's Answer\]\n(.*?)\n\[The End", p, re.S).group(1)
            score = lambda t: ("[" in t) + t.strip().endswith(".")  # noqa: E731
            out.append("[[A]]" if score(a) > score(b) else "[[B]]" if score(b) > score(a) else "[[C]]")
        return out


def test_rlaif_labels_pairs_by_the_principles_and_trains(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg("rlaif", 10, **{"rl.max_new_tokens": 8, "task.train_size": 64, "task.eval_size": 16})
    cfg.rlaif.judge = PrincipleJudge()
    train, _ = recipe.task_records(cfg)
    model, tok = recipe.load_policy(cfg, train, torch.device("cpu"))
    pairs = recipe.R.label_pairs_with_judge(
        model, tok, [r["prompt"] for r in train], PrincipleJudge(), cfg.rlaif.principles, cfg.rl, torch.device("cpu")
    )
    score = lambda t: ("[" in t) + t.strip().endswith(".")  # noqa: E731
    assert pairs and all(score(p["chosen"]) > score(p["rejected"]) for p in pairs)
    out = recipe.run_rlaif(cfg, torch.device("cpu"), tmp_path)
    assert out["labelled_pairs"] >= 4 and math.isfinite(out["after"]["margin"])
    assert (tmp_path / "final" / "model.safetensors").exists()
