"""An lmforge bi-encoder: one encoder embeds both queries and passages (mean pooling, a projection, unit
length), trained contrastively with CLIP's symmetric InfoNCE loss (`lmforge.multimodal.info_nce`,
learnable temperature) on (query, passage) pairs: in a batch of B pairs each query's passage is its
positive and the other B - 1 passages are its negatives.

Two encoders: `num_hidden_layers: 0` (the default) is a static model, the mean of learned token
embeddings (as model2vec / static sentence-transformers); >= 1 is a small bidirectional lmforge
Transformer. On a CPU the static one trains orders of magnitude faster per step, and on the built-in
set it is the better retriever at any budget we could afford (README, "Retrieval-augmented answers").
E5-style prefixes ("query: " / "passage: ") let the one encoder treat the two sides differently.

    enc = train_biencoder(pairs, "runs/rag-encoder", BiEncoderConfig(steps=400))
    enc = BiEncoder.load("runs/rag-encoder"); vectors = enc.embed(["def f(x): ..."])
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.common import LmforgeError, atomic_dir, atomic_write_json, get_logger, read_json, seed_everything
from lmforge.model import ModelConfig, Transformer
from lmforge.multimodal import info_nce, same_text_targets
from lmforge.rag.dense import mean_pool
from lmforge.rag.features import term_features, text_features
from lmforge.rag.terms import terms
from lmforge.tokenizer import load_tokenizer, train_tokenizer

log = get_logger("lmforge.rag")
PREFIX = {"query": "query: ", "passage": "passage: "}


@dataclass
class BiEncoderConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 0  # 0: static (mean of token embeddings); >= 1: a bidirectional Transformer
    num_attention_heads: int = 4
    intermediate_size: int = 704
    projection_dim: int = 256
    max_length: int = 256  # tokens per text (a passage's head holds its title and first lines)
    steps: int = 400
    batch_size: int = 128  # in-batch negatives: more is a harder, better contrast
    lr: float = 1e-2
    # "terms": the encoder reads the BM25 terms (lower-cased, identifiers split: `json.dumps` and
    # `def dumps(` give the same tokens, which byte-level BPE alone would not); "raw": the text as is;
    # "trigrams": hashed words and letter trigrams of the terms (DSSM, features.py; no tokenizer)
    text: str = "terms"
    buckets: int = 1 << 16  # hashed feature rows ("trigrams" only; replaces vocab_size)
    weight_decay: float = 0.01
    seed: int = 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.rows(),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            max_position_embeddings=self.max_length,
            causal=False,  # an encoder: every token sees the whole text
        )

    def rows(self) -> int:
        """Rows of the input embedding table: hashed buckets or the tokenizer's vocabulary."""
        return self.buckets if self.text == "trigrams" else self.vocab_size


class BiEncoderModel(nn.Module):
    def __init__(self, cfg: BiEncoderConfig) -> None:
        super().__init__()
        if cfg.num_hidden_layers:
            self.encoder = Transformer(cfg.model_config())
        else:  # static: mean of learned token embeddings (no attention), orders of magnitude cheaper to train
            self.embed_tokens = nn.Embedding(cfg.rows(), cfg.hidden_size)
            nn.init.normal_(self.embed_tokens.weight, std=0.02)
        self.projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "embed_tokens"):  # the same mean as mean_pool, without a [B, T, H] tensor (5x faster)
            # the real tokens as one flat list with row offsets (no padding: mode "mean" without per-sample
            # weights has a backward 8x cheaper); sparse gradients touch this batch's rows only (SparseAdam)
            keep = mask.bool()
            offsets = torch.cat([keep.new_zeros(1, dtype=torch.long), keep.sum(1).cumsum(0)[:-1]])
            pooled = F.embedding_bag(ids[keep], self.embed_tokens.weight, offsets, mode="mean", sparse=True)
        else:
            _, hidden = self.encoder(ids, attention_mask=mask, logits_to_keep=1, return_hidden=True)
            pooled = mean_pool(hidden, mask)
        return F.normalize(self.projection(pooled), dim=-1)


