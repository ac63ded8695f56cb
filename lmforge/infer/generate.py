"""Single-batch generation with a preallocated KV cache: one prefill, then one token per step.

Prompts of different lengths are left-padded; positions come from the attention mask so each row
decodes exactly as it would alone. Token ids in, token ids out; text helpers are at the bottom.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lmforge.tokenizer.text import TextStream

from .decode import decode, pad_prompts  # noqa: F401  (pad_prompts: re-exported, it was defined here)
from .grammar import GrammarSpec
from .sampling import SamplingParams


def stream_generate(
    model, input_ids, params: SamplingParams, attention_mask: torch.Tensor | None = None, decode_fn=None, **options
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B] at each step (`decode.decode`, the one driver). Rows
    that hit a stop token keep yielding it (callers drop what follows a stop). `decode_fn` replaces
    the model call of the one-token decode step (e.g. a torch.compile'd version); `options` are
    decode's (inputs_embeds, proposer, sinks, ...)."""
    return decode(model, params, input_ids, attention_mask=attention_mask, decode_fn=decode_fn, **options)


def generate(
    model,
    input_ids,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    compile: bool = False,
    *,
    min_p: float = 0.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
    grammar: GrammarSpec | None = None,
    tokenizer=None,
) -> torch.Tensor:
    """New token ids [B, N]. `input_ids`: a [B, T] tensor (with optional attention_mask), a list of
    ids, or a list of lists of different lengths (left-padded here). Rows that stop early are
    filled with the stop token. A `grammar` needs the `tokenizer` (its EOS then stops too)."""
    eos = getattr(tokenizer, "eos_id", None) if grammar is not None else None
    stop_token_ids = list(stop_token_ids or []) + (
        [eos] if eos is not None and eos not in (stop_token_ids or []) else []
    )
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop_token_ids=stop_token_ids,
        min_p=min_p,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=dict(logit_bias or {}),
        grammar=grammar,
    )
    decode_fn = compiled_decode(model) if compile else None
    tokens = list(stream_generate(model, input_ids, params, attention_mask, decode_fn, tokenizer=tokenizer))
    if not tokens:
        return torch.zeros(1 if not isinstance(input_ids, torch.Tensor) else input_ids.shape[0], 0, dtype=torch.long)
    return torch.stack(tokens, dim=1).cpu()


def compiled_decode(model):
    """torch.compile of the model for one-token decode steps, compiled once per model.

    Inductor's freezing treats the weights as constants (inference only: the decode step runs under
    inference_mode), so linear weights are prepacked for oneDNN; the config is patched around each
    call rather than set globally, so training-time compiles are not affected."""
    fn = getattr(model, "_lmforge_compiled_decode", None)
    if fn is None:
        import torch._inductor.config as inductor_config

        compiled = torch.compile(model, dynamic=True)

        def fn(*args, **kwargs):
            with inductor_config.patch(freezing=True):
                return compiled(*args, **kwargs)

        model._lmforge_compiled_decode = fn
    return fn


# ----------------------------------------------------------------------------- text helpers


def stream_text(
    model, tokenizer, prompt: str | list[int], params: SamplingParams, decode_fn=None, **options
) -> Iterator[str]:
    """Yield text pieces as they are generated (single prompt); honours stop strings and stop tokens.
    Text is held back while it could still be the start of a stop string or a partial UTF-8 char."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if tokenizer.eos_id is not None and tokenizer.eos_id not in params.stop_token_ids:
        params.stop_token_ids = list(params.stop_token_ids) + [tokenizer.eos_id]
    text = TextStream(tokenizer, params.stop_strings)  # the one text-out path (lmforge.tokenizer.text)
    options.setdefault("tokenizer", tokenizer)  # a grammar compiles against it
    for token in stream_generate(model, [ids], params, decode_fn=decode_fn, **options):  # options: decode's
        t = int(token[0])
        if t in params.stop_token_ids:
            break
        piece = text.push([t])
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.flush()
    if piece:
        yield piece


def generate_text(model, tokenizer, prompt: str, params: SamplingParams) -> str:
    return "".join(stream_text(model, tokenizer, prompt, params))
