"""Post-training objectives as plain functions: DPO (+ IPO, conservative/label-smoothed), the
Bradley-Terry reward-model loss, PPO pieces (GAE, clipped policy and value losses, adaptive KL),
GRPO group-relative advantages, and knowledge distillation (forward / reverse KL with temperature).

Shapes: `ids` [B, T] token ids, `response_mask` [B, T] 1 on the tokens whose log-probability is
scored (the response), 0 on the prompt and padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) for t >= 1 -> [B, T-1] (logits [B, T, V] from the same ids)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def sequence_logprobs(
    model: nn.Module, ids: torch.Tensor, response_mask: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities under `model` -> [B]."""
    logits = model(ids, attention_mask=attention_mask)
    return (token_logprobs(logits, ids) * response_mask[:, 1:]).sum(-1)


# ----------------------------------------------------------------------------- preferences


@dataclass
class DPOOutput:
    loss: torch.Tensor
    chosen_rewards: torch.Tensor  # beta * (log pi - log ref) of the chosen response [B]
    rejected_rewards: torch.Tensor

    @property
    def margin(self) -> float:
        return float((self.chosen_rewards - self.rejected_rewards).mean())

    @property
    def accuracy(self) -> float:
        return float((self.chosen_rewards > self.rejected_rewards).float().mean())


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """DPO (Rafailov et al. 2023) on summed sequence log-probs [B].

    sigmoid: -log sigmoid(beta * h), h = (pi_c - ref_c) - (pi_r - ref_r); with label_smoothing eps the
    conservative DPO mixes in the flipped label: -(1-eps) log s(beta h) - eps log s(-beta h).
    ipo: (h - 1/(2 beta))^2 (Azar et al. 2023).
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (sigmoid | ipo)")
    return DPOOutput(
        loss.mean(), beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()
    )


class RewardModel(nn.Module):
    """A language model with a scalar head read at each sequence's last real token."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.score = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ids [B, T] right-padded -> rewards [B]."""
        _, hidden = self.lm(ids, attention_mask=attention_mask, return_hidden=True)
        last = attention_mask.sum(-1) - 1
        return self.score(hidden[torch.arange(ids.shape[0]), last]).squeeze(-1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged."""
    return -F.logsigmoid(chosen - rejected).mean()


# ----------------------------------------------------------------------------- RL


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens [B, T] -> (advantages, returns).
    `mask` marks real response tokens; the value after the last one is 0."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = (x * mask).sum() / mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / mask.sum()
    return (x - mean) * torch.rsqrt(var + eps) * mask


def ppo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> torch.Tensor:
    """Clipped surrogate objective (Schulman et al. 2017), token-level, masked mean."""
    ratio = torch.exp(logp - old_logp)
    loss = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> torch.Tensor:
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


class AdaptiveKLController:
    """Ziegler et al. 2019: scale the KL coefficient so the observed KL tracks `target`."""

    def __init__(self, init_coef: float = 0.1, target: float = 6.0, horizon: int = 10000):
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, observed_kl: float, n_steps: int) -> float:
        error = max(-0.2, min(0.2, observed_kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024): rewards [N * G] of G samples per prompt,
    normalised within each group by its mean and standard deviation."""
    groups = rewards.view(-1, group_size)
    adv = (groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + eps)
    return adv.view(-1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref) (always >= 0, unbiased): exp(r) - r - 1, r = ref - pi."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


# ----------------------------------------------------------------------------- distillation


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    kind: str = "forward",
) -> torch.Tensor:
    """KL between softened teacher and student distributions per token, times T^2 (Hinton et al.).
    forward: KL(teacher || student) (mean-seeking); reverse: KL(student || teacher) (mode-seeking)."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward":
        kl = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse":
        kl = (s.exp() * (s - t)).sum(-1)
    else:
        raise ValueError(f"unknown distillation kind {kind!r} (forward | reverse)")
    if mask is None:
        return kl.mean() * temperature**2
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature**2
