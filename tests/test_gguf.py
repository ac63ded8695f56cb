"""GGUF export/import (lmforge.gguf_io): exact F32 round trips for every exported arch, quantized
round trips within their error, Q8_0/Q4_0 bytes equal to gguf-py's reference quantizers, the rotary
permutation against llama.cpp's rotation, tokenizer and chat template metadata, and the CLI.
Parity with llama.cpp itself: tests/test_gguf_llamacpp.py (slow)."""

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_model, load_tokenizer_if_any, save_model
from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.config import PRESETS

_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
GPT2_STYLE = {k: v for k, v in PRESETS["tiny-gpt2"].items() if k not in (*_SIZES, "max_position_embeddings")}

gguf = pytest.importorskip("gguf")
from lmforge.gguf_io import read_gguf, save_gguf  # noqa: E402
from lmforge.gguf_io.vocab import PRE_REGEX  # noqa: E402
from lmforge.gguf_io.weights import permute_rotary, unpermute_rotary  # noqa: E402

TEXTS = ["hello world, this is a test of the tokenizer. ", "def f(x):\n    return x + 1\n", "Ünïcödé 123 45"] * 30
CONFIGS = {
    "llama": dict(arch="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "llama-tied": dict(arch="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2": dict(arch="qwen2", attention_bias=True, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6),
    "mistral": dict(arch="mistral", num_attention_heads=4, num_key_value_heads=1),
    "llama3-rope": dict(
        arch="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "gpt2": GPT2_STYLE,
    "mixtral": dict(arch="mixtral", num_experts=4, num_experts_per_tok=2, num_key_value_heads=2),
}
SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.tokenizer import train_tokenizer

    return train_tokenizer(TEXTS, vocab_size=300)


def make(name: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**SHAPE, **CONFIGS[name]})).eval()
    with torch.no_grad():  # norms away from 1 and non-zero biases, so a mix-up shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_round_trip_is_exact(tmp_path, tokenizer, name):
    model = make(name)
    path = save_gguf(model, tmp_path / "m.gguf", tokenizer)
    back = load_model(path)
    x = torch.randint(0, SHAPE["vocab_size"], (2, 12))
    assert torch.equal(logits(model, x), logits(back, x))
    assert back.config.arch == model.config.arch
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    meta, tensors, types = read_gguf(path)
    assert set(types.values()) == {"F32"}
    arch = {"mistral": "llama", "mixtral": "llama", "llama3-rope": "llama", "llama-tied": "llama"}.get(name, name)
    assert meta["general.architecture"] == arch
    assert ("output.weight" in tensors) != model.config.tie_word_embeddings


# Worst |logit difference| allowed after a quantized round trip of the tiny model (logits are O(1)).
TOLERANCE = {"f16": 2e-3, "bf16": 3e-2, "q8_0": 3e-2, "q4_0": 0.4}


@pytest.mark.parametrize("gguf_type", list(TOLERANCE))
def test_quantized_round_trip_within_error(tmp_path, tokenizer, gguf_type):
    model = make("qwen2")
    path = save_gguf(model, tmp_path / "m.gguf", tokenizer, gguf_type)
    back = load_model(path)
    x = torch.randint(0, SHAPE["vocab_size"], (1, 16))
    err = (logits(model, x) - logits(back, x)).abs().max().item()
    assert 0 < err < TOLERANCE[gguf_type]
    _, _, types = read_gguf(path)
    assert types["blk.0.attn_q.weight"] == gguf_type.upper()
    assert types["blk.0.attn_norm.weight"] == types["blk.0.attn_q.bias"] == "F32"  # 1-D stays F32


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
def test_quantized_bytes_equal_the_reference_quantizer(tmp_path, tokenizer, gguf_type):
    model = make("llama")
    path = save_gguf(model, tmp_path / "m.gguf", tokenizer, gguf_type)
    qtype = getattr(gguf.GGMLQuantizationType, gguf_type.upper())
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    c = model.config
    w = model.state_dict()["model.layers.1.self_attn.k_proj.weight"]
    expected = gguf.quants.quantize(permute_rotary(w, c.num_key_value_heads).numpy(), qtype)
    assert np.array_equal(stored["blk.1.attn_k.weight"].reshape(expected.shape), expected)
    down = model.state_dict()["model.layers.0.mlp.down_proj.weight"].numpy()
    assert np.array_equal(stored["blk.0.ffn_down.weight"].reshape(-1), gguf.quants.quantize(down, qtype).reshape(-1))


