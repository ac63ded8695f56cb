"""SFT: loss only on assistant tokens, packing never lets examples see each other, the built-in
signature -> docstring set, and `lmforge sft` runs full and with a PEFT method."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main as cli
from lmforge.model import ModelConfig, Transformer
from lmforge.recipes._common import read_metrics
from lmforge.train import IGNORE
from lmforge.train.sft_data import PackedBatches, encode_example, pack, record_to_messages
from lmforge.train.stdlib_data import function_examples


@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.tokenizer import train_tokenizer

    texts = ["hello world, how are you today? I am fine thank you."] * 20 + ["def add(a, b): return a + b"] * 20
    return train_tokenizer(texts, vocab_size=300)


def test_labels_only_on_assistant_tokens(tokenizer):
    messages = record_to_messages({"prompt": "hello world", "response": "I am fine"}, "x")
    ids, labels = encode_example(tokenizer, messages, max_len=512)
    full, mask = tokenizer.render_chat(messages)
    assert ids == full[:-1]
    target = [t for t, lab in zip(full[1:], labels) if lab != IGNORE]
    # exactly the assistant's text and its end-of-turn token, nothing of the prompt or template
    assert tokenizer.decode(target, skip_special_tokens=False) == "I am fine<|im_end|>"
    assert all(lab == IGNORE for lab, m in zip(labels, mask[1:]) if not m)


def test_packing_segments_do_not_attend_across(tokenizer):
    a = encode_example(tokenizer, record_to_messages({"prompt": "hello", "response": "world"}, "a"), 64)
    b = encode_example(tokenizer, record_to_messages({"prompt": "how are you", "response": "fine"}, "b"), 64)
    rows = pack([a, b], seq_len=len(a[0]) + len(b[0]) + 3, pad_id=tokenizer.pad_id)
    assert len(rows) == 1
    row = rows[0]
    assert row.segment_ids == [1] * len(a[0]) + [2] * len(b[0]) + [0] * 3
    assert row.labels[-3:] == [IGNORE] * 3
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    packed = model(torch.tensor([row.input_ids]), segment_ids=torch.tensor([row.segment_ids]))
    alone = model(torch.tensor([b[0]]))
    torch.testing.assert_close(packed[0, len(a[0]) : len(a[0]) + len(b[0])], alone[0], atol=1e-5, rtol=1e-5)


def test_packed_batches_resume_and_ranks(tokenizer):
    ex = encode_example(tokenizer, record_to_messages({"prompt": "hi", "response": "you"}, "a"), 64)
    rows = pack([ex] * 40, seq_len=len(ex[0]), pad_id=0)
    one = PackedBatches(rows, 2, seed=3)
    first = [next(one)["input_ids"] for _ in range(3)]
    again = PackedBatches(rows, 2, seed=3)
    next(again)
    again2 = PackedBatches(rows, 2, seed=3)
    again2.load_state_dict(again.state_dict())
    assert torch.equal(next(again2)["input_ids"], first[1])


def test_builtin_signature_docstring_examples():
    src = '''
def area(width: float, height: float = 1.0) -> float:
    """Return the area of a rectangle. Width and height are in metres."""
    return width * height

def _private(x):
    """Hidden helper function."""

async def fetch(url, *, timeout=3):
    """Fetch a URL and return its body!

    More text."""
'''
    ex = function_examples(src)
    assert ex == [
        {
            "prompt": "def area(width: float, height: float=1.0) -> float:",
            "response": "Return the area of a rectangle.",
        },
        {"prompt": "async def fetch(url, *, timeout=3):", "response": "Fetch a URL and return its body!"},
    ]
    assert function_examples('def f():\n    """Short."""\n') == []  # too short to be a useful target


def test_bad_jsonl_line_is_named(tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"text": "no answer"}\n')
    assert cli(["sft", "--data", str(bad), "--out", str(tmp_path), "--set", "data.cache_dir=" + str(tmp_path)]) == 2
    assert f"{bad}:2: expected 'messages'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory, tokenizer):
    from lmforge.checkpoint import save_model

    root = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    base = Transformer(
        ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64)
    )
    save_model(base, root / "base", tokenizer=tokenizer)
    data = root / "train.jsonl"
    pairs = [("add two numbers", "def add(a, b): return a + b"), ("greet", "print('hello')")]
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}) + "\n"
            for p, r in pairs * 16
        )
    )
    return root / "base", data


@pytest.mark.parametrize("method,lr,drop", [("full", "0.01", 1.0), ("lora", "0.05", 0.2)])
def test_sft_cli_loss_falls(tmp_path, base_and_data, method, lr, drop):
    base, data = base_and_data
    argv = [
        "sft",
        "--model",
        str(base),
        "--data",
        str(data),
        "--val-data",
        str(data),
        "--out",
        str(tmp_path),
        "--name",
        "r",
        "--steps",
        "30",
        "--seq-len",
        "64",
        "--batch-size",
        "4",
        "--method",
        method,
        "--lr",
        lr,
        "--set",
        "train.eval_every=30",
        "--set",
        "train.save_every=0",
        "--set",
        "peft.options={target_modules: [q, k, v, o, gate, up, down]}" if method == "lora" else "train.seed=0",
    ]
    assert cli(argv) == 0
    rows = [r for r in read_metrics(tmp_path / "r") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - drop, (rows[0]["loss"], rows[-1]["loss"])
    if method == "lora":
        assert (tmp_path / "r" / "adapter").is_dir()
    from lmforge.checkpoint import load_model

    load_model(tmp_path / "r" / "final")  # the manifest replays the adapter


@pytest.mark.parametrize("extra", [["--method", "qlora"], ["--method", "prompt"], ["--qat", "int4-g32"]])
def test_sft_other_methods_run_and_reload(tmp_path, base_and_data, extra):
    from lmforge.checkpoint import load_model

    base, data = base_and_data
    argv = [
        "sft",
        "--model",
        str(base),
        "--data",
        str(data),
        "--out",
        str(tmp_path),
        "--name",
        "r",
        "--steps",
        "2",
        "--seq-len",
        "64",
        "--batch-size",
        "4",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.save_every=0",
        *extra,
    ]
    assert cli(argv) == 0
    rows = [r for r in read_metrics(tmp_path / "r") if "loss" in r]
    assert len(rows) == 2 and all(r["skip_reason"] is None for r in rows)
    if extra[0] == "--method":
        load_model(tmp_path / "r" / "final")
