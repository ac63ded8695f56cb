"""`lmforge generate` engine options: --prompts/--out batch mode, --draft, --lookup, --medusa."""

import json

import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.cli import main
from lmforge.infer.generate import generate
from lmforge.infer.medusa import MedusaHeads, save_medusa
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import train_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_cli")
    tok = train_tokenizer(["def add(a, b):\n    return a + b\n" * 30, "the cat sat on the mat. " * 30], vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, initializer_range=0.2))
    save_model(model, root / "model", tokenizer=tok)
    save_medusa(MedusaHeads(64, 2), root / "medusa")
    torch.manual_seed(1)
    small = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, num_hidden_layers=1, initializer_range=0.2)
    save_model(Transformer(small), root / "draft", tokenizer=tok)
    other = train_tokenizer(["a completely different corpus of words " * 30], vocab_size=tok.vocab_size)
    save_model(Transformer(small), root / "other-tokenizer", tokenizer=other)
    save_model(Transformer(ModelConfig.preset("tiny", vocab_size=256, num_hidden_layers=1)), root / "other-vocab")
    return root, model.eval(), tok


def test_prompts_file_runs_through_the_engine(folder, capsys):
    root, model, tok = folder
    rows = [
        {"id": "a", "prompt": "def add"},
        {"prompt_ids": [5, 6, 7], "max_new_tokens": 3},
        {"prompt": "the cat", "max_new_tokens": 4},
    ]
    (root / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert (
        main(
            [
                "generate",
                "--model",
                str(root / "model"),
                "--prompts",
                str(root / "in.jsonl"),
                "--out",
                str(root / "out.jsonl"),
                "--max-new-tokens",
                "6",
            ]
        )
        == 0
    )
    out = [json.loads(line) for line in (root / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == ["a", 1, 2]
    assert [o["completion_tokens"] for o in out] == [6, 3, 4]
    assert out[0]["completion_ids"] == generate(model, tok.encode("def add"), max_new_tokens=6)[0].tolist()
    assert out[1]["completion_ids"] == generate(model, [5, 6, 7], max_new_tokens=3)[0].tolist()
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["requests"] == 3


@pytest.mark.parametrize("flags", [["--lookup"], ["--draft", "model"], ["--medusa", "medusa"]])
def test_speculative_flags_give_plain_greedy_tokens(folder, capsys, flags):
    root, model, _ = folder
    flags = [f if f not in ("model", "medusa") else str(root / f) for f in flags]
    assert (
        main(["generate", "--model", str(root / "model"), "--prompt-ids", "5,6,7,5,6", "--max-new-tokens", "8", *flags])
        == 0
    )
    out, err = capsys.readouterr()
    expected = generate(model, [5, 6, 7, 5, 6], max_new_tokens=8)[0].tolist()
    assert out.strip() == ",".join(map(str, expected))
    assert json.loads(err.strip().splitlines()[-1])["new_tokens"] == 8


@pytest.mark.parametrize("draft", ["draft", "model", "lookup"])
def test_prompts_file_with_a_draft_gives_the_same_completions(folder, capsys, draft):
    root, model, tok = folder
    rows = [{"prompt": "def add"}, {"prompt": "the cat", "max_new_tokens": 9}, {"prompt_ids": [5, 6, 7, 5, 6]}]
    (root / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = ["generate", "--model", str(root / "model"), "--prompts", str(root / "in.jsonl"), "--max-new-tokens", "12"]
    assert main(base + ["--out", str(root / "plain.jsonl")]) == 0
    flags = ["--lookup"] if draft == "lookup" else ["--draft", str(root / draft)]
    assert main(base + ["--out", str(root / "spec.jsonl"), "--spec-k", "3", *flags]) == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["drafted_tokens"] > 0 and (summary["acceptance_rate"] == 1.0) == (draft == "model")
    spec = [json.loads(line) for line in (root / "spec.jsonl").read_text().splitlines()]
    steps = [row.pop("speculative")["steps"] for row in spec]  # lookup drafts only where an n-gram repeats
    assert all(steps) if draft != "lookup" else any(steps)
    assert spec == [json.loads(line) for line in (root / "plain.jsonl").read_text().splitlines()]


def test_bad_inputs_exit_2_with_a_message(folder, capsys):
    root, _, _ = folder
    (root / "bad.jsonl").write_text('{"prompt": "x"}\n{"text": "no prompt"}\n')
    base = ["generate", "--model", str(root / "model")]
    assert main(base + ["--prompts", str(root / "bad.jsonl"), "--out", str(root / "o.jsonl")]) == 2
    assert "bad.jsonl:2: needs a 'prompt'" in capsys.readouterr().err
    assert not (root / "o.jsonl").exists()
    assert main(base + ["--prompts", str(root / "bad.jsonl")]) == 2
    assert "--prompts needs --out" in capsys.readouterr().err
    assert main(base + ["--prompt", "x", "--lookup", "--medusa", str(root / "medusa")]) == 2
    assert "choose one of" in capsys.readouterr().err
    assert main(base + ["--prompt", "x", "--medusa", str(root)]) == 2
    assert "not a Medusa heads folder" in capsys.readouterr().err
    (root / "one.jsonl").write_text('{"prompt": "x"}\n')
    for other in ("other-tokenizer", "other-vocab"):
        assert (
            main(
                base
                + ["--prompts", str(root / "one.jsonl"), "--out", str(root / "o.jsonl"), "--draft", str(root / other)]
            )
            == 2
        )
        assert "the draft needs the same tokenizer" in capsys.readouterr().err
