"""The pieces the pipeline's stages rest on: one document split for pretraining, SFT and eval;
contamination against everything trained on; the calibrated multiple-choice score; a draft
distilled from its teacher; Muon that trains and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main as cli
from lmforge.recipes._common import read_metrics

TINY = [
    "--set",
    "model.hidden_size=32",
    "--set",
    "model.intermediate_size=64",
    "--set",
    "model.num_hidden_layers=1",
    "--set",
    "model.num_attention_heads=2",
    "--set",
    "model.num_key_value_heads=1",
]


def _stdlib(root, n=40):
    """A fake standard library: n modules with one documented public function each."""
    for i in range(n):
        (root / f"mod{i}.py").write_text(
            f'def read_thing_{i}(path):\n    """Read the thing number {i} from a path on disk."""\n    return {i}\n'
        )
    return root


def test_one_split_for_sft_and_eval(tmp_path):
    from lmforge.data.shards import is_validation
    from lmforge.eval.builtin import BuiltinConfig, functions
    from lmforge.train.stdlib_data import builtin_sft_examples

    root = _stdlib(tmp_path)
    splits = builtin_sft_examples(None, heldout_fraction=0.3, split_seed=0, root=root)
    held = {f["signature"] for f in functions(BuiltinConfig(val_fraction=0.3, split_seed=0, root=str(root)))}
    sft = {e["prompt"] for part in splits.values() for e in part}
    assert held and sft and not held & sft  # no held-out function is an SFT example (train or val)
    assert len(held) + len(sft) == 40  # and every other one is
    # The held-out modules are the ones the data pipeline's split puts in validation (same ids).
    expected = {i for i in range(40) if is_validation(f"stdlib/mod{i}.py", 0.3, 0)}
    assert held == {f"def read_thing_{i}(path):" for i in expected}
    assert splits["val"] and splits["train"]  # SFT keeps its own validation set for checkpoint choice


def test_contamination_index_spans_several_corpora(tmp_path):
    from lmforge.eval.contamination import load_index

    words = [f"w{i}" for i in range(40)]
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": " ".join(words[:20])}) + "\n")
    (tmp_path / "sft.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": " ".join(words[20:])}]}) + "\n"
    )
    index = load_index([tmp_path / "docs.jsonl", tmp_path / "sft.jsonl"], n=5)
    only_docs = load_index(tmp_path / "docs.jsonl", n=5)
    sft_text = " ".join(words[22:35])
    assert index.contains(sft_text) and not only_docs.contains(sft_text)


class PriorBiasedLM:
    """Scores a choice by a prior (shorter is likelier) plus a bonus when the context names it:
    plain accuracy follows the prior, the calibrated score follows the context."""

    def loglikelihood(self, requests):
        out = []
        for ctx, cont in requests:
            bonus = 1.0 if ctx.endswith(cont.strip()[:3]) else 0.0
            out.append((-0.5 * len(cont) + bonus, False))
        return out


def test_acc_mutual_info_removes_the_choices_prior():
    from lmforge.eval.tasks import TaskConfig, primary_metric, run_multiple_choice

    examples = [
        {"id": str(i), "context": f"q{i} {gold[:3]}", "choices": choices, "gold": choices.index(gold)}
        for i, (gold, choices) in enumerate(
            [("longer answer", ["a", "longer answer", "bb"]), ("zzzz", ["zzzz", "y", "xx"])]
        )
    ]
    cfg = TaskConfig("mc", "multiple_choice", unconditional_context="q")
    result = run_multiple_choice(PriorBiasedLM(), cfg, examples)
    assert result.metrics["acc"] == 0.0 and result.metrics["acc_mutual_info"] == 1.0
    assert primary_metric({"type": "multiple_choice", "metrics": result.metrics})[0] == "acc_mutual_info"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from lmforge.train.stdlib_data import builtin_pretrain_data

    return builtin_pretrain_data(tmp_path_factory.mktemp("cache"), max_bytes=150_000, vocab_size=300, val_fraction=0.2)


def _pretrain(out, name, data_dir, *extra):
    argv = [
        "pretrain",
        "--out",
        str(out),
        "--name",
        name,
        "--data",
        str(data_dir),
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--set",
        "train.eval_batches=2",
        "--set",
        "optim.warmup_steps=3",
        *extra,
    ]
    assert cli(argv) == 0
    return [r for r in read_metrics(out / name) if "loss" in r]


def _kl_to_teacher(teacher, student, data_dir) -> float:
    """Mean KL(teacher || student) of next-token distributions on validation windows."""
    from lmforge.checkpoint import load_model
    from lmforge.data.loader import ShardLoader

    x, _ = next(iter(ShardLoader(data_dir, 32, 16, "val", 0, prefetch=0)))
    t, s = load_model(teacher).eval(), load_model(student).eval()
    with torch.no_grad():
        lt, ls = t(x).log_softmax(-1), s(x).log_softmax(-1)
        return float((lt.exp() * (lt - ls)).sum(-1).mean())


def test_a_distilled_draft_is_closer_to_its_teacher(tmp_path, data_dir):
    _pretrain(tmp_path, "teacher", data_dir, "--steps", "60", "--lr", "0.01", "--set", "train.eval_every=0")
    teacher = tmp_path / "teacher" / "final"
    small = [*TINY, "--steps", "25", "--lr", "0.01", "--set", "train.eval_every=0"]
    _pretrain(tmp_path, "plain", data_dir, *small)
    _pretrain(tmp_path, "distilled", data_dir, *small, "--teacher", str(teacher))
    plain = _kl_to_teacher(teacher, tmp_path / "plain" / "final", data_dir)
    distilled = _kl_to_teacher(teacher, tmp_path / "distilled" / "final", data_dir)
    assert distilled < 0.8 * plain, (plain, distilled)


def test_distillation_refuses_a_teacher_of_another_vocabulary(tmp_path, data_dir, capsys):
    from lmforge.checkpoint import save_model
    from lmforge.model import build_model

    save_model(build_model("tiny", vocab_size=301), tmp_path / "other")
    argv = [
        "pretrain",
        "--out",
        str(tmp_path),
        "--data",
        str(data_dir),
        "--steps",
        "1",
        "--teacher",
        str(tmp_path / "other"),
        *TINY,
    ]
    assert cli(argv) == 2
    assert "vocabulary 301" in capsys.readouterr().err


def test_muon_trains_and_resumes_exactly(tmp_path, data_dir):
    common = [
        "--steps",
        "12",
        "--lr",
        "0.01",
        "--set",
        "optim.name=muon",
        "--set",
        "train.save_every=6",
        "--set",
        "train.eval_every=0",
        *TINY,
    ]
    full = _pretrain(tmp_path / "a", "m", data_dir, *common)
    assert full[-1]["loss"] < full[0]["loss"] - 0.5
    _pretrain(tmp_path / "b", "m", data_dir, *common)
    import shutil

    shutil.rmtree(tmp_path / "b" / "m" / "checkpoints" / "step-00000012")
    resumed = _pretrain(tmp_path / "b", "m", data_dir, *common, "--resume")
    by_step = {r["step"]: r["loss"] for r in resumed}
    for r in full:
        assert abs(by_step[r["step"]] - r["loss"]) < 1e-5, (r["step"], by_step[r["step"]], r["loss"])


def test_orthogonalize_flattens_singular_values():
    from lmforge.train.muon import orthogonalize

    torch.manual_seed(0)
    g = torch.randn(64, 24) @ torch.diag(torch.logspace(-1, 1, 24))  # condition number ~100
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.max() < 1.3 and s.min() > 0.5  # quintic NS: singular values land in ~[0.7, 1.2]
    assert torch.linalg.svdvals(orthogonalize(g.T)).allclose(s, atol=1e-4)  # tall and wide alike


def test_the_parts_of_a_document_split_together():
    from lmforge.data.shards import is_validation

    ids = [f"stdlib/pkg/mod{i}.py" for i in range(200)]
    assert all(is_validation(i + "#prose", 0.3) == is_validation(i, 0.3) for i in ids)
    assert 30 < sum(is_validation(i, 0.3) for i in ids) < 90
    numbered = [is_validation(f"wiki#{i}", 0.3) for i in range(200)]  # not a part name: documents of their own
    assert 30 < sum(numbered) < 90


def test_a_student_starts_from_its_teachers_layers():
    from lmforge.model import build_model
    from lmforge.recipes.pretrain import init_from

    torch.manual_seed(0)
    teacher = build_model("tiny", num_hidden_layers=4)
    student = build_model("tiny", num_hidden_layers=2)
    assert init_from(student, teacher) == len(student.state_dict())
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.2.mlp.up_proj.weight"])
    narrow = build_model("tiny", hidden_size=32, num_hidden_layers=1)
    assert init_from(narrow, teacher) == 0  # no shape matches: nothing is copied, nothing breaks


def test_continuations_are_the_teachers_greedy_output_after_a_window_prefix():
    from lmforge.infer.generate import generate
    from lmforge.model import build_model
    from lmforge.recipes.pretrain import DistillConfig, continuation_pool, with_continuations

    torch.manual_seed(0)
    teacher = build_model("tiny").eval()
    data = torch.randint(5, 200, (6, 17))
    batches = iter([(data[:3, :-1], data[:3, 1:]), (data[3:, :-1], data[3:, 1:])] * 4)
    distill = DistillConfig(continuation_pool=5, continuation_prefix=4)
    pool = continuation_pool(teacher, batches, distill, seq_len=16, seed=0, device="cpu", generate_batch=4)
    assert pool.shape == (5, 17)
    for row in pool:  # some prefix of a window, then exactly what the teacher decodes greedily from it
        n = next(
            n
            for n in range(1, 5)
            if any(torch.equal(row[:n], w[:n]) for w in data)
            and torch.equal(row[n:], generate(teacher, row[:n].tolist(), max_new_tokens=17 - n)[0])
        )
        assert 1 <= n <= 4
    batch = torch.zeros(4, 17, dtype=torch.long)
    mixed = with_continuations(batch, pool, 0.5, torch.Generator().manual_seed(0))
    assert all(any(torch.equal(r, q) for q in pool) for r in mixed[:2]) and not mixed[2:].any()
    assert torch.equal(with_continuations(batch, pool, 0.0, None), batch)


def test_continuations_need_a_teacher(tmp_path, data_dir, capsys):
    argv = [
        "pretrain",
        "--runs-dir",
        str(tmp_path),
        "--data",
        str(data_dir),
        "--steps",
        "1",
        *TINY,
        "--set",
        "distill.continuation_fraction=0.5",
    ]
    assert cli(argv) == 2
    assert "needs distill.teacher" in capsys.readouterr().err


def test_a_generation_task_passes_its_repetition_penalty_on():
    from lmforge.eval.tasks import TaskConfig, run_generation

    class Recorder:
        def __init__(self):
            self.kwargs = []

        def generate(self, prompts, **kwargs):
            self.kwargs.append(kwargs)
            return ["an answer." for _ in prompts]

    lm, examples = Recorder(), [{"id": "0", "prompt": "q", "answers": ["an answer."]}]
    run_generation(lm, TaskConfig("g", "generation"), examples)
    run_generation(lm, TaskConfig("g", "generation", repetition_penalty=1.2), examples)
    assert "repetition_penalty" not in lm.kwargs[0] and lm.kwargs[1]["repetition_penalty"] == 1.2
