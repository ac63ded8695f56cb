"""Text in and out of the engine: chat prompts through the checkpoint's own template, the
template's end-of-turn token, and incremental detokenization that honours stop strings.
"""

from __future__ import annotations

from lmforge.common import LmforgeError

from lmforge.tokenizer.text import end_of_turn_ids  # noqa: F401  (re-exported: serve's text side)

from .protocol import APIError, ChatMessage


def chat_prompt_ids(tokenizer, messages: list[ChatMessage], accepts_images: bool = False) -> list[int]:
    """The conversation rendered by the tokenizer's chat template and encoded, ready to generate
    the assistant's turn."""
    if tokenizer is None or not tokenizer.chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    plain = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type == "image_url" for p in content) and not accepts_images:
                raise APIError(400, "this model does not accept images", param=f"messages.{i}.content")
            content = "".join(p.text for p in content if p.type == "text")
        plain.append({"role": m.role, "content": content or ""})
    try:
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True)
    except LmforgeError as e:
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
    return tokenizer.encode(text)


_WINDOW = 16  # tokens decoded per push, at most (plus one)


class TextStream:
    """Token ids in, text out, piece by piece: holds back a trailing incomplete UTF-8 character and
    any tail that could be the start of a stop string; cuts the text at the first stop string.
    `covered()` counts the pushed tokens whose text has started in what was emitted, so per-token
    data (logprobs) can be released along with the text, and the stop string's tokens dropped."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = self.flushed = False
        self.starts: list[int] = []  # per pushed token: the length of the text decoded before it
        self._decoded = 0
        self._covered = 0
        self._fffd_tokens = 0  # tokens pushed while the text has ended in U+FFFD
        # Incremental decoding: the text of ids[:h] is kept (_base), ids[p:h] (one token) is
        # decoded again with the new ones (_overlap: its text decoded at the start of a window).
        self._base, self._overlap, self._p = "", "", 0

    def push(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        for i, t in enumerate(ids):
            self.starts.append(self._decoded)
            # Ids past the tokenizer's vocabulary (embedding rows padded to a round size) have no text.
            if t < self.tokenizer.vocab_size:
                self.ids.append(t)
                if i + 1 < len(ids):  # several tokens at once (speculative decoding): where the next begins
                    self._decoded = len(self._decode_all())
        full = self._decode_all()
        self._decoded = len(full)
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full[:cut])
        safe = len(full) - self._unsettled(full, len(ids))
        safe -= self._stop_prefix_len(full[:safe])
        return self._emit(full[:safe])

    def _unsettled(self, full: str, pushed: int) -> int:
        """How many trailing characters may still change. An incomplete UTF-8 character decodes
        to U+FFFD until its last byte comes, at most 3 tokens later; a byte-fallback decoder turns
        the whole run of byte tokens around it into U+FFFD meanwhile, so the whole trailing run
        is held. A run that outlives 3 tokens holds invalid bytes (a model emitting garbage), which
        stay U+FFFD: then only its last 3 are held, so such a stream still flows instead of being
        held back to its very end."""
        run = len(full) - len(full.rstrip("\ufffd"))
        self._fffd_tokens = self._fffd_tokens + pushed if run else 0
        return run if self._fffd_tokens <= 3 else min(run, 3)

    def flush(self) -> str:
        """The held-back tail, at the end of generation."""
        if self.stopped:
            return ""
        self.flushed = True
        return self._emit(self._decode_all())

    def covered(self) -> int:
        """Pushed tokens whose text has begun in the emitted text (all of them once flushed)."""
        if self.flushed:
            return len(self.starts)
        while self._covered < len(self.starts) and self.starts[self._covered] < len(self.text):
            self._covered += 1
        return self._covered

    def _decode_all(self) -> str:
        """decode(self.ids), decoding only the last few tokens (decoding them all at every token
        made a stream's cost grow with the square of its length). The window starts one token
        before the kept text ends, and that token's own text is cut from the window's: decoded
        first, a token may read differently (SentencePiece drops its leading space), and it may be
        the tail of a character whose first bytes came before."""
        window = self.tokenizer.decode(self.ids[self._p:])
        if window.startswith(self._overlap):
            full = self._base + window[len(self._overlap):]
        else:  # a decoder that rewrites text across tokens: decode them all
            full = self.tokenizer.decode(self.ids)
        if len(self.ids) - self._p > _WINDOW and not full.endswith("\ufffd"):  # at a character's end
            self._base, self._p = full, len(self.ids) - 1
            self._overlap = self.tokenizer.decode(self.ids[self._p:])
        return full

    def _emit(self, upto: str) -> str:
        piece = upto[len(self.text):] if upto.startswith(self.text) else ""
        self.text += piece
        return piece

    def _first_stop(self, text: str) -> int | None:
        if not self.stop:
            return None
        # A stop string can only end in the new text, so start looking just before it.
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
