"""Medusa (Cai et al. 2024): extra decoding heads on a frozen base guess tokens t+2, t+3, ... from
the last hidden state, and one forward pass verifies a whole tree of guesses.

Head k is a residual block x + SiLU(W_k x) (W_k zero-initialised, so a fresh head equals the base
model's next-token head) followed by the base model's own lm_head. Training (`lmforge
train-medusa`) fits head k to predict the token k + 1 places ahead with the base frozen.

Tree verification (greedy): the root is the base model's next token; each tree level d adds the
top choices[d] guesses of head d under every node of the level above. All tree tokens go through
the model at once with a mask that lets each node see the context and its own ancestors only,
positions = context length + depth. The longest path whose every token equals the base model's
argmax at its parent is accepted, its keys/values are moved to consecutive cache slots, and the
base prediction after its last node is the next root. Output is identical to plain greedy.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError, atomic_path, atomic_write_json, read_json
from lmforge.model import KVCache

from .sampling import SamplingParams
from .speculative import SpecStats

CONFIG_FILE, WEIGHTS_FILE = "medusa_config.json", "medusa_heads.safetensors"


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int = 3, num_layers: int = 1):
        super().__init__()
        self.hidden_size, self.num_heads, self.num_layers = hidden_size, num_heads, num_layers
        self.heads = nn.ModuleList(nn.Sequential(*[ResBlock(hidden_size) for _ in range(num_layers)])
                                   for _ in range(num_heads))

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """hidden [..., H] (the base model's final normed hidden) -> logits [K, ..., V]."""
        return torch.stack([lm_head(head(hidden)) for head in self.heads])


def medusa_loss(model, heads: MedusaHeads, input_ids: torch.Tensor,
                decay: float = 0.8) -> tuple[torch.Tensor, list[float]]:
    """Weighted CE of every head (head k predicts token t + k + 2 from hidden t; weight decay**k),
    with the base frozen. Returns (loss, top-1 accuracy per head)."""
    with torch.no_grad():
        _, hidden = model(input_ids, return_hidden=True)
    total, accs = 0.0, []
    for k, head in enumerate(heads.heads):
        shift = k + 2
        logits = model.lm_head(head(hidden[:, :-shift]))
        target = input_ids[:, shift:]
        total = total + decay ** k * F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        accs.append(float((logits.argmax(-1) == target).float().mean()))
    return total, accs


def save_medusa(heads: MedusaHeads, out_dir: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}, str(tmp))
    atomic_write_json(out / CONFIG_FILE, dict(hidden_size=heads.hidden_size, num_heads=heads.num_heads,
                                             num_layers=heads.num_layers, **(extra or {})))
    return out


def load_medusa(path: str | Path, device=None) -> MedusaHeads:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise LmforgeError(f"{path} is not a Medusa heads folder (no {CONFIG_FILE}; "
                           "make one with `lmforge train-medusa`)")
    cfg = read_json(path / CONFIG_FILE, "Medusa config")
    heads = MedusaHeads(cfg["hidden_size"], cfg["num_heads"], cfg.get("num_layers", 1))
    heads.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return heads.to(device).eval()


def build_tree(choices: tuple[int, ...]) -> tuple[list[int], list[int], list[int]]:
    """Tree of guesses: node 0 is the root; returns (parent, depth, rank within its head's top-k) per node,
    in breadth-first order so a parent always comes before its children."""
    parent, depth, rank = [-1], [0], [0]
    level = [0]
    for d, width in enumerate(choices, start=1):
        nxt = []
        for p in level:
            for r in range(width):
                parent.append(p)
                depth.append(d)
                rank.append(r)
                nxt.append(len(parent) - 1)
        level = nxt
    return parent, depth, rank


def _ancestor_mask(parent: list[int]) -> torch.Tensor:
    n = len(parent)
    mask = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        mask[i] |= mask[parent[i]]
    return mask


@torch.inference_mode()
def medusa_generate(model, heads: MedusaHeads, prompt_ids: list[int], params: SamplingParams,
                    choices: tuple[int, ...] | None = None, eos_token_ids: list[int] | None = None
                    ) -> tuple[list[int], SpecStats]:
    """Greedy decoding with Medusa tree verification; identical tokens to plain greedy. `choices`:
    top-k per tree level (default 3, 2, 2, then 1 for further heads)."""
    choices = choices or ((3, 2, 2) + (1,) * heads.num_heads)[:heads.num_heads]
    if not params.greedy:
        raise LmforgeError("Medusa decoding here is greedy only (temperature 0); use --draft or --lookup to sample")
    if len(choices) > heads.num_heads:
        raise LmforgeError(f"the tree has {len(choices)} levels but the Medusa folder has {heads.num_heads} heads")
    device = next(model.parameters()).device
    parent, depth, rank = build_tree(choices)
    tree_mask = _ancestor_mask(parent).to(device)
    depth_t, N = torch.tensor(depth, device=device), len(parent)
    stop = set(params.stop_token_ids) | set(eos_token_ids or [])
    L = len(prompt_ids)
    cache = KVCache.for_model(model, 1, L + params.max_new_tokens + N + 1)
    stats, start = SpecStats(), time.perf_counter()
    logits, hidden = model(torch.tensor([prompt_ids], device=device), kv_cache=cache, start_pos=0,
                           logits_to_keep=1, return_hidden=True)
    root, last_hidden = int(logits[0, -1].argmax()), hidden[0, -1]
    out: list[int] = []
    while True:
        guesses = heads(last_hidden, model.lm_head).topk(max(choices), dim=-1).indices  # [K, max choice]
        tokens = [root] + [int(guesses[d - 1, r]) for d, r in zip(depth[1:], rank[1:])]
        mask = torch.cat([torch.ones(N, L, dtype=torch.bool, device=device), tree_mask], dim=1)[None, None]
        logits, hidden = model(torch.tensor([tokens], device=device), position_ids=(L + depth_t)[None],
                               attn_mask=mask, kv_cache=cache, start_pos=L, return_hidden=True)
        pred = logits[0].argmax(-1).tolist()
        ok = [True] + [False] * (N - 1)
        for i in range(1, N):
            ok[i] = ok[parent[i]] and tokens[i] == pred[parent[i]]
        best = max((i for i in range(N) if ok[i]), key=lambda i: depth[i])
        path = [best]
        while path[-1] != 0:
            path.append(parent[path[-1]])
        path.reverse()
        _compact(cache, L, path)
        L += len(path)
        stats.steps += 1
        stats.proposed += len(choices)
        stats.accepted += len(path) - 1
        stats.accepted_per_step.append(len(path) - 1)
        for i in path:
            out.append(tokens[i])
            if tokens[i] in stop or len(out) >= params.max_new_tokens:
                stats.new_tokens, stats.seconds = len(out), time.perf_counter() - start
                return out, stats
        root, last_hidden = pred[best], hidden[0, best]


def _compact(cache: KVCache, start: int, path: list[int]) -> None:
    """Move the accepted nodes' keys/values (tree slots start + i) to slots start, start + 1, ..."""
    src = torch.tensor(path, device=cache.k[0].device) + start
    for buf in cache.k + cache.v:
        buf[:, :, start:start + len(path)] = buf[:, :, src]
