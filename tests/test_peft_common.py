"""Shared helpers for the PEFT tests (no tests here): a tiny model, a short training loop, and the
expected trainable-parameter count of each method from its formula."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge import peft
from lmforge.model import build_model

V = 512  # the "tiny" preset's vocabulary


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model("tiny", **overrides).eval()


def batch(seed: int = 1, B: int = 2, T: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def perturb(model, seed: int = 3, scale: float = 0.1) -> None:
    """Move every adapter parameter off its init so merge/save tests are not trivially exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if peft.is_adapter_key(name):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def train(model, steps: int = 15, lr: float = 1e-2, after_backward=None, extra_loss=None) -> list[float]:
    """A hand-written SFT-style loop on one fixed batch (memorisation): the losses per step."""
    x = batch(seed=5, B=4, T=17)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        opt.step()
        if after_backward is not None:
            after_backward(step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear of a plain model, by module name."""
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def expected_trainable(config, model) -> int:
    """The issue's formulas, computed from the plain model's shapes."""
    c = model.config
    H, L, kv = c.hidden_size, c.num_hidden_layers, c.num_key_value_heads * c.head_dim
    if isinstance(config, (peft.LoraConfig, peft.AdaLoraConfig, peft.IA3Config)):
        targets = peft.config.expand_targets(config.target_modules)
        total = 0
        for name, (fan_in, fan_out) in linear_shapes(model).items():
            if not (peft.config.matches(name, targets) or ("all-linear" in targets and not name.endswith("lm_head"))):
                continue
            if isinstance(config, peft.LoraConfig):  # A [r, in] + B [out, r] (+ DoRA magnitude [out])
                total += config.r * (fan_in + fan_out) + (fan_out if config.use_dora else 0)
            elif isinstance(config, peft.AdaLoraConfig):  # Q [r, in] + lambda [r] + P [out, r]
                total += config.init_r * (fan_in + fan_out + 1)
            else:  # one vector over in (feedforward) or out features
                total += fan_in if peft.config.matches(name, config.feedforward_modules) else fan_out
        return total
    if isinstance(config, peft.AdapterConfig):  # down (H*b + b) + up (b*H + H) per adapted block
        per = 2 * H * config.bottleneck + config.bottleneck + H
        return per * L * (2 if config.kind == "houlsby" else 1)
    P = config.num_virtual_tokens
    if isinstance(config, peft.PromptTuningConfig):
        return P * H
    if isinstance(config, peft.PTuningConfig):
        E = config.encoder_hidden_size
        if config.encoder == "mlp":  # embeddings + MLP H -> E -> H
            return P * H + (H * E + E) + (E * H + H)
        # 2-layer bidirectional LSTM (per direction 4E x (in + E) + two 4E biases), then MLP 2E -> E -> H
        lstm = 2 * (4 * E * (H + E) + 8 * E) + 2 * (4 * E * (2 * E + E) + 8 * E)
        return P * H + lstm + (2 * E * E + E) + (E * H + H)
    out = L * 2 * kv
    if not config.projection:  # P-tuning v2: the prefix itself
        return P * out
    E = config.encoder_hidden_size  # prefix tuning: embeddings + MLP H -> E -> L*2*kv
    return P * H + (H * E + E) + (E * out + out)


LINEAR_CONFIGS = {
    "lora_qv": lambda: peft.LoraConfig(r=4, alpha=8, target_modules=["q", "v"]),
    "rslora_all": lambda: peft.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_rslora=True),
    "dora": lambda: peft.LoraConfig(
        r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True
    ),
    "adalora": lambda: peft.AdaLoraConfig(init_r=6, target_r=3, target_modules=["q", "v", "up"]),
    "ia3": lambda: peft.IA3Config(),
}
OTHER_CONFIGS = {
    "houlsby": lambda: peft.AdapterConfig(kind="houlsby", bottleneck=8),
    "pfeiffer": lambda: peft.AdapterConfig(kind="pfeiffer", bottleneck=8),
    "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=4),
    "prompt_text": lambda: peft.PromptTuningConfig(num_virtual_tokens=5, init="tokens", init_token_ids=[7, 8, 9]),
    "ptuning_mlp": lambda: peft.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=32),
    "ptuning_lstm": lambda: peft.PTuningConfig(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=16),
    "prefix": lambda: peft.PrefixConfig(num_virtual_tokens=4, encoder_hidden_size=32),
    "ptuning_v2": lambda: peft.PrefixConfig(num_virtual_tokens=4, projection=False),
}
ALL_CONFIGS = {**LINEAR_CONFIGS, **OTHER_CONFIGS}
