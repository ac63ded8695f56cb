"""Training objectives: each turns a batch of token windows into model inputs and position-aligned
labels (IGNORE where no loss is taken), so one loss function serves all of them.

* CLM: next-token prediction, labels are the inputs shifted left.
* MLM (BERT): 15% of tokens are chosen; of those 80% become the mask token, 10% a random token,
  10% stay as they are; the loss is on the chosen positions only. Needs `causal=False` in the model.
* Span corruption (T5): noise spans (density 0.15, mean length 3) are replaced by sentinels in the
  input; the targets list each sentinel followed by the tokens it hid. Trained as a prefix LM on
  [inputs ; targets]: bidirectional attention over the inputs, causal over the targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError

IGNORE = -100
OBJECTIVES = ("clm", "mlm", "span")


def clm_batch(windows: torch.Tensor) -> dict:
    """windows [B, T+1] -> input_ids [B, T], labels [B, T] (the next token at each position)."""
    return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}


# ----------------------------------------------------------------------------- masked LM


def apply_mlm(
    tokens: torch.Tensor, selected: torch.Tensor, action: torch.Tensor, random_tokens: torch.Tensor, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic half of MLM, so it can be checked by hand.

    selected: bool, positions that get a loss. action: 0 -> mask token, 1 -> random token, 2 -> keep.
    """
    inputs = tokens.clone()
    inputs[selected & (action == 0)] = mask_id
    use_random = selected & (action == 1)
    inputs[use_random] = random_tokens[use_random]
    labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE))
    return inputs, labels


def mlm_batch(
    tokens: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    prob: float = 0.15,
    special_ids: tuple[int, ...] = (),
) -> dict:
    """tokens [B, T] -> BERT-style masked inputs and labels on the chosen 15%."""
    u = torch.rand(tokens.shape, generator=generator)
    selected = u < prob
    for i in special_ids:  # never ask the model to predict a document separator
        selected &= tokens != i
    v = torch.rand(tokens.shape, generator=generator)
    action = torch.where(v < 0.8, 0, torch.where(v < 0.9, 1, 2))
    random_tokens = torch.randint(0, vocab_size, tokens.shape, generator=generator)
    inputs, labels = apply_mlm(tokens, selected, action, random_tokens, mask_id)
    return {"input_ids": inputs, "labels": labels}


# ----------------------------------------------------------------------------- span corruption


