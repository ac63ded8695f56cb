"""Text in and out of the engine: chat prompts through the checkpoint's own template, the
template's end-of-turn token, and incremental detokenization that honours stop strings (both
from lmforge.tokenizer.text, the one text-out path).
"""

from __future__ import annotations

from lmforge.common import LmforgeError
from lmforge.tokenizer.text import TextStream, end_of_turn_ids  # noqa: F401  (re-exported: serve's text side)

from .protocol import APIError, ChatMessage
from .tools import ToolSet, template_messages


def chat_prompt_ids(
    tokenizer, messages: list[ChatMessage], accepts_images: bool = False, tools: ToolSet | None = None
) -> list[int]:
    """The conversation rendered by the tokenizer's chat template and encoded, ready to generate
    the assistant's turn; tools, tool calls and tool results as serve/tools.py puts them."""
    if tokenizer is None or not tokenizer.chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    contents = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type == "image_url" for p in content) and not accepts_images:
                raise APIError(400, "this model does not accept images", param=f"messages.{i}.content")
            if any(p.type == "input_audio" for p in content):
                raise APIError(400, "this model does not accept audio", param=f"messages.{i}.content")
            content = "".join(p.text for p in content if p.type == "text")
        contents.append(content)
    plain, listed = template_messages(messages, contents, tools, tokenizer.chat_template)
    try:
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, **({"tools": listed} if listed else {}))
    except LmforgeError as e:
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None
    return tokenizer.encode(text)
