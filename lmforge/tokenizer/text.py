"""Text out of a model, one home for every caller (generate, the engine, eval, serve, pipeline):

    end_of_turn_ids(tok)        the ids a chat turn ends with (from the chat template), plus EOS
    IncrementalDecoder(tok)     ids in, settled text out, each token decoded a bounded number of times
    TextStream(tok, stop)       the above plus stop strings: text held back while it could begin one
    completion_text(tok, ids, stop), cut_at_stop(text, stop)   the same result for a finished output

A stream costs linear time in its length: no call decodes the whole output again (decoding it all
at every token made `generate --stream` quadratic).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lmforge.common import LmforgeError

_MARK = "\ue010lmforge-end-of-turn-probe\ue011"
_FFFD = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole UTF-8 character
# An incomplete UTF-8 character has at most 3 of its 4 bytes, and every token holds at least one byte,
# so only the last 3 tokens can still change the text.
_OPEN_TOKENS = 3


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the chat template closes an assistant turn with ("<|im_end|>" for ChatML,
    "<|eot_id|>" for Llama 3, "<end_of_turn>" for Gemma), found by rendering a probe turn and
    reading the first special token after it; plus EOS. Generation stops at any of them."""
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    if not tokenizer.chat_template:
        return ids
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
        )
    except LmforgeError:
        return ids
    after = text[text.find(_MARK) + len(_MARK) :] if _MARK in text else ""
    specials = [t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special]
    for i in range(len(after)):
        hit = next((s for s in specials if after.startswith(s, i)), None)
        if hit is not None:
            tid = tokenizer.token_to_id(hit)
            return ids + [tid] if tid is not None and tid not in ids else ids
        if not after[i].isspace():
            break
    return ids


def known_ids(tokenizer, ids: Iterable[int]) -> list[int]:
    """The ids that have text: a model whose embedding is padded past the tokenizer's vocabulary
    (to a multiple of 64, say) may emit an id the tokenizer does not have, and decode would raise."""
    limit = getattr(tokenizer, "vocab_size", None)
    return [int(t) for t in ids if limit is None or int(t) < limit]


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop string begins in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text before the earliest stop string."""
    cut = find_stop(text, stop)
    return text if cut is None else text[:cut]


def completion_text(tokenizer, ids: Iterable[int], stop: Sequence[str] = ()) -> str:
    """A finished output's text, cut at the earliest stop string (what a TextStream would have
    streamed, in one decode)."""
    return cut_at_stop(tokenizer.decode(known_ids(tokenizer, ids)), stop)


def stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the start of some stop string (held back: the
    next tokens may complete it)."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class IncrementalDecoder:
    """Token ids in, text out (vLLM's detokenizer: prefix and read offsets). A new token is decoded
    after the previous chunk of ids (the context), and only the text past the context's own decode
    is new. The context makes decoders that read across tokens right: SentencePiece drops a leading
    space only at a decode's first token, byte-level BPE needs a character's first bytes. Text is
    settled (returned) once it does not end in U+FFFD, so half a UTF-8 character is never returned;
    a tail of invalid bytes (which stays U+FFFD whatever comes) is settled all but its last
    `_OPEN_TOKENS` tokens, so such a stream still flows. Every token is decoded a bounded number of
    times (`decoded_ids` counts the ids passed to decode): a stream costs linear time."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._context_ids: list[int] = []
        self._context = ""  # decode(_context_ids)
        self._open: list[int] = []  # ids whose text is not settled yet
        self.pending = ""  # their text as it reads now (may still change)
        self.decoded_ids = 0

    def _decode(self, ids: list[int]) -> str:
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids)

    def add(self, token: int) -> str:
        """Append one id; return the text it settled (often "", at most a few characters)."""
        self._open.append(token)
        window = self._decode(self._context_ids + self._open)
        tail = window[len(self._context) :]
        if len(window) >= len(self._context) and not tail.endswith(_FFFD):
            return self._settle(len(self._open), tail, fresh=not self._context_ids)
        self.pending = tail
        cut = len(self._open) - _OPEN_TOKENS
        if cut > 0:  # invalid bytes: the tokens before the last few can no longer change
            head, rest = self._decode(self._open[:cut]), self._decode(self._open[cut:])
            if head + rest == tail:  # else a byte sequence straddles the cut: try again at the next token
                out = self._settle(cut, head, fresh=True)
                self.pending = rest
                return out
        return ""

    def _settle(self, n: int, text: str, fresh: bool) -> str:
        """The first n open ids read as `text` for good; they become the next token's context
        (`fresh`: `text` is already their decode on their own)."""
        chunk, self._open, self.pending = self._open[:n], self._open[n:], ""
        if not text and self._context_ids:
            return ""  # no text after a context (skipped special tokens): they leave the window
        context = text if fresh else self._decode(chunk)
        if not context and self._context_ids:  # a chunk whose text needs its left neighbour (a lone "▁")
            chunk = self._context_ids[-1:] + chunk
            context = self._decode(chunk)
        self._context_ids, self._context = chunk, context
        return text


class TextStream:
    """Token ids in, text out, piece by piece: holds back a trailing incomplete UTF-8 character and
    any tail that could be the start of a stop string; cuts the text at the first stop string.
    `covered()` counts the pushed tokens whose text has started in what was emitted, so per-token
    data (logprobs) can be released along with the text, and the stop string's tokens dropped.
    Ids past the tokenizer's vocabulary (embedding rows padded to a round size) have no text."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.decoder = IncrementalDecoder(tokenizer)
        self._limit = getattr(tokenizer, "vocab_size", None)
        self.stopped = self.flushed = False
        self.starts: list[int] = []  # per pushed token: the length of the text decoded before it
        self._pieces: list[str] = []  # everything emitted (joined only when asked: appending stays linear)
        self._emitted = 0
        self._held = ""  # settled text not emitted yet: it could begin a stop string
        self._covered = 0

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

    def push(self, ids: Iterable[int]) -> str:
        """Add new token ids; return the text they released."""
        if self.stopped:
            return ""
        for t in map(int, ids):
            self.starts.append(self._emitted + len(self._held) + len(self.decoder.pending))
            if self._limit is None or t < self._limit:
                self._held += self.decoder.add(t)
        return self._release(final=False)

    def flush(self) -> str:
        """The held-back tail, at the end of generation."""
        if self.stopped:
            return ""
        self.flushed = True
        self._held += self.decoder.pending
        self.decoder.pending = ""
        return self._release(final=True)

    def covered(self) -> int:
        """Pushed tokens whose text has begun in the emitted text (all of them once flushed)."""
        if self.flushed:
            return len(self.starts)
        while self._covered < len(self.starts) and self.starts[self._covered] < self._emitted:
            self._covered += 1
        return self._covered

    def _release(self, final: bool) -> str:
        # A stop string cannot begin in emitted text (a possible start is held), so only the held
        # text and the still-open tail are searched: a bounded amount per token.
        cut = find_stop(self._held + self.decoder.pending, self.stop)
        if cut is not None:
            self.stopped = True
            return self._emit((self._held + self.decoder.pending)[:cut])
        keep = len(self._held) if final else len(self._held) - stop_prefix_len(self._held, self.stop)
        return self._emit(self._held[:keep])

    def _emit(self, piece: str) -> str:
        self._held = self._held[len(piece) :]
        if piece:
            self._pieces.append(piece)
            self._emitted += len(piece)
        return piece
