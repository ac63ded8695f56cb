"""SentencePiece vocabularies in GGUF (llama.cpp's `tokenizer.ggml.model = "llama"`: Llama 1/2,
Mistral 7B, Mixtral, TinyLlama, ...), rebuilt as the Hugging Face `tokenizers` BPE transformers uses
for them, and written back.

A SentencePiece BPE vocabulary has no merge list: llama.cpp repeatedly joins the adjacent pair whose
concatenation is the vocabulary token with the highest `tokenizer.ggml.scores` entry. A BPE whose
merges are every (left, right) split of every token, ranked by the joined token's score (transformers'
`generate_merges`), makes the same choices. Text is normalised as llama.cpp does it: one space before
each piece of text that starts the input or follows a special token (`tokenizer.ggml.add_space_prefix`,
default true), then every space as "▁"; a character not in the vocabulary becomes its UTF-8 bytes,
the `<0xNN>` tokens (byte fallback).
"""

from __future__ import annotations

import re

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, processors

from lmforge.common import LmforgeError
from lmforge.tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType
SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of every token into two vocabulary tokens, best joined score first; ties as
    transformers' `generate_merges` breaks them (longer left part, longer right part, then ids)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend((left, right, score) for left, right in pairs)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: equal keys keep id order
    return [(left, right) for left, right, _ in found]


def array(meta: dict, key: str, source: str, n: int | None, kind: type | tuple[type, ...]) -> list | None:
    """The array metadata `key` (None when absent), checked for length `n` and element type."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        what = "numbers" if isinstance(kind, tuple) else f"{kind.__name__} values"
        raise LmforgeError(f"{source}: metadata {key} must be an array of {what}")
    if n is not None and len(value) != n:
        raise LmforgeError(f"{source}: metadata {key} has {len(value)} entries, tokenizer.ggml.tokens has {n}")
    return value


def token_id(meta: dict, key: str, n: int, source: str) -> int | None:
    """`tokenizer.ggml.<key>` as a token id, refused when it points outside the vocabulary."""
    value = meta.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise LmforgeError(f"{source}: metadata tokenizer.ggml.{key} = {value!r} is not a token id (0..{n - 1})")
    return value


def spm_tokenizer(meta: dict, source: str) -> Tokenizer:
    """The Tokenizer a "llama" (SentencePiece) GGUF vocabulary describes."""
    tokens = array(meta, "tokenizer.ggml.tokens", source, None, str)
    if not tokens:
        raise LmforgeError(f"{source}: metadata tokenizer.ggml.tokens is missing or empty")
    n = len(tokens)
    scores = array(meta, "tokenizer.ggml.scores", source, n, (int, float))
    types = array(meta, "tokenizer.ggml.token_type", source, n, int) or [NORMAL] * n
    bad = next((i for i, k in enumerate(types) if not NORMAL <= k <= BYTE), None)
    if bad is not None:
        raise LmforgeError(f"{source}: metadata tokenizer.ggml.token_type[{bad}] = {types[bad]} is not a type (1-6)")
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if seen.setdefault(t, i) != i:
            raise LmforgeError(f"{source}: metadata tokenizer.ggml.tokens has {t!r} twice (ids {seen[t]} and {i})")
    if "tokenizer.ggml.merges" in meta:  # a converter that wrote them: used as given (transformers does)
        merges = [tuple(m.split(" ", 1)) for m in array(meta, "tokenizer.ggml.merges", source, None, str)]
    elif scores is None:
        raise LmforgeError(
            f"{source}: metadata tokenizer.ggml.scores is missing (a SentencePiece vocabulary is merged by "
            "its token scores)"
        )
    else:
        merges = merges_from_scores(tokens, scores)
    ids = {r: token_id(meta, f"{r}_token_id", n, source) for r in ("bos", "eos", "unknown", "padding")}
    unk = ids["unknown"] if ids["unknown"] is not None else next((i for i, k in enumerate(types) if k == UNKNOWN), None)
    vocab = {t: i for i, t in enumerate(tokens)}
    bad = next((m for m in merges if len(m) != 2 or m[0] not in vocab or m[1] not in vocab), None)
    if bad is not None:
        raise LmforgeError(f"{source}: metadata tokenizer.ggml.merges has {' '.join(bad)!r}, not two vocabulary tokens")
    unk_token = tokens[unk] if unk is not None else None
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(bpe)
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", SPACE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if prefix else replace
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    # Special tokens are matched whole in the text, before normalisation (so each text piece after one
    # gets its own prefix space, as in llama.cpp); they keep their ids.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)]
    )
    backend.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default for this model
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    backend.post_processor = _post_processor(tokens, ids["bos"] if add_bos else None, ids["eos"] if add_eos else None)
    role = {r: tokens[i] if i is not None else None for r, i in ids.items()}
    # lmforge's own encode never adds BOS/EOS (the post-processor above serves transformers once the
    # tokenizer is saved as a folder); the flags travel in the config and back into a GGUF export.
    extra = {"add_bos_token": add_bos, "add_eos_token": add_eos}
    if unk is not None:
        extra["unk_token"] = tokens[unk]
    return Tokenizer(
        backend,
        bos_token=role["bos"],
        eos_token=role["eos"],
        pad_token=role["padding"],
        chat_template=meta.get("tokenizer.chat_template"),
        extra_config=extra,
    )


def _post_processor(tokens: list[str], bos: int | None, eos: int | None):
    """transformers' LlamaConverter post-processor: BOS before / EOS after each sequence when flagged."""
    if bos is None and eos is None:
        return None
    first = [f"{tokens[bos]}:0"] if bos is not None else []
    last = [f"{tokens[eos]}:0"] if eos is not None else []
    pair_first = [f"{tokens[bos]}:1"] if bos is not None else []
    pair_last = [f"{tokens[eos]}:1"] if eos is not None else []
    specials = [(tokens[i], i) for i in dict.fromkeys(i for i in (bos, eos) if i is not None)]
    return processors.TemplateProcessing(
        single=" ".join([*first, "$A:0", *last]),
        pair=" ".join([*first, "$A:0", *last, *pair_first, "$B:1", *pair_last]),
        special_tokens=specials,
    )


