"""The Tokenizer: a thin wrapper over a HF `tokenizers.Tokenizer` (the Rust BPE) that adds
the special-token roles, the chat template, loss masks for chat, and HF-format save/load.

On disk it is a HF tokenizer folder: tokenizer.json + tokenizer_config.json
(tokenizer_class "PreTrainedTokenizerFast"), so `transformers.AutoTokenizer` loads what we
save and we load what transformers saves.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.common import LmforgeError, atomic_write_json, atomic_write_text, read_json
from lmforge.tokenizer.chat import CHATML_TEMPLATE, assistant_spans, render

# bos = eos = "<|endoftext|>" (GPT-2 style: one document separator), pad = "<|pad|>".
DEFAULT_SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<image>"]
_ROLES = ("bos_token", "eos_token", "pad_token")
_OTHER_ROLES = ("unk_token", "sep_token", "cls_token", "mask_token")  # template variables only
# tokenizer_config.json keys we write ourselves; other keys of a loaded config are kept as they were.
_OWN_KEYS = {*_ROLES, "chat_template", "tokenizer_class", "auto_map", "clean_up_tokenization_spaces"}


class Tokenizer:
    """Byte-level BPE tokenizer with special-token roles and a chat template.

    `backend` is the `tokenizers.Tokenizer` doing the work (exposed for code that needs
    offsets or other Rust features). Encoding never adds special tokens on its own:
    `add_bos=True` is the only way a BOS appears, whatever post-processor a loaded file has.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        # A tokenizer.json may carry truncation/padding settings that would silently cut text.
        backend.no_truncation()
        backend.no_padding()
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)  # ids are 0..vocab_size-1
        self.special_tokens: dict[str, str | None] = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": pad_token,
        }
        self.bos_id, self.eos_id, self.pad_id = (self._role_id(r) for r in _ROLES)
        self.chat_template = chat_template
        self.extra_config = dict(extra_config or {})

    def _role_id(self, role: str) -> int | None:
        token = self.special_tokens[role]
        if token is None:
            return None
        i = self.backend.token_to_id(token)
        if i is None:
            raise LmforgeError(f"{role} {token!r} is not in the tokenizer's vocabulary")
        return i

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, chat_template={'yes' if self.chat_template else 'no'})"
        )

    # ------------------------------------------------------------------ ids <-> text

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise LmforgeError(f"encode expects a string, got {type(text).__name__}")
        return self._bos(add_bos) + self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        """Encode many texts on all cores (the Rust batch encoder; no offsets computed)."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise LmforgeError(f"encode_batch: text {i} is a {type(t).__name__}, not a string")
        bos = self._bos(add_bos)
        # encode_batch_fast (tokenizers >= 0.21) skips computing offsets.
        batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        encodings = batch(texts, add_special_tokens=False)
        return [bos + e.ids for e in encodings]

    def _bos(self, add_bos: bool) -> list[int]:
        if not add_bos:
            return []
        if self.bos_id is None:
            raise LmforgeError("add_bos=True but this tokenizer has no bos_token")
        return [self.bos_id]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """`ids`: a list of ints, or anything with `.tolist()` (a tensor, a numpy array)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:  # the Rust decoder would drop it silently (or overflow on -100 labels)
            raise LmforgeError(f"decode: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    # ------------------------------------------------------------------ chat

    def _template(self) -> str:
        if not self.chat_template:
            raise LmforgeError("this tokenizer has no chat template (set chat_template in tokenizer_config.json)")
        return self.chat_template

    def _template_vars(self, extra: dict[str, Any]) -> dict[str, Any]:
        # As transformers: the named special tokens that are set (ours, then other roles a loaded
        # config names, such as unk_token), then the caller's variables on top.
        others = {k: self.extra_config.get(k) for k in _OTHER_ROLES}
        others = {k: v.get("content") if isinstance(v, dict) else v for k, v in others.items()}
        named = {**others, **self.special_tokens}
        return {**{k: v for k, v in named.items() if isinstance(v, str)}, **extra}

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, **template_vars: Any
    ) -> str:
        """The conversation as text, rendered by the stored template (same string as
        transformers' `apply_chat_template(tokenize=False)`). Extra keyword arguments become
        template variables (tools=..., enable_thinking=...)."""
        return render(self._template(), messages, add_generation_prompt, **self._template_vars(template_vars))

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = False, **template_vars: Any
    ) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) for a conversation: ids == encode(apply_chat_template(...)); the
        mask is 1 on tokens the assistant wrote, its end-of-turn token included, 0 elsewhere.
        A token that straddles a span edge counts as assistant-written."""
        text, spans = assistant_spans(
            self._template(),
            messages,
            add_generation_prompt,
            end_tokens=self._special_strings,
            **self._template_vars(template_vars),
        )
        encoding = self._plain_backend.encode(text, add_special_tokens=False)
        mask = [int(any(_overlaps(offset, span) for span in spans)) for offset in encoding.offsets]
        return encoding.ids, mask

    @functools.cached_property
    def _special_strings(self) -> list[str]:
        return [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]

    @functools.cached_property
    def _plain_backend(self) -> tokenizers.Tokenizer:
        # Post-processors (GPT-2's ByteLevel trim_offsets) shrink offsets to exclude whitespace;
        # the mask needs every character owned by some token, so use a copy without one.
        if self.backend.post_processor is None:
            return self.backend
        plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
        plain.post_processor = None
        return plain

    # ------------------------------------------------------------------ files

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (HF format), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            **self.extra_config,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
        }
        config.update({k: v for k, v in self.special_tokens.items() if v is not None})
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_text(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic_write_json(directory / "tokenizer_config.json", config)
        # tokenizer_config.json holds the template; a stale chat_template.jinja (which takes
        # precedence on load, as in transformers) must not contradict it.
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.exists():
            if self.chat_template:
                atomic_write_text(jinja_file, self.chat_template)
            else:
                jinja_file.unlink()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer folder (tokenizer.json [+ tokenizer_config.json, chat_template.jinja])
        or a tokenizer.json file."""
        path = Path(path)
        if path.is_dir():
            folder, file = path, path / "tokenizer.json"
            if not file.is_file():
                raise LmforgeError(f"no tokenizer.json in {path} (only fast/HF tokenizer folders are supported)")
        elif path.is_file():
            file = path
            folder = path.parent if path.name == "tokenizer.json" else None
        else:
            raise LmforgeError(f"tokenizer not found: {path}")
        backend = _read_backend(file)
        config = _read_config(folder)
        if config is None:  # a bare tokenizer.json: recognise our own special tokens
            vocab = backend.get_vocab()
            config = {
                "bos_token": "<|endoftext|>" if "<|endoftext|>" in vocab else None,
                "pad_token": "<|pad|>" if "<|pad|>" in vocab else None,
            }
            config["eos_token"] = config["bos_token"]
        where = folder / "tokenizer_config.json" if folder else file
        roles = {r: _token_content(config.get(r), r, where) for r in _ROLES}
        template = _read_template(config, folder, where)
        extra = {k: v for k, v in config.items() if k not in _OWN_KEYS}
        try:
            return cls(backend, **roles, chat_template=template, extra_config=extra)
        except LmforgeError as e:
            raise LmforgeError(f"{where}: {e}") from None