def span_lengths(length: int, density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(noise tokens, spans) for a window of `length` tokens, as T5 computes them."""
    num_noise = min(max(int(round(length * density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    return num_noise, num_spans


def _random_segmentation(total: int, segments: int, generator: torch.Generator) -> torch.Tensor:
    """Split `total` items into `segments` non-empty runs at random; returns the run lengths."""
    cuts = torch.randperm(total - 1, generator=generator)[: segments - 1] + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values, torch.tensor([total])])
    return bounds.diff()


def random_spans_noise_mask(
    length: int, generator: torch.Generator, density: float = 0.15, mean_span: float = 3.0
) -> torch.Tensor:
    """bool [length]: alternating clean and noise runs, clean first (T5's random_spans_noise_mask)."""
    num_noise, num_spans = span_lengths(length, density, mean_span)
    noise = _random_segmentation(num_noise, num_spans, generator)
    clean = _random_segmentation(length - num_noise, num_spans, generator)
    runs = torch.stack([clean, noise], dim=1).flatten()
    is_noise = torch.tensor([False, True]).repeat(num_spans)
    return is_noise.repeat_interleave(runs)


def _replace_spans(tokens: torch.Tensor, mask: torch.Tensor, sentinels: list[int]) -> torch.Tensor:
    """Drop the masked tokens, putting sentinel i where the i-th masked run started."""
    starts = mask.clone()
    starts[1:] &= ~mask[:-1]
    if int(starts.sum()) > len(sentinels):
        raise ValueError(f"{int(starts.sum())} noise spans but only {len(sentinels)} sentinels")
    sentinel = torch.tensor(sentinels, dtype=tokens.dtype)[(starts.cumsum(0) - 1).clamp(min=0)]
    return torch.where(starts, sentinel, tokens)[~mask | starts]


def corrupt_spans(
    tokens: torch.Tensor, noise_mask: torch.Tensor, sentinels: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [L], noise_mask [L] (starting with a clean token) -> (inputs, targets).

    inputs: each noise span replaced by the next sentinel. targets: each sentinel followed by the
    tokens its span hid. E.g. tokens a b c d e, noise on b c and e, sentinels X Y:
    inputs a X d Y, targets X b c Y e. As in T5, the targets are the clean runs replaced by the
    same sentinels, which lines up because clean and noise runs alternate, clean first.
    """
    if noise_mask[0]:
        raise ValueError("noise_mask must start with a clean token")
    return _replace_spans(tokens, noise_mask, sentinels), _replace_spans(tokens, ~noise_mask, sentinels)


def prefix_lm_mask(prefix_len: int, total_len: int, device=None) -> torch.Tensor:
    """bool [1, 1, T, T]: every position sees the whole prefix; later positions are causal."""
    q = torch.arange(total_len, device=device)[:, None]
    k = torch.arange(total_len, device=device)[None, :]
    return ((k < prefix_len) | (k <= q))[None, None]


def span_batch(
    tokens: torch.Tensor,
    sentinels: list[int],
    generator: torch.Generator,
    density: float = 0.15,
    mean_span: float = 3.0,
) -> dict:
    """tokens [B, L] -> prefix-LM batch over [inputs ; targets] with loss on the targets only.

    All rows have the same input and target lengths (they depend only on L), so the attention
    mask [1, 1, S, S] is shared by the batch.
    """
    rows = []
    for row in tokens:
        mask = random_spans_noise_mask(row.numel(), generator, density, mean_span)
        inputs, targets = corrupt_spans(row, mask, sentinels)
        rows.append(torch.cat([inputs, targets]))
    seq = torch.stack(rows)
    n_in = seq.shape[1] - sum(span_lengths(tokens.shape[1], density, mean_span))
    labels = seq[:, 1:].clone()
    labels[:, : n_in - 1] = IGNORE  # the last input position predicts the first target token
    return {"input_ids": seq[:, :-1], "labels": labels, "attn_mask": prefix_lm_mask(n_in, seq.shape[1] - 1)}


# ----------------------------------------------------------------------------- loss


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over labelled positions, number of labelled positions), fp32 math."""
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((labels != IGNORE).sum())


# ----------------------------------------------------------------------------- dispatch


class ObjectiveTokens:
    """Extra ids an objective needs beyond the tokenizer's vocabulary: MLM's mask token, T5's
    sentinels (taken from the top of the model vocabulary, as T5's extra_ids are)."""

    def __init__(self, objective: str, tokenizer_vocab: int, eos_id: int | None, num_sentinels: int = 100) -> None:
        if objective not in OBJECTIVES:
            raise LmforgeError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
        self.objective, self.eos_id = objective, eos_id
        extra = {"clm": 0, "mlm": 1, "span": num_sentinels}[objective]
        self.model_vocab = tokenizer_vocab + extra
        self.mask_id = tokenizer_vocab if objective == "mlm" else None
        self.sentinels = [self.model_vocab - 1 - i for i in range(extra)] if objective == "span" else []
        self.tokenizer_vocab = tokenizer_vocab

    def batch(self, windows: torch.Tensor, generator: torch.Generator) -> dict:
        """windows [B, T+1] -> the objective's model inputs and labels."""
        if self.objective == "clm":
            return clm_batch(windows)
        if self.objective == "mlm":
            special = (self.eos_id,) if self.eos_id is not None else ()
            return mlm_batch(windows[:, :-1], self.mask_id, self.tokenizer_vocab, generator, special_ids=special)
        return span_batch(windows, self.sentinels, generator)


def batch_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """Masking randomness as a pure function of the position, so resuming needs no RNG state."""
    return torch.Generator().manual_seed(hash((seed, step, micro, rank)) & 0x7FFF_FFFF_FFFF)
