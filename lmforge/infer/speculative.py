"""Speculative decoding for one sequence: a cheap proposer guesses k tokens, the target checks them
all in one forward pass [1, k + 1], and rejection sampling (Leviathan et al. 2023; Chen et al. 2023)
keeps the output distributed exactly as the target's own sampling (greedy: identical tokens).

Proposers:
  DraftProposer(draft_model)  a smaller model with the same tokenizer; proposes by sampling its own
                              distribution q (same temperature/top-k/top-p as the request);
                              `vocab=` limits its head to a subset of ids (e.g. `frequent_tokens`)
  LookupProposer(max_ngram)   prompt lookup: find the latest earlier occurrence of the last n tokens
                              and propose what followed it (deterministic, no model; good when the
                              output copies from the input, e.g. edits and extraction)

They follow decode.Proposer; the verification (`verify`, `verify_greedy`) and the decode loop
are the one driver's, lmforge.infer.decode. A deterministic proposal is q = one-hot(x).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.common import LmforgeError
from lmforge.model import KVCache, Transformer
from lmforge.quant.kernel_linear import BlockLinear

from .decode import SpecStats, decode, verify, verify_greedy  # noqa: F401  (verify*: engine_spec's, re-exported)
from .fused_block import fuse_step
from .sampling import SamplingParams, probabilities


class NgramIndex:
    """The latest earlier start of every n-gram (n = 1..max_ngram) of a growing token list, updated
    as tokens come: a lookup costs a few dict probes, not a scan of the whole sequence per step (a
    scan per row made prompt lookup slower than plain decoding on long or non-repeating text)."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram
        self.seen: list[int] = []  # the tokens indexed so far
        self.latest: list[dict] = [{} for _ in range(max_ngram + 1)]  # [n] n-gram -> its latest start

    def update(self, tokens: list[int]) -> None:
        n_seen = len(self.seen)
        if len(tokens) < n_seen or tokens[:n_seen] != self.seen:  # not a continuation: start over
            self.__init__(self.max_ngram)
            n_seen = 0
        self.seen += tokens[n_seen:]
        L = len(tokens)
        for n in range(1, self.max_ngram + 1):
            # Starts up to L - n - 1: an n-gram followed by at least one token (the tail's own is not).
            for start in range(max(0, n_seen - n), L - n):
                self.latest[n][tuple(tokens[start : start + n])] = start

    def follow(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching tail."""
        self.update(tokens)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            start = self.latest[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start + n : start + n + k]
        return []


class LookupProposer:
    """Prompt-lookup drafting: match the longest recent n-gram (max_ngram down to 1) earlier in the
    sequence and propose the k tokens that followed it."""

    def __init__(self, max_ngram: int = 3):
        self.index = NgramIndex(max_ngram)

    def reset(self, prompt: list[int]) -> None:
        self.index = NgramIndex(self.index.max_ngram)

    def propose(self, tokens: list[int], k: int, params: SamplingParams, generator) -> tuple[list[int], None]:
        return self.index.follow(tokens, k), None

    def accepted(self, num_valid: int) -> None:
        pass


class SubVocabHead(nn.Module):
    """The rows of an output head for a subset of token ids: logits [..., N] over `ids` instead of
    [..., V]. Stored [hidden, N] contiguous (the layout CPU matrix-vector products read fastest)."""

    def __init__(self, head: nn.Module, ids: torch.Tensor):
        super().__init__()
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise LmforgeError(
                f"a draft vocabulary subset needs a plain output head with a [vocab, hidden] weight, not {type(head).__name__}"
            )
        self.in_features, self.out_features = weight.shape[1], len(ids)
        self.register_buffer("weight_t", weight.detach()[ids].t().contiguous())
        bias = getattr(head, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach()[ids].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight_t
        return out if self.bias is None else out + self.bias


def sub_head(head: nn.Module, ids: torch.Tensor) -> nn.Module:
    """The rows `ids` of an output head: a Q8_0/Q4_0 head keeps its blocks (each row's own: exact, and a
    quarter of the bytes of fp32), any other plain head becomes a `SubVocabHead`."""
    if isinstance(head, BlockLinear) and head.input_scale is None:
        rows = type(head)(head.in_features, len(ids), bias=head.bias is not None, device=head.qweight.device)
        rows.qweight.copy_(head.qweight[ids]), rows.scales.copy_(head.scales[ids])
        if head.bias is not None:
            rows.bias.data.copy_(head.bias.detach()[ids])
        return rows.eval().requires_grad_(False)
    return SubVocabHead(head, ids)


class SubVocabLM(nn.Module):
    """A causal LM whose head scores only `ids` (the draft's backbone is shared, not copied): a draft
    proposes from the tokens it is likely to be right about, and its head, the largest matrix of a
    one-layer draft over a large vocabulary, shrinks by V / N. Exactness does not depend on it: the
    target verifies every proposal, and ids outside the subset are simply never proposed."""

    def __init__(self, lm: nn.Module, ids):
        super().__init__()
        if not isinstance(lm, Transformer):
            raise LmforgeError(f"a draft vocabulary subset needs an lmforge Transformer, not {type(lm).__name__}")
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        V = lm.config.vocab_size
        if ids.numel() == 0 or ids.dim() != 1 or int(ids.min()) < 0 or int(ids.max()) >= V:
            raise LmforgeError(f"draft vocabulary subset: need 1..{V} token ids in [0, {V}), got {ids.numel()}")
        if len(set(ids.tolist())) != ids.numel():
            raise LmforgeError("draft vocabulary subset: token ids repeat")
        self.config, self.model = lm.config, lm.model
        self.lm_head = sub_head(lm.lm_head, ids)
        self.register_buffer("ids", ids.to(next(self.lm_head.buffers()).device))

    # The Transformer's own forward (embeddings, blocks, norm, softcap) with this module's head.
    forward = Transformer.forward


def frequent_tokens(counts: torch.Tensor, n: int) -> list[int]:
    """The n most frequent token ids given per-id counts [V] (ties: lower id first), for a draft's
    vocabulary subset. n >= V keeps every id."""
    order = torch.sort(torch.as_tensor(counts), descending=True, stable=True).indices
    return order[: max(1, n)].tolist()


class DraftProposer:
    """A small draft model with its own static KV cache, rolled back after each verification.

    min_confidence > 0 stops drafting early when the draft's probability of its own next token falls
    below it (after at least one token): unsure guesses are mostly rejected, and each costs a draft
    forward plus a verified position. With it, k is an upper bound rather than a fixed length.
    vocab: token ids the draft may propose (None: all); its head then scores only those (SubVocabLM),
    which makes each draft forward cheaper; q is still a distribution over the whole vocabulary (0
    outside the subset), so sampled output keeps the target's distribution."""

    def __init__(self, draft, max_len: int, min_confidence: float = 0.0, vocab=None):
        self.draft, self.max_len, self.min_confidence = draft.eval(), max_len, min_confidence
        self.vocab_size = None if vocab is None else draft.config.vocab_size
        if vocab is not None and len(vocab) < self.vocab_size:
            self.draft = SubVocabLM(draft, vocab).eval()
            fuse_step(self.draft, (SubVocabHead,))  # the one-call C step, when the draft's blocks have it
        self.ids = getattr(self.draft, "ids", None)  # head row -> token id (None: the identity)
        self.cache: KVCache | None = None
        self.valid = 0  # tokens whose keys/values in the draft cache are right

    def reset(self, prompt: list[int]) -> None:
        self.cache = KVCache.for_model(self.draft, 1, self.max_len)
        self.valid = 0

    def propose(self, tokens: list[int], k: int, params: SamplingParams, generator) -> tuple[list[int], torch.Tensor]:
        pending = tokens[self.valid :]
        fused = getattr(self.draft, "_lmforge_propose", None)  # greedy drafting in one C call (fused_block)
        result = fused(pending, self.cache, self.valid, k, self.min_confidence) if fused and params.greedy else None
        if result is not None:
            drafts, fed = result
            self.valid += fed
            return drafts, None
        device = next(self.draft.parameters()).device
        drafts, qs = [], []
        for _ in range(k):
            ids = torch.tensor([pending], device=device)
            logits = self.draft(ids, kv_cache=self.cache, start_pos=self.valid, logits_to_keep=1)[0, -1]
            self.valid += len(pending)
            if params.greedy:  # deterministic proposal: no distribution needed (q = one-hot)
                x = int(logits.argmax())
                confidence = float(logits.float().softmax(-1)[x]) if self.min_confidence > 0 else 1.0
            else:
                q = probabilities(logits.float()[None], params)[0]
                x = int(torch.multinomial(q, 1, generator=generator))
                confidence = float(q[x])
                if self.ids is not None:  # over the whole vocabulary: 0 outside the subset
                    q = q.new_zeros(self.vocab_size).index_copy_(0, self.ids, q)
            if self.ids is not None:
                x = int(self.ids[x])
            if drafts and confidence < self.min_confidence:
                break  # the cache holds what was fed; this token is simply not proposed
            if not params.greedy:
                qs.append(q)
            drafts.append(x)
            pending = [x]
        return drafts, (torch.stack(qs) if qs else None)

    def accepted(self, num_valid: int) -> None:
        """num_valid: length of the sequence prefix that is still correct (the cache beyond is stale)."""
        self.valid = min(self.valid, num_valid)


def speculative_generate(
    target, prompt_ids: list[int], params: SamplingParams, proposer, k: int = 4, eos_token_ids: list[int] | None = None
) -> tuple[list[int], SpecStats]:
    """New token ids for one prompt, and the acceptance statistics (`decode` with a proposer)."""
    stats = SpecStats()
    out = [
        int(t)
        for t in decode(
            target, params, list(prompt_ids), proposer=proposer, k=k, eos_token_ids=eos_token_ids or (), stats=stats
        )
    ]
    return out, stats
