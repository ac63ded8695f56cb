"""Text out of a model, one home for every caller (generate, eval, serve, pipeline): the ids a chat
turn ends with.
"""

from __future__ import annotations

from lmforge.common import LmforgeError

_MARK = "\ue010lmforge-end-of-turn-probe\ue011"


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the chat template closes an assistant turn with ("<|im_end|>" for ChatML,
    "<|eot_id|>" for Llama 3, "<end_of_turn>" for Gemma), found by rendering a probe turn and
    reading the first special token after it; plus EOS. Generation stops at any of them."""
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    if not tokenizer.chat_template:
        return ids
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _MARK}])
    except LmforgeError:
        return ids
    after = text[text.find(_MARK) + len(_MARK):] if _MARK in text else ""
    specials = [t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special]
    for i in range(len(after)):
        hit = next((s for s in specials if after.startswith(s, i)), None)
        if hit is not None:
            tid = tokenizer.token_to_id(hit)
            return ids + [tid] if tid is not None and tid not in ids else ids
        if not after[i].isspace():
            break
    return ids
