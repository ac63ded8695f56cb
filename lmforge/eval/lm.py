"""What the tasks score: a local lmforge model or an OpenAI-compatible endpoint, behind the three
requests lm-evaluation-harness also uses.

    loglikelihood([(context, continuation), ...]) -> [(sum log p(continuation | context), is_greedy)]
    loglikelihood_rolling([text, ...])             -> [sum log p(text)]  (every token scored)
    generate([prompt, ...], max_new_tokens, stop)  -> [completion text]

Requests sharing a context (the choices of a multiple-choice question) are scored together: the
context is prefilled once into a `KVCache`, the cache rows are copied for every choice, and all
continuations run as one right-padded batch on top of it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError, get_device
from lmforge.model import KVCache
from lmforge.peft import virtual_tokens  # prompt-tuning tokens take cache slots too
from lmforge.tokenizer.text import TextStream, cut_at_stop, end_of_turn_ids  # the one text-out path


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation, the continuation's
    ids are what the joint encoding adds after the context's ids (BPE merges across the seam)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


@dataclass
class LocalLM:
    """An lmforge model + its tokenizer. `max_length` defaults to the model's context size."""

    model: torch.nn.Module
    tokenizer: object
    batch_size: int = 8
    max_length: int | None = None
    name: str = "model"

    def __post_init__(self) -> None:
        limit = self.model.config.max_position_embeddings
        self.max_length = min(self.max_length or limit, limit)  # never past the positions the model has
        self.device = next(self.model.parameters()).device
        tok = self.tokenizer
        self.prefix_id = tok.bos_id if tok.bos_id is not None else tok.eos_id
        if self.prefix_id is None:
            raise LmforgeError("the tokenizer has neither a bos nor an eos token to start a text with")

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, dtype: str | None = None, **kw) -> LocalLM:
        from lmforge.checkpoint import load_model, load_tokenizer_if_any

        model = load_model(path, device=get_device(device), dtype=dtype)
        tokenizer = load_tokenizer_if_any(path)
        if tokenizer is None:
            raise LmforgeError(f"{path}: no tokenizer.json next to the model; evaluation needs the model's tokenizer")
        return cls(model, tokenizer, name=kw.pop("name", "/".join(Path(path).resolve().parts[-2:])), **kw)

    # ------------------------------------------------------------------ log-likelihood

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        # Group by context (choices of one question arrive together) so each context is prefilled once.
        order = sorted(range(len(requests)), key=lambda i: requests[i][0])
        for context, group in itertools.groupby(order, key=lambda i: requests[i][0]):
            idx = list(group)
            pairs = [encode_pair(self.tokenizer, context, requests[i][1]) for i in idx]
            ctx_ids = pairs[0][0]  # the same for every request of the group: same (stripped) context
            for start in range(0, len(idx), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                for i, r in zip(idx[chunk], self.score_choices(ctx_ids, [p[1] for p in pairs[chunk]])):
                    out[i] = r
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def score_choices(self, ctx_ids: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """Log-probabilities of several continuations of one context, sharing the context's KV cache."""
        if any(len(c) == 0 for c in conts):
            raise LmforgeError("a continuation encodes to no tokens (empty answer choice?)")
        longest = max(len(c) for c in conts)
        ctx_ids = [self.prefix_id] + list(ctx_ids) if not ctx_ids else list(ctx_ids)
        ctx_ids = ctx_ids[-max(1, self.max_length - longest) :]  # keep the end of a long context
        B, P = len(conts), len(ctx_ids)
        cache = KVCache.for_model(self.model, 1, P + longest + virtual_tokens(self.model))
        last = self.model(torch.tensor([ctx_ids], device=self.device), kv_cache=cache, start_pos=0, logits_to_keep=1)[
            :, -1
        ]  # [1, V] predicts the first continuation token
        cache.select_rows(torch.zeros(B, dtype=torch.long, device=self.device))  # B copies of the prefix
        tokens = torch.zeros(B, longest, dtype=torch.long, device=self.device)
        for i, c in enumerate(conts):
            tokens[i, : len(c)] = torch.tensor(c)
        # Right padding: pads sit after every real token so causal attention never lets them in.
        logits = self.model(tokens[:, :-1], kv_cache=cache, start_pos=P) if longest > 1 else None
        steps = last.expand(B, -1)[:, None] if logits is None else torch.cat([last.expand(B, -1)[:, None], logits], 1)
        logp = F.log_softmax(steps.float(), dim=-1)  # [B, longest, V]
        picked = logp.gather(-1, tokens[..., None])[..., 0]
        greedy = logp.argmax(-1) == tokens
        results = []
        for i, c in enumerate(conts):
            n = len(c)
            results.append((float(picked[i, :n].sum()), bool(greedy[i, :n].all())))
        return results

    def loglikelihood_rolling(self, texts: Sequence[str], stride: int | None = None) -> list[float]:
        from lmforge.eval.perplexity import token_nll

        return [
            -token_nll(self.model, self.tokenizer.encode(t), self.prefix_id, self.max_length, stride, self.batch_size)[
                0
            ]
            for t in texts
        ]

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
    ) -> list[str]:
        """Batched left-padded generation; a batch ends early once every row has hit EOS or a stop string."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            batch = [self.tokenizer.encode(p) or [self.prefix_id] for p in prompts[start : start + self.batch_size]]
            # Keep the end of a prompt that would not leave room for the answer.
            batch = [ids[-max(1, self.max_length - max_new_tokens) :] for ids in batch]
            out += self._generate_batch(
                batch, max_new_tokens, stop, temperature, None if seed is None else seed + start, repetition_penalty
            )
        return out

    def _generate_batch(
        self,
        batch: list[list[int]],
        max_new_tokens: int,
        stop: Sequence[str],
        temperature: float,
        seed: int | None,
        repetition_penalty: float = 1.0,
    ) -> list[str]:
        from lmforge.infer.generate import stream_generate
        from lmforge.infer.sampling import SamplingParams

        ends = set(end_of_turn_ids(self.tokenizer))  # EOS, and the chat template's end of turn
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            stop_token_ids=sorted(ends),
            repetition_penalty=repetition_penalty,
        )
        texts = [TextStream(self.tokenizer, stop) for _ in batch]
        done = [False] * len(batch)
        for token in stream_generate(self.model, batch, params):
            for i, t in enumerate(token.tolist()):
                if not done[i]:
                    done[i] = t in ends
                    if not done[i]:
                        texts[i].push([t])
                        done[i] = texts[i].stopped
            if all(done):
                break
        for t in texts:
            t.flush()
        return [t.text for t in texts]


class EndpointLM:
    """An OpenAI-compatible server (`/v1/completions`). Log-likelihoods use the legacy
    `echo=True, logprobs=1, max_tokens=0` request (as lm-eval's local-completions does), which the
    server must support; generation only needs plain completions. `model="default"` takes the
    first model the server lists."""

    def __init__(
        self, base_url: str, model: str = "default", api_key: str = "EMPTY", timeout: float = 120.0, chat: bool = False
    ) -> None:
        from openai import OpenAI

        base_url = base_url.rstrip("/")
        self.url, self.chat = base_url, chat
        self.client = OpenAI(
            base_url=base_url if base_url.endswith("/v1") else base_url + "/v1",
            api_key=api_key,
            timeout=timeout,
            max_retries=1,
        )
        if model == "default":
            models = self._call(lambda: self.client.models.list().data, "listing models")
            if not models:
                raise LmforgeError(f"{base_url}: the endpoint serves no models")
            model = models[0].id
        self.model_id = self.name = model

    def _call(self, fn, what: str):
        """Run a request; the endpoint's refusals and connection failures become LmforgeErrors."""
        import openai

        try:
            return fn()
        except openai.APIStatusError as e:
            raise LmforgeError(f"{self.url}: the endpoint refused {what} (HTTP {e.status_code}): {e.message}") from None
        except openai.APIConnectionError as e:
            raise LmforgeError(f"{self.url}: cannot reach the endpoint ({e.__class__.__name__})") from None

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
    ) -> list[str]:
        out = []
        for p in prompts:
            kw = dict(
                model=self.model_id,
                max_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
                stop=list(stop)[:4] or None,
            )  # OpenAI accepts at most 4 stop strings; the rest cut below
            if repetition_penalty != 1.0:  # not an OpenAI field: lmforge serve and vLLM read it from the body
                kw["extra_body"] = {"repetition_penalty": repetition_penalty}
            if self.chat:
                r = self._call(
                    lambda: self.client.chat.completions.create(messages=[{"role": "user", "content": p}], **kw),
                    "a chat completion",
                )
                text = r.choices[0].message.content or ""
            else:
                text = (
                    self._call(lambda: self.client.completions.create(prompt=p, **kw), "a completion").choices[0].text
                )
            out.append(cut_at_stop(text, stop))
        return out

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        out = []
        what = "an echo=True logprobs request (log-likelihood tasks need prompt logprobs)"
        for context, continuation in requests:
            r = self._call(
                lambda: self.client.completions.create(
                    model=self.model_id,
                    prompt=context + continuation,
                    echo=True,
                    max_tokens=0,
                    logprobs=1,
                    temperature=0.0,
                ),
                what,
            )
            lp = r.choices[0].logprobs
            if lp is None or not lp.text_offset:
                raise LmforgeError(
                    f"{self.url}: the endpoint returned no prompt logprobs (echo=True is needed "
                    "for log-likelihood tasks)"
                )
            first = next(i for i, off in enumerate(lp.text_offset) if off >= len(context))
            tokens = lp.token_logprobs[first:]
            tops = (lp.top_logprobs or [None] * len(lp.token_logprobs))[first:]
            # The text's first token has no log-probability (nothing predicts it): skipped.
            greedy = all(max(top.values()) <= t + 1e-6 for t, top in zip(tokens, tops) if top and t is not None)
            out.append((float(sum(t for t in tokens if t is not None)), greedy))
        return out

    def loglikelihood_rolling(self, texts: Sequence[str], stride: int | None = None) -> list[float]:
        return [self.loglikelihood([("", t)])[0][0] for t in texts]


def load_lm(
    spec: str,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 8,
    endpoint_model: str = "default",
    max_length: int | None = None,
) -> LocalLM | EndpointLM:
    """A model folder -> LocalLM; an http(s) URL -> EndpointLM. `max_length`: the scoring window
    (None: the model's max_position_embeddings; a model trained on shorter sequences scores better
    with its training length)."""
    if spec.startswith(("http://", "https://")):
        return EndpointLM(spec, model=endpoint_model)
    return LocalLM.load(
        spec, device=device, dtype=dtype, batch_size=batch_size, max_length=int(max_length) if max_length else None
    )