class BiEncoder:
    """A trained bi-encoder and its tokenizer, as an `Embedder` (dense.py)."""

    def __init__(self, model: BiEncoderModel, tokenizer, cfg: BiEncoderConfig, name: str = "biencoder") -> None:
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, cfg
        self.name, self.dim = f"lmforge:{name}", cfg.projection_dim

    def prepare(self, text: str, kind: str) -> str:
        if kind not in PREFIX:
            raise LmforgeError(f"embedding kind must be 'query' or 'passage', got {kind!r}")
        return PREFIX[kind] + (" ".join(terms(text, "bigram")) if self.cfg.text == "terms" else text)

    def ids(self, texts: list[str], kind: str) -> list[list[int]]:
        """Input ids of each text: hashed features ("trigrams") or the tokenizer's tokens."""
        if self.cfg.text == "trigrams":
            if kind not in PREFIX:
                raise LmforgeError(f"embedding kind must be 'query' or 'passage', got {kind!r}")
            # one feature marks the side (as the E5 prefix does for tokens): the encoder may treat them apart
            side = term_features(f"{kind}:", self.cfg.buckets)[:1]
            return [side + text_features(t, self.cfg.buckets, self.cfg.max_length) for t in texts]
        prepared = [self.prepare(t, kind) for t in texts]
        return [x[: self.cfg.max_length] or [0] for x in self.tokenizer.encode_batch(prepared)]

    def batch(
        self, texts: list[str], kind: str, ids: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = ids if ids is not None else self.ids(texts, kind)
        width = max(len(x) for x in ids)
        pad = (self.tokenizer.pad_id or 0) if self.tokenizer is not None else 0
        tensor = np.full((len(ids), width), pad, dtype=np.int64)
        for row, x in zip(tensor, ids):  # a row copy each (padding in Python lists cost more than the step)
            row[: len(x)] = x
        lengths = torch.tensor([len(x) for x in ids])
        return torch.from_numpy(tensor), (torch.arange(width) < lengths[:, None]).long()

    def embed(self, texts: list[str], kind: str = "passage", batch_size: int = 64) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                out.append(self.model(*self.batch(texts[i : i + batch_size], kind)).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def save(self, folder: str | Path, extra: dict[str, dict] | None = None) -> None:
        """Weights, config, tokenizer and the `extra` JSON files (name -> content), as one atomic folder."""
        from safetensors.torch import save_file

        with atomic_dir(folder) as tmp:
            for name, content in (extra or {}).items():
                atomic_write_json(tmp / name, content)
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(tmp / "model.safetensors"))
            if self.tokenizer is not None:  # "trigrams" hashes its features: no tokenizer
                self.tokenizer.save(tmp / "tokenizer")
            atomic_write_json(tmp / "biencoder.json", asdict(self.cfg))

    @classmethod
    def load(cls, folder: str | Path) -> BiEncoder:
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = BiEncoderConfig(**read_json(folder / "biencoder.json", "bi-encoder config"))
        model = BiEncoderModel(cfg)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        tokenizer = None if cfg.text == "trigrams" else load_tokenizer(folder / "tokenizer")
        return cls(model, tokenizer, cfg, folder.name)


def train_biencoder(
    pairs: list[tuple[str, ...]], out: str | Path | None, cfg: BiEncoderConfig, on_eval=None, eval_every: int = 0
) -> BiEncoder:
    """Contrastive training on (query, passage) pairs, or (query, passage, hard negative) triples: a hard
    negative (a passage BM25 ranks high that does not answer, as in DPR) joins the in-batch negatives as
    an extra column. Saved to `out` (atomically) when given. `on_eval(encoder, step)`, every `eval_every`
    steps and at the end, may score a dev split; the best-scoring weights are the ones kept."""
    if len(pairs) < 2:
        raise LmforgeError(f"contrastive training needs at least 2 (query, passage) pairs, got {len(pairs)}")
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    if cfg.text not in ("terms", "raw", "trigrams"):
        raise LmforgeError(f"bi-encoder text must be 'terms', 'raw' or 'trigrams', got {cfg.text!r}")
    tokenizer = None
    if cfg.text != "trigrams":
        probe = BiEncoder(nn.Module(), None, cfg)  # its prepare() only: the tokenizer learns what the encoder reads
        texts = [probe.prepare(q, "query") for q, *_ in pairs] + [probe.prepare(p[1], "passage") for p in pairs]
        tokenizer = train_tokenizer(texts, cfg.vocab_size)
        cfg.vocab_size = tokenizer.vocab_size
    model = BiEncoderModel(cfg)
    encoder = BiEncoder(model, tokenizer, cfg)
    # every text is featurised once (a passage recurs in many batches; tokenising it anew each step
    # cost more than the step itself)
    cache: dict[tuple[str, str], list[int]] = {}

    def ids(texts: list[str], kind: str) -> list[list[int]]:
        todo = [t for t in dict.fromkeys(texts) if (kind, t) not in cache]
        for t, x in zip(todo, encoder.ids(todo, kind) if todo else []):
            cache[kind, t] = x
        return [cache[kind, t] for t in texts]

    table = [model.embed_tokens.weight] if hasattr(model, "embed_tokens") else []
    dense = [p for p in model.parameters() if all(p is not t for t in table)]
    opts = [torch.optim.AdamW(dense, lr=cfg.lr, weight_decay=cfg.weight_decay)]
    opts += [torch.optim.SparseAdam(table, lr=cfg.lr)] if table else []
    rng = random.Random(cfg.seed)
    order: list[int] = []
    bs = min(cfg.batch_size, len(pairs))
    best: tuple[float, dict] | None = None
    model.train()
    for step in range(cfg.steps):
        if len(order) < bs:
            order += rng.sample(range(len(pairs)), len(pairs))
        batch, order = [pairs[i] for i in order[:bs]], order[bs:]
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.steps // 10))  # warmup, then cosine to 10%
        lr *= 0.55 + 0.45 * math.cos(math.pi * step / cfg.steps) if step >= cfg.steps // 10 else 1.0
        for g in (g for opt in opts for g in opt.param_groups):
            g["lr"] = lr
        queries = [b[0] for b in batch]
        passages = [b[1] for b in batch] + [b[2] for b in batch if len(b) > 2]
        q = model(*encoder.batch(queries, "query", ids(queries, "query")))
        p = model(*encoder.batch(passages, "passage", ids(passages, "passage")))
        # Two queries may share a passage (same chunk): soft targets keep them from being pushed apart.
        targets = same_text_targets([b[1] for b in batch], passages)
        loss = info_nce(model.logit_scale.clamp(max=math.log(100)).exp() * q @ p.T, targets)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense, 1.0)  # the sparse table's gradient is not clipped (norm of sparse)
        for opt in opts:
            opt.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info(
                "bi-encoder step %d/%d: loss %.3f (%.0f s)", step + 1, cfg.steps, loss.item(), time.perf_counter() - t0
            )
        if on_eval is not None and ((eval_every and (step + 1) % eval_every == 0) or step == cfg.steps - 1):
            model.eval()
            score = on_eval(encoder, step + 1)
            model.train()
            if best is None or score > best[0]:
                best = (score, {k: v.detach().clone() for k, v in model.state_dict().items()})
    if best is not None:
        model.load_state_dict(best[1])
    model.eval()
    if out is not None:
        encoder.save(out)
        encoder.name = f"lmforge:{Path(out).name}"
    return encoder
