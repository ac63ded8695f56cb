"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`), so llama.cpp tokenizes like lmforge, and back.

Byte-level BPE (ours, GPT-2's, Qwen2's, Llama 3's) is llama.cpp's "gpt2" model: the token strings
(byte-level alphabet), the merges, a token type per id (special added tokens are CONTROL, other
added tokens USER_DEFINED, ids past the tokenizer's vocabulary UNUSED padding) and a pre-tokenizer
name that selects llama.cpp's split regex. The pre-tokenizer is recognised from the tokenizer's own
regex, never guessed: an unknown one is refused with the regex named. The full tokenizer.json
travels too (`tokenizer.huggingface.json`), so an lmforge import restores it exactly.
SentencePiece vocabularies (llama.cpp's "llama" model) are lmforge.gguf_io.spm.
"""

from __future__ import annotations

import json

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from lmforge.common import LmforgeError
from lmforge.gguf_io.spm import (
    CONTROL,
    NORMAL,
    USER_DEFINED,
    array,
    is_spm,
    spm_metadata,
    spm_tokenizer,
    token_id,
    vocab_rows,
)
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.text import end_of_turn_ids

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# llama.cpp pre-tokenizer name -> the Split regex the Hugging Face tokenizer.json carries for it
# (llama.cpp's own copies are rewritten for its regex engine; these are the originals).
PRE_REGEX = {
    "qwen2": _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _pre_name(spec: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer` entry."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        if spec.get("add_prefix_space"):
            raise LmforgeError(
                "GGUF export: a ByteLevel pre-tokenizer with add_prefix_space has no llama.cpp equivalent"
            )
        return "gpt-2"  # GPT-2's regex, built into ByteLevel
    parts = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel":
        pattern = parts[0].get("pattern", {}).get("Regex")
        for name, regex in PRE_REGEX.items():
            if pattern == regex:
                return name
        raise LmforgeError(
            f"GGUF export: the tokenizer's split regex {pattern!r} matches no llama.cpp pre-tokenizer "
            f"lmforge knows ({', '.join(['gpt-2', *PRE_REGEX])})"
        )
    raise LmforgeError(
        f"GGUF export: pre-tokenizer {json.dumps(spec)[:200]} has no llama.cpp equivalent lmforge knows "
        "(byte-level BPE with the GPT-2, Qwen2 or Llama 3 split is supported)"
    )


def tokenizer_metadata(tok: Tokenizer, n_vocab: int) -> dict[str, object]:
    """`tokenizer.*` GGUF metadata for `tok`, padded to the model's `n_vocab` embedding rows."""
    spec = json.loads(tok.backend.to_str())
    if tok.vocab_size > n_vocab:
        raise LmforgeError(f"GGUF export: the tokenizer has {tok.vocab_size} tokens, the model only {n_vocab} rows")
    meta = spm_metadata(tok, spec, n_vocab) if is_spm(spec) else _bpe_metadata(tok, spec, n_vocab)
    meta["tokenizer.huggingface.json"] = tok.backend.to_str()
    for role, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("padding", tok.pad_id)):
        if value is not None:
            meta[f"tokenizer.ggml.{role}_token_id"] = value
    end = [i for i in end_of_turn_ids(tok) if i != tok.eos_id]
    if end:  # the chat template's end of turn (<|im_end|>): llama.cpp stops there too
        meta["tokenizer.ggml.eot_token_id"] = end[0]
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def _bpe_metadata(tok: Tokenizer, spec: dict, n_vocab: int) -> dict[str, object]:
    """The "gpt2" (byte-level BPE) vocabulary keys."""
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer"):
        raise LmforgeError(
            "GGUF export: only byte-level BPE tokenizers without a normalizer and SentencePiece-style BPE "
            "(byte fallback, spaces as '\u2581' by a Prepend/Replace normalizer) are supported "
            f"(this one: model {model.get('type')!r}, byte_fallback={model.get('byte_fallback')}, "
            f"normalizer {(spec.get('normalizer') or {}).get('type')!r}, "
            f"pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')!r})"
        )
    tokens, types = vocab_rows(tok, n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_name(spec.get("pre_tokenizer")),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        # lmforge never adds BOS/EOS on its own (Tokenizer.encode): llama.cpp must not either.
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
    }


def tokenizer_from_metadata(meta: dict, source: str) -> Tokenizer | None:
    """The Tokenizer a GGUF file describes (None when it has none); refuses kinds it cannot rebuild."""
    kind = meta.get("tokenizer.ggml.model")
    if kind in (None, "none"):
        return None
    spm = spm_tokenizer(meta, source) if kind == "llama" else None  # checks the keys, keeps the flags
    if "tokenizer.huggingface.json" in meta:  # written by lmforge (or a converter that kept it)
        backend = tokenizers.Tokenizer.from_str(meta["tokenizer.huggingface.json"])
    elif spm is not None:
        return spm
    elif kind == "gpt2":
        backend = _bpe_backend(meta, source)
    else:
        raise LmforgeError(
            f"{source}: tokenizer model {kind!r} cannot be imported yet (byte-level BPE 'gpt2' and "
            "SentencePiece 'llama' are supported); import the weights from the original Hugging Face folder instead"
        )
    tokens = array(meta, "tokenizer.ggml.tokens", source, None, str) or []

    def role(key: str) -> str | None:
        i = token_id(meta, f"{key}_token_id", len(tokens), source)
        return tokens[i] if i is not None else None

    return Tokenizer(
        backend,
        bos_token=role("bos"),
        eos_token=role("eos"),
        pad_token=role("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        extra_config=spm.extra_config if spm is not None else None,
    )


def _bpe_backend(meta: dict, source: str) -> tokenizers.Tokenizer:
    """A byte-level BPE rebuilt from `tokenizer.ggml.tokens/merges/token_type/pre`."""
    tokens = array(meta, "tokenizer.ggml.tokens", source, None, str)
    if not tokens:
        raise LmforgeError(f"{source}: metadata tokenizer.ggml.tokens is missing or empty")
    types = array(meta, "tokenizer.ggml.token_type", source, len(tokens), int) or [NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in array(meta, "tokenizer.ggml.merges", source, None, str) or []]
    backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre in ("gpt-2", "default"):
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre in PRE_REGEX:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRE_REGEX[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise LmforgeError(f"{source}: pre-tokenizer {pre!r} is not supported (gpt-2, {', '.join(PRE_REGEX)})")
    backend.decoder = decoders.ByteLevel()
    # They keep their ids: every token is already in the vocabulary.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    )
    backend.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    return backend