def _rope_halves(x, pos, theta=10000.0):  # Hugging Face / lmforge: rotate (x_i, x_{i+d/2})
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _rope_pairs(x, pos, theta=10000.0):  # llama.cpp's LLAMA_ROPE_TYPE_NORM: rotate (x_2i, x_2i+1)
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos[:, None] * inv[None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()
    return out


def test_rotary_permutation_turns_half_rotation_into_pair_rotation():
    torch.manual_seed(0)
    n_head, head_dim, hidden = 3, 8, 16
    w = torch.randn(n_head * head_dim, hidden)
    x, pos = torch.randn(5, hidden), torch.arange(5).float()
    ours = _rope_halves((x @ w.t()).view(5, n_head, head_dim).transpose(0, 1), pos)
    theirs = _rope_pairs((x @ permute_rotary(w, n_head).t()).view(5, n_head, head_dim).transpose(0, 1), pos)
    # q.k scores are what attention sees: equal under both layouts.
    torch.testing.assert_close(ours @ ours.transpose(-1, -2), theirs @ theirs.transpose(-1, -2))
    assert torch.equal(unpermute_rotary(permute_rotary(w, n_head), n_head), w)


def test_tokenizer_and_chat_template_metadata(tmp_path, tokenizer):
    model = make("llama")
    path = save_gguf(model, tmp_path / "m.gguf", tokenizer)
    meta, _, _ = read_gguf(path, tensors=False)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == SHAPE["vocab_size"] and tokens[310] == "[PAD310]" and types[310] == 5
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert types[im_end] == 3 and meta["tokenizer.ggml.eot_token_id"] == im_end
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_id
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["tokenizer.ggml.add_bos_token"] is False
    merges = tokenizer.backend.model  # the merges are the BPE's, in order
    assert len(meta["tokenizer.ggml.merges"]) > 0 and merges is not None


def _strip_lmforge_keys(src, dst):
    """A copy of `src` without lmforge's own keys: what a file from another converter looks like."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "lmforge.config", "tokenizer.huggingface.json"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(
            t.name, np.asarray(t.data), raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2"])
def test_foreign_gguf_imports_from_standard_keys(tmp_path, tokenizer, pre):
    import tokenizers
    from tokenizers import Regex, pre_tokenizers

    from lmforge.tokenizer import Tokenizer

    tok = tokenizer
    if pre == "qwen2":  # Qwen2's pre-tokenizer: its split regex, then byte-level without GPT-2's regex
        backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRE_REGEX["qwen2"]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok = Tokenizer(backend, "<|endoftext|>", "<|endoftext|>", "<|pad|>", tokenizer.chat_template)
    model = make("qwen2")
    save_gguf(model, tmp_path / "ours.gguf", tok)
    _strip_lmforge_keys(tmp_path / "ours.gguf", tmp_path / "foreign.gguf")
    meta, _, _ = read_gguf(tmp_path / "foreign.gguf", tensors=False)
    assert meta["tokenizer.ggml.pre"] == pre and "lmforge.config" not in meta
    back = load_model(tmp_path / "foreign.gguf")
    x = torch.randint(0, SHAPE["vocab_size"], (1, 9))
    assert torch.equal(logits(model, x), logits(back, x))
    rebuilt = load_tokenizer_if_any(tmp_path / "foreign.gguf")
    for text in TEXTS[:3] + ["<|im_start|>user\n  hi 12345<|im_end|>\n", "a  b\n\n c's"]:
        assert rebuilt.encode(text) == tok.encode(text), text
        assert rebuilt.decode(tok.encode(text), skip_special_tokens=False) == text
    assert rebuilt.chat_template == tok.chat_template and rebuilt.eos_id == tok.eos_id


def test_unsupported_models_are_refused_with_the_reason(tmp_path):
    model = Transformer(ModelConfig(**SHAPE, qk_norm="head"))
    with pytest.raises(LmforgeError, match="qk_norm"):
        save_gguf(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(LmforgeError, match="gguf-type"):
        save_gguf(make("llama"), tmp_path / "m.gguf", gguf_type="q3_k")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(LmforgeError, match="bad.gguf"):
        load_model(tmp_path / "bad.gguf")


def test_cli_to_gguf_and_back(tmp_path, tokenizer, capsys):
    model = make("llama")
    save_model(model, tmp_path / "ckpt", tokenizer=tokenizer)
    out = tmp_path / "m.gguf"
    assert main(["convert", "--to-gguf", str(tmp_path / "ckpt"), "--out", str(out), "--gguf-type", "q8_0"]) == 0
    assert "GGUF q8_0" in capsys.readouterr().out
    assert read_gguf(out, tensors=False)[0]["general.file_type"] == 7  # MOSTLY_Q8_0
    assert main(["convert", "--to-gguf", str(tmp_path / "ckpt"), "--out", str(out)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", "--from-gguf", str(out), "--out", str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    assert load_tokenizer_if_any(tmp_path / "back").encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
    x = torch.randint(0, SHAPE["vocab_size"], (1, 8))
    assert (logits(model, x) - logits(back, x)).abs().max() < TOLERANCE["q8_0"]
    for argv, msg in (
        (["--from-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "x"), "--gguf-type", "f16"], "--to-gguf only"),
        (["--to-gguf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "y.gguf"), "--dtype", "float16"], "--gguf-type"),
        (["--to-gguf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")], "folder"),
        (["--to-gguf", str(tmp_path / "ckpt"), "--out", str(tmp_path)], "holds) the input"),
    ):
        assert main(["convert", *argv]) == 2
        assert msg in capsys.readouterr().err
