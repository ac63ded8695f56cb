"""Medusa heads: tree verification gives plain greedy's tokens; trained heads get accepted; the
train-medusa command writes a loadable heads folder."""

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.infer.generate import generate
from lmforge.infer.medusa import MedusaHeads, build_tree, load_medusa, medusa_generate, medusa_loss
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig, Transformer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", initializer_range=0.2)).eval().requires_grad_(False)


def test_tree_is_breadth_first():
    parent, depth, rank = build_tree((2, 2))
    assert parent == [-1, 0, 0, 1, 1, 2, 2] and depth == [0, 1, 1, 2, 2, 2, 2] and rank == [0, 0, 1, 0, 1, 0, 1]


def test_untrained_heads_still_give_greedy_tokens(model):
    prompt = torch.randint(0, 512, (15,), generator=torch.Generator().manual_seed(2)).tolist()
    out, stats = medusa_generate(model, MedusaHeads(64, 3), prompt, SamplingParams(max_new_tokens=20))
    assert out == generate(model, prompt, max_new_tokens=20)[0].tolist()
    with pytest.raises(LmforgeError, match="greedy only"):
        medusa_generate(model, MedusaHeads(64, 3), prompt, SamplingParams(temperature=1.0))


def test_trained_heads_are_accepted_and_output_unchanged(model):
    """Heads trained on the model's own greedy continuations: several tokens per forward."""
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, 512, (32, 6), generator=g)
    data = torch.cat([prompts, generate(model, prompts, max_new_tokens=40)], dim=1)
    torch.manual_seed(0)
    heads = MedusaHeads(64, 3)
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-2)
    for _ in range(60):
        loss, accs = medusa_loss(model, heads, data[torch.randint(0, 32, (16,), generator=g)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    heads.eval()
    prompt = data[0, :6].tolist()
    out, stats = medusa_generate(model, heads, prompt, SamplingParams(max_new_tokens=30))
    assert out == generate(model, prompt, max_new_tokens=30)[0].tolist()
    assert stats.accepted > 0 and stats.tokens_per_step > 1.25, stats.as_dict()


def test_train_medusa_command(tmp_path, model):
    from lmforge.checkpoint import save_model
    from lmforge.cli import main
    from lmforge.tokenizer import train_tokenizer

    text = "def add(a, b):\n    return a + b\n" * 40
    tok = train_tokenizer([text], vocab_size=300)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size)
    save_model(Transformer(cfg), tmp_path / "base", tokenizer=tok)
    (tmp_path / "data.txt").write_text(text)
    rc = main(
        [
            "train-medusa",
            "--model",
            str(tmp_path / "base"),
            "--out",
            str(tmp_path / "heads"),
            "--data",
            str(tmp_path / "data.txt"),
            "--steps",
            "3",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--heads",
            "2",
        ]
    )
    assert rc == 0
    heads = load_medusa(tmp_path / "heads")
    assert heads.num_heads == 2
    assert (
        main(
            [
                "train-medusa",
                "--model",
                str(tmp_path / "base"),
                "--out",
                str(tmp_path / "h2"),
                "--data",
                str(tmp_path / "missing.txt"),
            ]
        )
        == 2
    )
