"""The one single-sequence decode driver (lmforge.infer.decode): every mode takes the same sampling
options or refuses them, and `generate --image` honours --seed, --repetition-penalty, --stop and
--stream (it ignored them)."""

import sys

import numpy as np
import pytest
import torch
from vlm_utils import save_tiny_vlm

from lmforge.common import LmforgeError
from lmforge.infer.decode import decode, decode_ids
from lmforge.infer.generate import generate
from lmforge.infer.medusa import MedusaHeads, MedusaProposer
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import DraftProposer, LookupProposer, speculative_generate
from lmforge.infer.streaming import AttentionSinks, stream_generate_sinks
from lmforge.model import ModelConfig, Transformer
from lmforge.multimodal import image_question, prepare_chat
from lmforge.tokenizer import train_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", initializer_range=0.2)).eval().requires_grad_(False)


PROMPT = [5, 9, 11, 3, 5, 9, 11, 40, 41, 5, 9]


def _embeds(model, ids):
    return model.model.embed_tokens(torch.tensor([ids]))


def test_embeddings_in_give_the_same_tokens_as_ids_in_every_cache(model):
    params = SamplingParams(max_new_tokens=12, repetition_penalty=1.3)
    for sinks in (None, AttentionSinks(4, 10, chunk=3)):  # the sink window is smaller than the sequence
        by_ids = decode_ids(model, params, PROMPT, sinks=sinks)
        by_embeds = decode_ids(model, params, PROMPT, inputs_embeds=_embeds(model, PROMPT), sinks=sinks)
        assert by_ids == by_embeds and len(by_ids[0]) == 12


def test_sinks_honour_repetition_penalty_and_stop_ids(model):
    """The attention-sink loop sampled without the penalty; it now goes through the one driver."""
    plain = generate(model, PROMPT, max_new_tokens=15, repetition_penalty=2.0)[0].tolist()
    assert plain != generate(model, PROMPT, max_new_tokens=15)[0].tolist()
    sinks = list(
        stream_generate_sinks(
            model, PROMPT, SamplingParams(max_new_tokens=15, repetition_penalty=2.0), sinks=4, window=60
        )
    )
    assert sinks == plain
    stop = plain[6]
    cut = list(
        stream_generate_sinks(
            model, PROMPT, SamplingParams(max_new_tokens=15, stop_token_ids=[stop]), sinks=4, window=60
        )
    )
    reference = generate(model, PROMPT, max_new_tokens=15)[0].tolist()
    assert cut == reference[: reference.index(stop) + 1] if stop in reference else cut == reference


@pytest.mark.parametrize("kind", ["lookup", "draft", "medusa"])
def test_every_proposer_stops_at_stop_ids_and_matches_plain_greedy(model, kind):
    reference = generate(model, PROMPT, max_new_tokens=20)[0].tolist()
    stop = reference[7]
    cut = reference[: reference.index(stop) + 1]
    make = {
        "lookup": lambda: LookupProposer(2),
        "draft": lambda: DraftProposer(model, 64),
        "medusa": lambda: MedusaProposer(model, MedusaHeads(64, 3)),
    }[kind]
    full, _ = speculative_generate(model, PROMPT, SamplingParams(max_new_tokens=20), make(), k=3)
    assert full == reference
    out, stats = speculative_generate(
        model, PROMPT, SamplingParams(max_new_tokens=20), make(), k=3, eos_token_ids=[stop]
    )
    assert out == cut and stats.new_tokens == len(cut)


def test_options_a_mode_cannot_honour_are_errors(model):
    greedy, sampled = SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=4, temperature=1.0)
    cases = [
        (dict(params=SamplingParams(repetition_penalty=1.2), proposer=LookupProposer()), "repetition_penalty"),
        (dict(params=greedy, proposer=LookupProposer(), inputs_embeds=_embeds(model, PROMPT)), "inputs_embeds"),
        (dict(params=greedy, proposer=LookupProposer(), decode_fn=model), "compiled"),
        (dict(params=greedy, proposer=LookupProposer(), sinks=AttentionSinks()), "attention sinks"),
        (dict(params=greedy, proposer=LookupProposer(), return_logits=True), "logits"),
        (dict(params=sampled, proposer=MedusaProposer(model, MedusaHeads(64, 2))), "greedy only"),
        (dict(params=greedy, proposer=LookupProposer(), k=0), "k must be"),
    ]
    for kwargs, match in cases:
        with pytest.raises(LmforgeError, match=match):
            list(decode(model, input_ids=PROMPT, **kwargs))
    with pytest.raises(LmforgeError, match="batch"):
        decode(model, greedy, [[1, 2, 3], [4, 5]], sinks=AttentionSinks())
    with pytest.raises(LmforgeError, match="input_ids or inputs_embeds"):
        decode(model, greedy)


def test_seeded_sampling_repeats_in_every_mode(model):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=7)
    for options in (dict(), dict(sinks=AttentionSinks(4, 12)), dict(proposer=DraftProposer(model, 64))):
        runs = [decode_ids(model, params, PROMPT, **options)[0] for _ in range(2)]
        assert runs[0] == runs[1]
        other = decode_ids(
            model, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=8), PROMPT, **options
        )[0]
        assert other != runs[0]


