"""The recipes whose loss is not the LM loss (align, clip, vlm, train-medusa, quantize --method qat)
run through train.fit: a run killed after a checkpoint and resumed ends with the weights of an
uninterrupted run; clipping applies to a custom loss; metrics.jsonl is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.recipes._fit import FitOptions, LoopState, constant_lr, run_dir_for, run_fit
from lmforge.train.state import latest_good, list_checkpoints


class Killed(Exception):
    pass


def kill_on_call(monkeypatch, owner, name: str, n: int):
    """Make owner.name raise Killed on its n-th call (1-based): a crash in the middle of a run."""
    real, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=0, atol=1e-6, msg=k)


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- the step itself


def test_custom_loss_is_clipped_logged_and_checkpointed(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.ones(2, 4)
    loss_fn = lambda b: ((model(b["x"]) * 1000).mean(), {"scale": 1000.0})
    summary = run_fit(
        model, opt, loss_fn, lambda step: {"x": x}, tmp_path, FitOptions(1, constant_lr(1.0), clip_grad=0.1)
    )
    assert summary["steps"] == 1
    # the gradient norm is 2000; clipped to 0.1, one SGD step at lr 1 moves the weight by exactly 0.1
    assert float((model.weight.detach() - before).norm()) == pytest.approx(0.1, rel=1e-4)
    step = [r for r in records(tmp_path / "metrics.jsonl") if "step" in r]
    assert step[0]["grad_norm"] == pytest.approx(2000.0, rel=1e-4) and step[0]["scale"] == 1000.0
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000001"]


def test_loop_state_restores_generators():
    import numpy as np

    rng, gen = torch.Generator().manual_seed(3), np.random.default_rng(5)
    state = LoopState(numpy=[gen], generators=[rng], values={"k": 1})
    saved = json.loads(json.dumps(state.state_dict()))  # what a checkpoint stores
    expected = (gen.random(), torch.rand(1, generator=rng))
    other = LoopState(numpy=[np.random.default_rng(0)], generators=[torch.Generator()], values={"k": 0})
    other.load_state_dict(saved)
    assert other.values == {"k": 1}
    assert (other.numpy[0].random(), torch.rand(1, generator=other.generators[0])) == expected


# ----------------------------------------------------------------------------- align


def _align_cfg(method, steps, **sets):
    from lmforge.config import load_config
    from lmforge.train.align_config import AlignConfig

    return load_config(
        AlignConfig,
        "align-default",
        [f"method={method}", f"train.steps={steps}"] + [f"{k}={v}" for k, v in sets.items()],
    )


def _run_align(method, run, resume=None, **sets):
    from lmforge.recipes import align as recipe

    torch.manual_seed(0)
    return getattr(recipe, f"run_{method}")(_align_cfg(method, 8, **sets), torch.device("cpu"), run, resume=resume)


@pytest.mark.parametrize("method,kill", [("dpo", ("_batches", 6)), ("ppo", ("rollout", 5))])
def test_align_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, method, kill):
    from lmforge.recipes import align as recipe

    sets = {"rl.max_new_tokens": 4, "rl.prompts_per_step": 2, "task.eval_size": 8} if method == "ppo" else {}
    _run_align(method, tmp_path / "whole", **sets)
    with monkeypatch.context() as m:
        # dpo: 8 steps, a checkpoint every 2; dies fetching step 6's batch (checkpoints 2 and 4 written)
        # ppo: 8 rollouts x 2 epochs, a checkpoint every 2 rollouts (4 steps); the 1st rollout call is
        # the "before" evaluation, so it dies sampling rollout 4 at step 7 (checkpoint 4 written)
        kill_on_call(m, recipe.R if kill[0] == "rollout" else recipe, *kill)  # rollouts: recipes/_align_rollout.py
        with pytest.raises(Killed):
            _run_align(method, tmp_path / "cut", **sets)
    assert not (tmp_path / "cut" / "final").exists()
    cut_at = int(latest_good(tmp_path / "cut" / "checkpoints").name.split("-")[1])
    assert cut_at == 4
    _run_align(method, tmp_path / "cut", resume="latest", **sets)
    assert_same_weights(
        load_file(tmp_path / "whole" / "final" / "model.safetensors"),
        load_file(tmp_path / "cut" / "final" / "model.safetensors"),
    )
    steps = [r["step"] for r in records(tmp_path / "cut" / "metrics.jsonl") if "loss" in r]
    total = 8 if method == "dpo" else 16
    assert steps == list(range(1, total + 1))  # the killed run's steps, then the resumed run's
    assert "margin" in records(tmp_path / "cut" / "metrics.jsonl")[0] or method == "ppo"


# ----------------------------------------------------------------------------- clip, vlm, medusa


def test_clip_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    from lmforge.multimodal.config import ClipTrainConfig
    from lmforge.recipes import clip as recipe

    cfg = ClipTrainConfig(
        train_size=64,
        eval_size=16,
        steps=8,
        batch_size=8,
        warmup_steps=2,
        device="cpu",
        vision={
            "image_size": 16,
            "patch_size": 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
        },
        text={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32,
        },
        projection_dim=16,
        vocab_size=300,
        hard_negatives=True,
        text_negatives=1,
    )
    recipe.train(cfg, str(tmp_path / "whole"))
    with monkeypatch.context() as m:
        kill_on_call(m, recipe, "encode_texts", 8)  # dies building step 8's batch (checkpoints at 2, 4, 6)
        with pytest.raises(Killed):
            recipe.train(cfg, str(tmp_path / "cut"))
    run = run_dir_for(tmp_path / "cut")
    assert latest_good(run / "checkpoints").name == "step-00000006"
    recipe.train(cfg, str(tmp_path / "cut"), resume="latest")
    assert_same_weights(
        load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    )
    assert [r["step"] for r in records(run / "metrics.jsonl") if "loss" in r] == list(range(1, 9))


def test_vlm_fit_continues_the_step_count_and_optimizer_state(tmp_path):
    from lmforge.model import ModelConfig
    from lmforge.multimodal import VisionConfig, VisionLanguageModel, VlmConfig
    from lmforge.multimodal.config import VlmTrainConfig
    from lmforge.multimodal.shapes import make_shapes
    from lmforge.recipes import vlm as recipe
    from lmforge.tokenizer import train_tokenizer

    examples = make_shapes(16, seed=0, image_size=16)
    tok = train_tokenizer([c for e in examples for c in e.captions] + ["describe the image."], vocab_size=300)
    text = ModelConfig.preset(
        "tiny",
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    vc = VisionConfig(
        image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    cfg = VlmTrainConfig(batch_size=4, warmup_steps=1, device="cpu")
    pairs = recipe.conversations(examples, 0.2, captions_only=True)

    def run(steps, resume=None):
        torch.manual_seed(0)
        model = VisionLanguageModel(VlmConfig(vc, text, tok.token_to_id("<image>"), pool=2))
        opt = recipe.stage_optimizer(model, 1, cfg)
        recipe.fit(model, tok, examples, pairs, opt, steps, cfg, "cpu", tmp_path, resume)
        return opt

    run(2)
    opt = run(4, resume="latest")
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert all(int(s["step"]) == 4 for s in opt.state.values())  # Adam's count went on from 2


def test_train_medusa_resumes_to_the_uninterrupted_heads(tmp_path, monkeypatch):
    from lmforge.checkpoint import save_model
    from lmforge.cli import main
    from lmforge.infer import medusa
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import train_tokenizer

    text = "def add(a, b):\n    return a + b\n" * 40
    tok = train_tokenizer([text], vocab_size=300)
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size)), tmp_path / "base", tokenizer=tok)
    (tmp_path / "data.txt").write_text(text)
    args = lambda out: [
        "train-medusa",
        "--model",
        str(tmp_path / "base"),
        "--out",
        str(tmp_path / out),
        "--data",
        str(tmp_path / "data.txt"),
        "--steps",
        "8",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--heads",
        "2",
    ]
    assert main(args("whole")) == 0
    with monkeypatch.context() as m:
        kill_on_call(m, medusa, "medusa_loss", 7)  # dies in step 7 (checkpoints at 2, 4, 6)
        assert main(args("cut")) != 0  # the CLI reports the crash
    assert latest_good(run_dir_for(tmp_path / "cut") / "checkpoints").name == "step-00000006"
    assert main(args("cut") + ["--resume"]) == 0
    weights = lambda out: {
        k: v for f in sorted((tmp_path / out).glob("*.safetensors")) for k, v in load_file(f).items()
    }
    assert weights("whole") and weights("whole").keys() == weights("cut").keys()
    assert_same_weights(weights("whole"), weights("cut"))
    run = run_dir_for(tmp_path / "cut")
    assert [r["step"] for r in records(run / "metrics.jsonl") if "loss" in r] == list(range(1, 9))


def test_qat_finetune_runs_through_fit(monkeypatch):
    from lmforge.common import get_logger
    from lmforge.model import ModelConfig, Transformer
    from lmforge.quant import IntNLinear
    from lmforge.recipes import _fit
    from lmforge.recipes.quantize import qat_finetune

    seen = []
    real = _fit.fit
    monkeypatch.setattr(_fit, "fit", lambda *a, **k: seen.append(a[5].steps) or real(*a, **k))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=64, hidden_size=64, intermediate_size=128))
    batches = [torch.randint(0, 64, (2, 17)) for _ in range(3)]
    qat_finetune(model, batches, "int4-g32", ("lm_head",), 5, 1e-3, get_logger())
    assert seen == [5]
    assert any(isinstance(m, IntNLinear) for m in model.modules())


@pytest.mark.parametrize("command", ["clip", "vlm"])
def test_resume_is_refused_outside_training(tmp_path, capsys, command):
    from lmforge.cli import main

    assert main([command, "eval", "--model", str(tmp_path), "--resume"]) == 2
    assert "--resume applies to" in capsys.readouterr().err