def _overlaps(offset: tuple[int, int], span: tuple[int, int]) -> bool:
    (s, e), (a, b) = offset, span
    return s < b and e > a if e > s else a <= s < b


def _read_backend(file: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust error: say whether it is the JSON or its content
        read_json(file, "tokenizer.json")  # raises with the line/column if the JSON is broken
        raise LmforgeError(f"{file}: not a valid tokenizer.json ({e})") from None


def _read_config(folder: Path | None) -> dict[str, Any] | None:
    if folder is None or not (folder / "tokenizer_config.json").is_file():
        return None
    config = read_json(folder / "tokenizer_config.json", "tokenizer config")
    if not isinstance(config, dict):
        raise LmforgeError(f"{folder / 'tokenizer_config.json'}: expected a JSON object")
    return config


def _token_content(value: Any, role: str, where: Path) -> str | None:
    """Special tokens are written either as "<s>" or as an AddedToken dict {"content": "<s>", ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise LmforgeError(f"{where}: {role} must be a string or {{'content': ...}}, got {value!r}")


def _read_template(config: dict[str, Any], folder: Path | None, where: Path) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json (transformers' order); a list of
    named templates (older HF format) gives its "default" one."""
    if folder is not None and (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise LmforgeError(f"{where}: chat_template must be a string, got {type(template).__name__}")
    return template


def _checked(texts: Iterable[str]) -> Iterator[str]:
    # Lazily, so a generator streams into the trainer instead of being materialised.
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise LmforgeError(f"train_tokenizer: text {i} is a {type(text).__name__}, not a string")
        yield text


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str] | None = None,
    min_frequency: int = 2,
    show_progress: bool = False,
    isolate: str | None = None,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) on a stream of texts.

    All 256 byte symbols are in the initial alphabet, so any text round-trips exactly.
    `vocab_size` counts the bytes, the merges and the special tokens (ids 0..k-1).
    bos = eos = "<|endoftext|>" and pad = "<|pad|>" when present; ChatML is the chat
    template when "<|im_start|>" and "<|im_end|>" are.
    `isolate`: a regex (Rust `tokenizers` syntax) whose every match is a pre-token of its own, so no
    merge crosses it; the Unicode class Han (`\\p{Han}`) keeps each Chinese character one token.
    """
    specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise LmforgeError(
            f"vocab_size {vocab_size} is too small: the byte alphabet ({len(alphabet)}) "
            f"and the special tokens ({len(specials)}) need {len(alphabet) + len(specials)}"
        )
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if isolate:
        split = pre_tokenizers.Split(tokenizers.Regex(isolate), behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence([split, backend.pre_tokenizer])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    backend.train_from_iterator(_checked(texts), trainer=trainer)
    eot = "<|endoftext|>" if "<|endoftext|>" in specials else None
    chatml = "<|im_start|>" in specials and "<|im_end|>" in specials
    return Tokenizer(
        backend,
        bos_token=eot,
        eos_token=eot,
        pad_token="<|pad|>" if "<|pad|>" in specials else None,
        chat_template=CHATML_TEMPLATE if chatml else None,
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.load(path)
