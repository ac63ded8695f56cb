"""SentencePiece ("llama") vocabularies in GGUF (lmforge.gguf_io.spm): a small SentencePiece-style BPE
vocabulary (<unk>, <s>, </s>, the 256 <0xNN> byte tokens, scored pieces with "▁" for spaces, one
user-defined token), written with GGUFWriter's tokenizer keys as llama.cpp's convert_hf_to_gguf.py
writes a llama vocabulary, then imported by lmforge: token ids equal transformers' own GGUF loader's,
a whole tiny model imports with `lmforge convert --from-gguf` and generates, the export writes the
vocabulary back as "llama", and bad metadata is refused naming the key.
Parity with llama.cpp's tokenizer itself: tests/test_gguf_llamacpp.py (slow)."""

import inspect
import json
import textwrap

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_model, load_tokenizer_if_any
from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.model import ModelConfig, Transformer

gguf = pytest.importorskip("gguf")
from test_gguf import CONFIGS, SHAPE  # noqa: E402  (the tiny llama shape)

from lmforge.gguf_io import read_gguf, save_gguf  # noqa: E402
from lmforge.gguf_io.vocab import tokenizer_from_metadata  # noqa: E402

USER = "<|user|>"  # a USER_DEFINED token: matched whole, not special
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
TEXTS = [
    "Hello world, this is a test.",
    "def wrap(text, width=70):\n\treturn [line for line in text]\n",
    " leading space",
    "  two leading spaces and  doubled  inside ",
    "tabs\tand\nnewlines\n\n\nend",
    "中文文本不在词表里",  # Chinese: falls back to <0xNN> bytes
    "emoji 🙂🚀 mixed with text",
    "special <s> inside </s> text and <unk>",
    f"{USER} asks: what?",
    "",
    "\n",
    "x",
]


def _corpus() -> list[str]:
    text = "\n".join(inspect.getsource(m) for m in (textwrap, json.decoder))
    return [text[i : i + 1000] for i in range(0, len(text), 1000)]


@pytest.fixture(scope="module")
def vocab() -> dict:
    return make_vocab()


def make_vocab() -> dict:
    """tokens / scores / token types of a SentencePiece-style vocabulary, trained here."""
    from tokenizers import SentencePieceBPETokenizer

    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(_corpus(), vocab_size=700, min_frequency=2, show_progress=False)
    pieces = sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])
    head = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens = head + [t for t, _ in pieces if t not in head] + [USER]
    # As SentencePiece scores BPE pieces: later pieces (later merges) score lower.
    scores = [0.0] * len(head) + [-float(i) for i in range(len(tokens) - len(head) - 1)] + [0.0]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - len(head) - 1) + [4]
    return {"tokens": tokens, "scores": scores, "types": types}