def is_spm(spec: dict) -> bool:
    """Whether a tokenizer.json spec is the SentencePiece-style BPE `spm_tokenizer` builds (byte
    fallback, spaces as "▁" by a normalizer, no pre-tokenizer)."""
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and _space_prefix(spec) is not None


def _space_prefix(spec: dict) -> bool | None:
    """True/False: the normalizer is [Prepend("▁"), Replace(" ", "▁")] / Replace(" ", "▁") alone;
    None: anything else (a Metaspace pre-tokenizer, NFKC, ...), which llama.cpp cannot reproduce."""
    norm = spec.get("normalizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    if spec.get("pre_tokenizer") is not None or not steps or steps[-1] != replace:
        return None
    if len(steps) == 1:
        return False
    return True if len(steps) == 2 and steps[0] == {"type": "Prepend", "prepend": SPACE} else None


def scores_from_merges(tokens: list[str], merges: list[tuple[str, str]]) -> list[float] | None:
    """Scores under which `merges_from_scores` gives back `merges` (None when none is found).

    Within one score, `merges_from_scores` orders merges by (longer left, longer right, token id, left
    id, right id); so the merges are cut into runs where that key increases, run k scoring -k: the
    fewest distinct scores, which also reproduces tied scores (many tokens sharing one). Every merge
    of a token must fall in one run; tokens no merge makes score below all others."""
    ids = {t: i for i, t in enumerate(tokens)}
    level_of: dict[str, int] = {}
    level, previous = 0, None
    for left, right in merges:
        token = left + right
        if token not in ids or left not in ids or right not in ids:
            return None
        key = (-len(left), -len(right), ids[token], ids[left], ids[right])
        if previous is not None and key <= previous:
            level += 1
        previous = key
        if level_of.setdefault(token, level) != level:
            return None
    return [-float(level_of.get(t, level + 1)) for t in tokens]


def vocab_rows(tok: Tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..n_vocab-1: special added tokens CONTROL, other added tokens
    USER_DEFINED, embedding rows past the vocabulary UNUSED "[PAD<id>]" (as llama.cpp's converter)."""
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(n_vocab):
        text = tok.id_to_token(i) if i < tok.vocab_size else None
        tokens.append(f"[PAD{i}]" if text is None else text)
        types.append(
            UNUSED if text is None else (CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL
        )
    return tokens, types


def spm_metadata(tok: Tokenizer, spec: dict, n_vocab: int) -> dict[str, object]:
    """The "llama" vocabulary keys for `tok` (an `is_spm` tokenizer), padded to `n_vocab` rows.

    Scores are recovered from the merge order (`scores_from_merges`), and the merges those scores imply
    must be the tokenizer's own, in order: otherwise llama.cpp would join pairs this BPE never joins,
    and the export is refused."""
    model = spec["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    unk = model.get("unk_token")
    tokens, types = vocab_rows(tok, n_vocab)
    types = [
        UNKNOWN if t == unk else BYTE if k == NORMAL and _BYTE_TOKEN.fullmatch(t) else k for t, k in zip(tokens, types)
    ]
    scores = scores_from_merges(tokens, merges)
    if scores is None or merges_from_scores(tokens, scores) != merges:
        raise LmforgeError(
            "GGUF export: this SentencePiece-style tokenizer's merges are not the ones its vocabulary implies "
            "(every split of every token, ranked by score), so llama.cpp would tokenize differently; "
            "export from its original GGUF or SentencePiece model instead"
        )
    meta: dict[str, object] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": bool(_space_prefix(spec)),
        "tokenizer.ggml.add_bos_token": bool(tok.extra_config.get("add_bos_token", False)),
        "tokenizer.ggml.add_eos_token": bool(tok.extra_config.get("add_eos_token", False)),
    }
    if unk is not None and tok.token_to_id(unk) is not None:
        meta["tokenizer.ggml.unknown_token_id"] = tok.token_to_id(unk)
    return meta
