"""Muon (Jordan et al. 2024, "MomentUm Orthogonalized by Newton-schulz") for the hidden weight
matrices, AdamW for everything else (embeddings, output head, norms, biases), in one optimizer so
the training loop, the LR schedule and checkpoints see a single object.

Muon's update for a matrix W with gradient G: momentum M <- mu M + G; the Nesterov direction
G + mu M is orthogonalised by five Newton-Schulz iterations (its singular values pushed towards 1,
so every direction of the update moves at the same rate), then applied with the learning rate
scaled by 0.2 sqrt(max(rows, cols)): Moonshot's "match RMS of AdamW" rule (Liu et al. 2025), which
lets Muon reuse AdamW's learning rate and weight decay. torch.optim.Muon implements the same rule
(`adjust_lr_fn="match_rms_adamw"`) but accepts only 2-D parameters; the AdamW half is why this
class exists.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic iteration of Keller Jordan's reference code


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximation of U V^T for G = U S V^T by a quintic Newton-Schulz iteration (fp32)."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, the rest for AdamW). The embedding table and the output head are
    not hidden layers (Muon's authors keep them on AdamW), nor are 1-D gains and biases."""
    skip = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            skip.update(id(p) for p in module.parameters(recurse=False))
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        skip.update(id(p) for p in head.parameters())
    matrices, rest, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (matrices if p.ndim == 2 and id(p) not in skip else rest).append(p)
    return matrices, rest


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry `use_muon`; `lr` is shared (the schedule sets it on every group)."""

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        momentum: float = 0.95,
        ns_steps: int = 5,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, momentum=momentum, ns_steps=ns_steps, weight_decay=0.0, use_muon=False
        )
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_muon"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        mu = group["momentum"]
        buf.mul_(mu).add_(p.grad)
        update = orthogonalize(p.grad.add(buf, alpha=mu), group["ns_steps"])  # Nesterov
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))


def build_muon(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, momentum: float
) -> MuonAdamW:
    matrices, rest = muon_parameters(model)
    groups = [{"params": matrices, "use_muon": True, "weight_decay": weight_decay}]
    if rest:  # norms, biases, embeddings, head: AdamW without decay (as the AdamW recipe does)
        groups.append({"params": rest, "use_muon": False, "weight_decay": 0.0})
    return MuonAdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, momentum=momentum)
