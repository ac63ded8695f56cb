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

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.common import LmforgeError, atomic_path, atomic_write_json, read_json

from .sampling import SamplingParams
from .speculative import SpecStats, speculative_generate

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
        self.heads = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden_size) for _ in range(num_layers)]) for _ in range(num_heads)
        )

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """hidden [..., H] (the base model's final normed hidden) -> logits [K, ..., V]."""
        return torch.stack([lm_head(head(hidden)) for head in self.heads])


def medusa_loss(
    model, heads: MedusaHeads, input_ids: torch.Tensor, decay: float = 0.8
) -> tuple[torch.Tensor, list[float]]:
    """Weighted CE of every head (head k predicts token t + k + 2 from hidden t; weight decay**k),
    with the base frozen. Returns (loss, top-1 accuracy per head)."""
    with torch.no_grad():
        _, hidden = model(input_ids, return_hidden=True)
    total, accs = 0.0, []
    for k, head in enumerate(heads.heads):
        shift = k + 2
        logits = model.lm_head(head(hidden[:, :-shift]))
        target = input_ids[:, shift:]
        total = total + decay**k * F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        accs.append(float((logits.argmax(-1) == target).float().mean()))
    return total, accs


def save_medusa(heads: MedusaHeads, out_dir: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}, str(tmp))
    atomic_write_json(
        out / CONFIG_FILE,
        dict(hidden_size=heads.hidden_size, num_heads=heads.num_heads, num_layers=heads.num_layers, **(extra or {})),
    )
    return out


def load_medusa(path: str | Path, device=None) -> MedusaHeads:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise LmforgeError(
            f"{path} is not a Medusa heads folder (no {CONFIG_FILE}; make one with `lmforge train-medusa`)"
        )
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


class MedusaProposer:
    """Medusa as a decode.Proposer: a tree of the heads' top guesses from the target's last hidden
    state (choices[d] per node at depth d + 1), verified greedily in one forward."""

    tree = needs_hidden = True

    def __init__(self, model, heads: MedusaHeads, choices: tuple[int, ...] | None = None):
        choices = choices or ((3, 2, 2) + (1,) * heads.num_heads)[: heads.num_heads]
        if len(choices) > heads.num_heads:
            raise LmforgeError(f"the tree has {len(choices)} levels but the Medusa folder has {heads.num_heads} heads")
        self.lm_head, self.heads, self.width = model.lm_head, heads, max(choices)
        self.all_parents, self.depth, self.rank = build_tree(choices)
        self.max_nodes = len(self.all_parents) - 1
        self.parents: list[int] = [-1]
        self.hidden: torch.Tensor | None = None

    def reset(self, prompt: list[int]) -> None:
        self.hidden = None

    def observe(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden

    def propose(self, tokens: list[int], k: int, params: SamplingParams, generator) -> tuple[list[int], None]:
        """The tree's nodes down to depth k (breadth-first, so a prefix of the whole tree)."""
        guesses = self.heads(self.hidden, self.lm_head).topk(self.width, dim=-1).indices.tolist()  # [K, width]
        n = 1 + sum(1 for d in self.depth[1:] if d <= k)
        self.parents = self.all_parents[:n]
        return [guesses[d - 1][r] for d, r in zip(self.depth[1:n], self.rank[1:n])], None

    def accepted(self, num_valid: int) -> None:
        pass


def medusa_generate(
    model,
    heads: MedusaHeads,
    prompt_ids: list[int],
    params: SamplingParams,
    choices: tuple[int, ...] | None = None,
    eos_token_ids: list[int] | None = None,
) -> tuple[list[int], SpecStats]:
    """Greedy decoding with Medusa tree verification; identical tokens to plain greedy. `choices`:
    top-k per tree level (default 3, 2, 2, then 1 for further heads)."""
    return speculative_generate(
        model, prompt_ids, params, MedusaProposer(model, heads, choices), k=heads.num_heads, eos_token_ids=eos_token_ids
    )