def write_spm_gguf(path, vocab: dict, model: Transformer | None = None, **overrides) -> None:
    """A GGUF with a "llama" vocabulary, keyed as convert_hf_to_gguf.py writes one (`overrides`
    replace a key's value, None drops it); `model` adds its tensors and hyperparameters."""
    import tempfile

    keys = {
        "tokenizer.ggml.tokens": vocab["tokens"],
        "tokenizer.ggml.scores": vocab["scores"],
        "tokenizer.ggml.token_type": vocab["types"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.chat_template": TEMPLATE,
    }
    keys.update(overrides)
    vt = gguf.GGUFValueType
    writer = gguf.GGUFWriter(str(path), "llama")
    if model is not None:  # the architecture keys and tensors as lmforge writes them, tokenizer-less
        with tempfile.TemporaryDirectory() as tmp:
            reader = gguf.GGUFReader(str(save_gguf(model, f"{tmp}/m.gguf")))
            for key, field in reader.fields.items():
                if key.startswith(("GGUF.", "tokenizer.")) or key in ("general.architecture", "lmforge.config"):
                    continue
                sub = field.types[-1] if field.types[0] == vt.ARRAY else None
                writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
            for t in reader.tensors:
                shape = list(reversed(t.shape.tolist()))
                writer.add_tensor(t.name, np.array(t.data), raw_shape=shape, raw_dtype=t.tensor_type)
            _write(writer, keys)
    else:
        _write(writer, keys)


def _write(writer, keys: dict) -> None:
    writer.add_tokenizer_model("llama")
    typed = {
        "tokenizer.ggml.tokens": writer.add_token_list,
        "tokenizer.ggml.scores": writer.add_token_scores,
        "tokenizer.ggml.token_type": writer.add_token_types,
        "tokenizer.ggml.bos_token_id": writer.add_bos_token_id,
        "tokenizer.ggml.eos_token_id": writer.add_eos_token_id,
        "tokenizer.ggml.unknown_token_id": writer.add_unk_token_id,
        "tokenizer.ggml.padding_token_id": writer.add_pad_token_id,
        "tokenizer.ggml.add_bos_token": writer.add_add_bos_token,
        "tokenizer.ggml.add_eos_token": writer.add_add_eos_token,
        "tokenizer.ggml.add_space_prefix": writer.add_add_space_prefix,
        "tokenizer.chat_template": writer.add_chat_template,
    }
    for key, value in keys.items():
        if value is not None:
            typed[key](value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def spm_file(vocab, tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "vocab.gguf"
    write_spm_gguf(path, vocab)
    return path


@pytest.fixture(scope="module")
def imported(spm_file):
    return load_tokenizer_if_any(spm_file)


def _after_special(text: str) -> bool:
    return any(t in text for t in ("<s>", "</s>", "<unk>", USER))


def test_encodes_like_transformers_gguf_loader(spm_file, imported):
    """Token ids equal transformers' GGUF loader's, except where transformers 5 departs from
    SentencePiece and llama.cpp: its Metaspace(prepend_scheme="first") adds no prefix "▁" to a text
    that already starts with a space (so lmforge's ids for " x" are transformers' for "  x") and none
    after a special token (those texts are checked against llama.cpp in test_gguf_llamacpp.py)."""
    transformers = pytest.importorskip("transformers")
    try:
        theirs = transformers.AutoTokenizer.from_pretrained(str(spm_file.parent), gguf_file=spm_file.name)
    except Exception as e:  # noqa: BLE001  (any loader failure: a version without GGUF tokenizers)
        pytest.skip(f"transformers cannot load a llama GGUF vocabulary here: {e}")
    compared = 0
    for text in TEXTS:
        ours = imported.encode(text)
        assert imported.decode(ours, skip_special_tokens=False) == theirs.decode(ours, skip_special_tokens=False)
        if _after_special(text):
            continue
        spelled = " " + text if text.startswith(" ") else text
        assert ours == theirs.encode(spelled, add_special_tokens=False), text
        compared += 1
    assert compared >= 9
    assert theirs.encode("hi")[0] == imported.bos_id  # both read add_bos_token; transformers applies it


def test_import_details(imported, vocab):
    tok = imported
    assert tok.vocab_size == len(vocab["tokens"])
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    assert tok.extra_config == {"add_bos_token": True, "add_eos_token": False, "unk_token": "<unk>"}
    assert tok.encode("hi", add_bos=True)[0] == 1 and tok.encode("hi")[0] != 1  # BOS only when asked
    for text in TEXTS:  # decoding restores the text, spaces and bytes included
        decoded = tok.decode(tok.encode(text), skip_special_tokens=False)
        # Text after a special token got its own prefix space, which stays (as in llama.cpp).
        assert decoded == (text.replace("> ", ">  ") if _after_special(text) else text), text
    ids = tok.encode("中")
    assert [tok.id_to_token(i) for i in ids] == ["▁", "<0xE4>", "<0xB8>", "<0xAD>"]
    ids = tok.encode("special <s> inside")
    assert 1 in ids and tok.decode(ids) == tok.decode([i for i in ids if i != 1])  # specials skipped by default
    assert tok.encode(USER) == [tok.token_to_id(USER)]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat == "<s>[INST] hi [/INST]"
    assert tok.encode(chat)[0] == tok.bos_id
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def wrap(x)"}]
    ids, mask = tok.render_chat(turns)  # SFT: the loss mask covers the reply and its </s>
    assert ids == tok.encode(tok.apply_chat_template(turns))
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "def wrap(x)</s>"


def test_merges_follow_scores(vocab, tmp_path):
    """Reversing the scores of the pieces changes which pairs join first: the import follows them."""
    flipped = dict(vocab, scores=[-s for s in vocab["scores"]])
    write_spm_gguf(tmp_path / "f.gguf", flipped)
    text = TEXTS[0] + TEXTS[1]
    theirs = load_tokenizer_if_any(tmp_path / "f.gguf")
    ours = load_tokenizer_if_any(_plain_copy(vocab, tmp_path))
    assert theirs.encode(text) != ours.encode(text)
    assert theirs.decode(theirs.encode(text)) == text


def _plain_copy(vocab, tmp_path):
    write_spm_gguf(tmp_path / "p.gguf", vocab)
    return tmp_path / "p.gguf"


def test_no_space_prefix(vocab, tmp_path):
    write_spm_gguf(tmp_path / "n.gguf", vocab, **{"tokenizer.ggml.add_space_prefix": False})
    tok = load_tokenizer_if_any(tmp_path / "n.gguf")
    with_prefix = load_tokenizer_if_any(_plain_copy(vocab, tmp_path))
    assert tok.id_to_token(tok.encode("the")[0]) != "▁the"
    assert tok.encode(" the") == with_prefix.encode("the")
    assert tok.decode(tok.encode(" the x")) == " the x"


def tiny_llama(n_vocab: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**SHAPE, **CONFIGS["llama"], "vocab_size": n_vocab})).eval()


def test_whole_model_imports_with_the_cli_and_generates(vocab, tmp_path, capsys):
    model = tiny_llama(len(vocab["tokens"]) + 4)  # embedding rows past the vocabulary, as real files pad
    tokens = vocab["tokens"] + [f"[PAD{i}]" for i in range(len(vocab["tokens"]), model.config.vocab_size)]
    padded = dict(tokens=tokens, scores=vocab["scores"] + [0.0] * 4, types=vocab["types"] + [5] * 4)
    write_spm_gguf(tmp_path / "m.gguf", padded, model)
    assert main(["convert", "--from-gguf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "hf")]) == 0
    back = load_model(tmp_path / "hf")
    x = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
    tok = load_tokenizer_if_any(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["unk_token"] == "<unk>" and config["bos_token"] == "<s>"
    assert tok.encode(TEXTS[1]) == load_tokenizer_if_any(tmp_path / "m.gguf").encode(TEXTS[1])
    capsys.readouterr()
    argv = ["generate", "--model", str(tmp_path / "hf"), "--prompt", "def wrap(", "--max-new-tokens", "5"]
    assert main([*argv, "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("tied", [1, 7])
def test_export_round_trip(vocab, tmp_path, tied):
    """An imported SentencePiece vocabulary exports as "llama" again: same tokens, types, flags and
    merge order, so a reader without lmforge's tokenizer.huggingface.json tokenizes the same; also
    when pieces share scores (`tied` pieces per score), where ties decide the merge order."""
    vocab = dict(vocab, scores=[float(s // tied) for s in vocab["scores"]])
    model = tiny_llama(len(vocab["tokens"]))
    write_spm_gguf(tmp_path / "in.gguf", vocab, model)
    tok = load_tokenizer_if_any(tmp_path / "in.gguf")
    save_gguf(load_model(tmp_path / "in.gguf"), tmp_path / "out.gguf", tok)
    meta, _, _ = read_gguf(tmp_path / "out.gguf", tensors=False)
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == vocab["tokens"] and meta["tokenizer.ggml.token_type"] == vocab["types"]
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.unknown_token_id"] == 0 and meta["tokenizer.chat_template"] == TEMPLATE
    again = load_tokenizer_if_any(tmp_path / "out.gguf")  # lmforge's own file: its tokenizer.json
    assert again.extra_config == tok.extra_config and again.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    del meta["tokenizer.huggingface.json"]  # as a file from another converter
    rebuilt = tokenizer_from_metadata(meta, "out.gguf")
    for text in TEXTS:
        assert rebuilt.encode(text) == tok.encode(text), text


def test_export_refuses_merges_its_scores_cannot_express(tmp_path):
    """A BPE trained with byte fallback (HF's own merges, a subset of all splits) is not a
    SentencePiece vocabulary llama.cpp can merge the same way: refused, nothing written."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, trainers

    from lmforge.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(_corpus(), trainer=trainer)
    tok = Tokenizer(backend, "<s>", "</s>")
    with pytest.raises(LmforgeError, match="merges are not the ones its vocabulary implies"):
        save_gguf(tiny_llama(tok.vocab_size), tmp_path / "x.gguf", tok)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"tokenizer.ggml.scores": [0.0, 1.0]}, "tokenizer.ggml.scores has 2 entries"),
        ({"tokenizer.ggml.scores": None}, "tokenizer.ggml.scores is missing"),
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens is missing"),
        ({"tokenizer.ggml.token_type": [1, 2]}, "tokenizer.ggml.token_type has 2 entries"),
        ({"tokenizer.ggml.bos_token_id": 10**6}, "tokenizer.ggml.bos_token_id = 1000000"),
    ],
)
def test_bad_metadata_is_refused_naming_the_key(vocab, tmp_path, override, message):
    write_spm_gguf(tmp_path / "bad.gguf", vocab, **override)
    with pytest.raises(LmforgeError, match=message) as info:
        load_tokenizer_if_any(tmp_path / "bad.gguf")
    assert "bad.gguf" in str(info.value)
    types = list(vocab["types"])
    types[5] = 9
    with pytest.raises(LmforgeError, match=r"token_type\[5\] = 9"):
        tokenizer_from_metadata(
            {"tokenizer.ggml.model": "llama", **_keys(vocab), "tokenizer.ggml.token_type": types}, "f"
        )
    merges = {"tokenizer.ggml.merges": ["▁t he", "nope"]}
    with pytest.raises(LmforgeError, match="tokenizer.ggml.merges has 'nope'"):
        tokenizer_from_metadata({"tokenizer.ggml.model": "llama", **_keys(vocab), **merges}, "f")
    duplicated = vocab["tokens"][:-1] + ["<s>"]
    with pytest.raises(LmforgeError, match="'<s>' twice"):
        tokenizer_from_metadata(
            {"tokenizer.ggml.model": "llama", **_keys(vocab), "tokenizer.ggml.tokens": duplicated}, "f"
        )


def _keys(vocab):
    return {"tokenizer.ggml.tokens": vocab["tokens"], "tokenizer.ggml.scores": vocab["scores"]}
