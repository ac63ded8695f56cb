"""Single-batch generation with a preallocated KV cache: one prefill, then one token per step.

Prompts of different lengths are left-padded; positions come from the attention mask so each row
decodes exactly as it would alone. Token ids in, token ids out; text helpers are at the bottom.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from lmforge.common import LmforgeError
from lmforge.model import KVCache

from lmforge.tokenizer.text import TextStream

from .sampling import SamplingParams, sample


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> (input_ids [B, T], attention_mask [B, T])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmforgeError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids, mask


def _as_batch(input_ids, attention_mask, pad_id: int):
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        return ids, attention_mask
    if input_ids and isinstance(input_ids[0], int):
        input_ids = [input_ids]
    return pad_prompts(input_ids, pad_id)


@torch.inference_mode()
def stream_generate(model, input_ids, params: SamplingParams, attention_mask: torch.Tensor | None = None,
                    decode_fn=None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B] at each step. Rows that hit a stop token keep
    yielding it (callers drop what follows a stop). `decode_fn` replaces the model call of the
    one-token decode step (e.g. a torch.compile'd version)."""
    device = next(model.parameters()).device
    pad_id = params.stop_token_ids[0] if params.stop_token_ids else 0
    ids, mask = _as_batch(input_ids, attention_mask, pad_id)
    ids = ids.to(device)
    B, T = ids.shape
    max_len = T + params.max_new_tokens
    limit = model.config.max_position_embeddings
    if model.config.position == "learned" and max_len > limit:
        raise LmforgeError(f"prompt ({T} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                           f"context of {limit} positions")
    if params.max_new_tokens == 0:
        return
    positions = None
    if mask is not None:
        mask = torch.cat([mask.to(device), mask.new_ones(B, params.max_new_tokens, device=device)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache.for_model(model, B, max_len + _virtual_tokens(model))
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, True if mask is None else mask[:, :T].bool())
    stop = torch.tensor(params.stop_token_ids, device=device, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    def step(tokens: torch.Tensor, start: int, fn=model) -> torch.Tensor:
        n = tokens.shape[1]
        return fn(tokens, attention_mask=None if mask is None else mask[:, :start + n],
                  position_ids=None if positions is None else positions[:, start:start + n],
                  kv_cache=cache, start_pos=start, logits_to_keep=1)[:, -1]

    logits = step(ids, 0)
    for i in range(params.max_new_tokens):
        token = sample(logits.float(), params, generator, seen)
        if len(stop):
            token = torch.where(finished, stop[0], token)
            finished |= torch.isin(token, stop)
        yield token
        if seen is not None:
            seen[torch.arange(B, device=device), token] = True
        if bool(finished.all()) or i == params.max_new_tokens - 1:
            return
        logits = step(token[:, None], T + i, decode_fn if decode_fn is not None else model)


def _virtual_tokens(model) -> int:
    """KV-cache slots taken by prompt-tuning virtual tokens (0 without lmforge.peft adapters)."""
    if not getattr(model, "lmforge_transforms", None):
        return 0
    from lmforge.peft import virtual_tokens

    return virtual_tokens(model)


def generate(model, input_ids, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop_token_ids: Sequence[int] | None = None, attention_mask: torch.Tensor | None = None,
             compile: bool = False) -> torch.Tensor:
    """New token ids [B, N]. `input_ids`: a [B, T] tensor (with optional attention_mask), a list of
    ids, or a list of lists of different lengths (left-padded here). Rows that stop early are
    filled with the stop token."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed,
                            stop_token_ids=list(stop_token_ids or []))
    decode_fn = compiled_decode(model) if compile else None
    tokens = list(stream_generate(model, input_ids, params, attention_mask, decode_fn))
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


def stream_text(model, tokenizer, prompt: str | list[int], params: SamplingParams, decode_fn=None) -> Iterator[str]:
    """Yield text pieces as they are generated (single prompt); honours stop strings and stop tokens.
    Text is held back while it could still be the start of a stop string or a partial UTF-8 char."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if tokenizer.eos_id is not None and tokenizer.eos_id not in params.stop_token_ids:
        params.stop_token_ids = list(params.stop_token_ids) + [tokenizer.eos_id]
    text = TextStream(tokenizer, params.stop_strings)  # the one text-out path (lmforge.tokenizer.text)
    for token in stream_generate(model, [ids], params, decode_fn=decode_fn):
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