def test_left_padded_embedding_batch_decodes_each_row_as_alone(model):
    rows = [PROMPT, PROMPT[3:]]
    params = SamplingParams(max_new_tokens=6)
    ids = torch.zeros(2, len(PROMPT), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, len(PROMPT) - len(r) :], mask[b, len(PROMPT) - len(r) :] = torch.tensor(r), 1
    batch = decode_ids(model, params, ids, inputs_embeds=model.model.embed_tokens(ids), attention_mask=mask)
    assert batch == [decode_ids(model, params, r)[0] for r in rows]


# ----------------------------------------------------------------------------- generate --image


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    out = save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-vlm")
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(out / "img.png")
    return out


class _Writes:
    """sys.stdout that remembers each write, to see text arrive piece by piece."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return len(s)

    def flush(self) -> None:
        pass


def _image(vlm_dir, monkeypatch, *flags: str) -> tuple[str, list[str]]:
    from lmforge.cli import main

    return _cli(
        main,
        monkeypatch,
        [
            "generate",
            "--model",
            str(vlm_dir),
            "--image",
            str(vlm_dir / "img.png"),
            "--prompt",
            "what colour is the circle?",
            "--max-new-tokens",
            "12",
            *flags,
        ],
    )


def _reference(vlm_dir, params: SamplingParams) -> list[int]:
    from lmforge.multimodal import load_multimodal
    from lmforge.tokenizer import load_tokenizer

    vlm, tok = load_multimodal(vlm_dir, kind="vlm"), load_tokenizer(vlm_dir)
    inputs = prepare_chat(vlm, tok, image_question(str(vlm_dir / "img.png"), "what colour is the circle?"))
    return decode_ids(vlm, params, inputs["input_ids"], inputs_embeds=inputs["inputs_embeds"])[0]


def test_generate_image_honours_seed(vlm_dir, monkeypatch):
    sampled = ("--temperature", "1.5")
    a, _ = _image(vlm_dir, monkeypatch, *sampled, "--seed", "3")
    b, _ = _image(vlm_dir, monkeypatch, *sampled, "--seed", "3")
    c, _ = _image(vlm_dir, monkeypatch, *sampled, "--seed", "4")
    assert a == b and a != c


def test_generate_image_honours_repetition_penalty(vlm_dir, monkeypatch):
    plain, _ = _image(vlm_dir, monkeypatch)
    penalised, _ = _image(vlm_dir, monkeypatch, "--repetition-penalty", "3.0")
    assert penalised != plain
    ids = _reference(vlm_dir, SamplingParams(max_new_tokens=12, repetition_penalty=3.0))
    assert len(set(ids)) > len(set(_reference(vlm_dir, SamplingParams(max_new_tokens=12))))


def test_generate_image_honours_stop_and_stream(vlm_dir, monkeypatch):
    full, _ = _image(vlm_dir, monkeypatch)
    text = full.rstrip("\n")
    assert len(text) > 4
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut, _ = _image(vlm_dir, monkeypatch, "--stop", stop)
    assert cut.rstrip("\n") == text[: text.index(stop)]
    streamed, writes = _image(vlm_dir, monkeypatch, "--stream")
    assert streamed == full
    # Printed as it came (several pieces, then the newline), not as one text and a newline at the end.
    assert len([w for w in writes if w]) > 2, writes


# ----------------------------------------------------------------------------- generate --lookup/--draft/--medusa


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from lmforge.checkpoint import save_model
    from lmforge.infer.medusa import save_medusa

    root = tmp_path_factory.mktemp("spec_cli")
    tok = train_tokenizer(["the cat sat on the mat. " * 30, "def add(a, b):\n    return a + b\n" * 30], vocab_size=300)
    torch.manual_seed(0)
    save_model(
        Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, initializer_range=0.2)),
        root / "model",
        tokenizer=tok,
    )
    save_medusa(MedusaHeads(64, 2), root / "medusa")
    return root


@pytest.mark.parametrize("flags", [["--lookup"], ["--medusa", "medusa"]])
def test_speculative_text_takes_stop_stream_and_chat_like_plain(lm_dir, monkeypatch, capsys, flags):
    """A proposer changes how fast, not what: --stop, --stream and --chat gave the raw decode of the
    whole output (or were dropped) with --lookup/--draft/--medusa."""
    from lmforge.cli import main

    flags = [str(lm_dir / f) if f == "medusa" else f for f in flags]
    base = ["generate", "--model", str(lm_dir / "model"), "--prompt", "the cat sat", "--max-new-tokens", "16"]
    plain, _ = _cli(main, monkeypatch, base)
    text = plain.rstrip("\n")
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    for extra in ([], ["--stop", stop], ["--stream"], ["--chat"]):
        want, _ = _cli(main, monkeypatch, base + extra)
        got, writes = _cli(main, monkeypatch, base + extra + flags)
        assert got == want
        if extra == ["--stream"]:
            assert len([w for w in writes if w]) > 2, writes
    assert text[: text.index(stop)] == _cli(main, monkeypatch, base + ["--stop", stop] + flags)[0].rstrip("\n")
    capsys.readouterr()
    assert main(base + flags + ["--compile"]) == 2
    assert "compiled decode step" in capsys.readouterr().err


def _cli(main, monkeypatch, argv: list[str]) -> tuple[str, list[str]]:
    out = _Writes()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(argv) == 0
    monkeypatch.undo()
    return "".join(out.writes), out.writes
