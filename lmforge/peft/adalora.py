"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, delta W = P diag(lambda) Q, whose singular
values are pruned by importance so the rank budget goes where it helps.

Training loop contract (what `lmforge sft --method adalora` does):

    alloc = RankAllocator(model, config)           # after peft.apply(model, config)
    loss = task_loss + config.orth_reg_weight * orthogonal_regularization(model)
    loss.backward(); optimizer.step()
    alloc.step(global_step)                         # needs the grads: call before zero_grad
    ...
    alloc.final_ranks()                             # {module name: rank kept}, for the report

Names follow peft (lora_A = Q [r, in], lora_E = lambda [r, 1], lora_B = P [out, r]).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import AdaLoraConfig
from .layers import WrappedLinear


class AdaLoraLinear(WrappedLinear):
    """y = base(x) + scale / r * P (lambda * (Q dropout(x))), lambda init 0 (identity at init)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.ranknum: dict[str, int] = {}

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0) -> None:
        kw = self._factory()
        # P and Q random (so importance has gradients to read), lambda zero: delta W = 0 at init.
        self.lora_A[name] = nn.Parameter(torch.randn(r, self.in_features, **kw) * 0.02)
        self.lora_E[name] = nn.Parameter(torch.zeros(r, 1, **kw))
        self.lora_B[name] = nn.Parameter(torch.randn(self.out_features, r, **kw) * 0.02)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha
        self.ranknum[name] = r

    def delta_weight(self, name: str) -> torch.Tensor:
        scale = self.scaling[name] / (self.ranknum[name] + 1e-5)
        return self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name]) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        for name in self._pending():
            A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
            xd = self.lora_dropout[name](x).to(A.dtype)
            scale = self.scaling[name] / (self.ranknum[name] + 1e-5)
            out = out + ((xd @ (A * E).T) @ B.T * scale).to(out.dtype)
        return out

    def _merge_one(self, name: str, lin: nn.Linear) -> None:
        lin.weight.data.add_(self.delta_weight(name).to(lin.weight.dtype))

    def _unmerge_one(self, name: str, lin: nn.Linear) -> None:
        lin.weight.data.sub_(self.delta_weight(name).to(lin.weight.dtype))


def _adalora_layers(model: nn.Module, adapter_name: str) -> dict[str, AdaLoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoraLinear) and adapter_name in m.lora_A}


def orthogonal_regularization(model: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """Mean over P and Q matrices of ||P^T P - I||_F and ||Q Q^T - I||_F (keeps P, Q near-orthogonal
    so lambda behaves like singular values and pruning one removes one direction)."""
    terms = []
    for m in _adalora_layers(model, adapter_name).values():
        A, B = m.lora_A[adapter_name], m.lora_B[adapter_name]
        for cov in (A @ A.T, B.T @ B):
            eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
            terms.append(torch.linalg.norm(cov - eye, ord="fro"))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


class RankAllocator:
    """Importance-score rank allocation. Sensitivity s = |p * grad| is smoothed (EMA, beta1) and
    multiplied by its uncertainty (EMA of |s - s_bar|, beta2); triplet i of a module scores
    s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji). Every delta_t steps the lowest-scoring lambdas
    beyond the current budget are zeroed; the budget falls cubically from init_r to target_r per
    module between tinit and total_step - tfinal, after which the final pattern is frozen."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig):
        self.config = config
        self.name = config.adapter_name
        self.layers = _adalora_layers(model, self.name)
        self.init_budget = sum(m.ranknum[self.name] for m in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.ipt: dict[int, torch.Tensor] = {}
        self.unc: dict[int, torch.Tensor] = {}
        self.pattern: dict[str, torch.Tensor] | None = None
        self.budget = self.init_budget

    def budget_at(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to mask now) at `step`."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % c.delta_t == 0

    @torch.no_grad()
    def _update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for m in self.layers.values():
            for p in (m.lora_A[self.name], m.lora_E[self.name], m.lora_B[self.name]):
                if p.grad is None:
                    continue
                s = (p * p.grad).abs()
                key = id(p)
                if key not in self.ipt:
                    self.ipt[key], self.unc[key] = torch.zeros_like(s), torch.zeros_like(s)
                self.ipt[key].mul_(b1).add_(s, alpha=1 - b1)
                self.unc[key].mul_(b2).add_((s - self.ipt[key]).abs(), alpha=1 - b2)

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        key = id(p)
        return self.ipt[key] * self.unc[key] if key in self.ipt else torch.zeros_like(p)

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        scores = {}
        for n, m in self.layers.items():
            A, E, B = m.lora_A[self.name], m.lora_E[self.name], m.lora_B[self.name]
            scores[n] = self._score(E).view(-1) + self._score(A).mean(dim=1) + self._score(B).mean(dim=0)
        return scores

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> None:
        scores = self._triplet_scores()
        flat = torch.cat(list(scores.values()))
        k = self.init_budget - budget
        if k <= 0:
            self.pattern = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
            return
        threshold = torch.kthvalue(flat, k).values
        self.pattern = {n: s > threshold for n, s in scores.items()}
        self._apply_pattern()

    @torch.no_grad()
    def _apply_pattern(self) -> None:
        for n, m in self.layers.items():
            m.lora_E[self.name].masked_fill_(~self.pattern[n].view(-1, 1), 0.0)

    def step(self, global_step: int) -> int:
        """Update importance from the current grads and prune; returns the budget in force."""
        c = self.config
        if global_step < c.total_step - c.tfinal:
            self._update_importance()
            self.budget, mask_now = self.budget_at(global_step)
            if mask_now:
                self._mask_to_budget(self.budget)
        elif self.pattern is None or global_step == c.total_step - c.tfinal:
            self.budget = self.target_budget
            self._mask_to_budget(self.budget)
        else:  # frozen: re-zero what the optimizer may have revived
            self._apply_pattern()
        return self.budget

    def final_ranks(self) -> dict[str, int]:
        """Rank kept per module (non-zero lambdas)."""
        return {n: int((m.lora_E[self.name] != 0).sum()) for n, m in self.layers.items()}
