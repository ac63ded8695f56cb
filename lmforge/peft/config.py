"""One dataclass per PEFT method, target-module matching, and (de)serialisation.

Every config has `adapter_name` (several adapters may live on one base) and a class-level
`method` tag used in saved JSON so `config_from_dict` can rebuild the right dataclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lmforge.common import LmforgeError, build_config, checked

# Short names accepted in target_modules (the "q, k, v, o, gate, up, down").
SHORT_NAMES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """W h + scale * B A h; scale = alpha / r (or alpha / sqrt(r) with rsLoRA). DoRA adds a
    learned magnitude per output row on top of the normalised direction W + scale * B A."""

    method: ClassVar[str] = "lora"
    r: int = checked(8, ge=1)
    alpha: float = checked(16.0, gt=0)
    dropout: float = checked(0.0, ge=0, lt=1)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    use_dora: bool = False
    adapter_name: str = "default"


@dataclass
class AdaLoraConfig:
    """SVD-form LoRA P diag(lambda) Q whose total rank is pruned from init_r * n_modules to
    target_r * n_modules by importance scores, on a cubic schedule (AdaLoRA, Zhang et al. 2023):
    tinit warm-up steps at the full budget, pruning until total_step - tfinal, then frozen."""

    method: ClassVar[str] = "adalora"
    init_r: int = checked(12, ge=1)
    target_r: int = checked(8, ge=1)
    alpha: float = checked(32.0, gt=0)
    dropout: float = checked(0.0, ge=0, lt=1)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    tinit: int = checked(0, ge=0)
    tfinal: int = checked(0, ge=0)
    delta_t: int = checked(1, ge=1)
    total_step: int = checked(100, ge=1)
    beta1: float = checked(0.85, ge=0, lt=1)
    beta2: float = checked(0.85, ge=0, lt=1)
    orth_reg_weight: float = checked(0.5, ge=0)
    adapter_name: str = "default"


@dataclass
class IA3Config:
    """Learned vectors (init 1) rescaling k_proj/v_proj outputs and the MLP's intermediate
    activation (the input of down_proj, a `feedforward_modules` entry)."""

    method: ClassVar[str] = "ia3"
    target_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])
    adapter_name: str = "default"


@dataclass
class AdapterConfig:
    """Bottleneck adapters h + up(act(down(h))) with up zero-initialised. Houlsby: after the
    attention block and after the MLP; Pfeiffer: after the MLP only."""

    method: ClassVar[str] = "adapter"
    kind: str = checked("houlsby", choices=("houlsby", "pfeiffer"))
    bottleneck: int = checked(64, ge=1)
    activation: str = "gelu"
    adapter_name: str = "default"


@dataclass
class PromptTuningConfig:
    """Trainable virtual-token embeddings prepended to the input. init: "random", "vocab"
    (random rows of the embedding table) or "tokens" (the embeddings of `init_token_ids`,
    e.g. a tokenised instruction text, repeated/cut to num_virtual_tokens)."""

    method: ClassVar[str] = "prompt_tuning"
    num_virtual_tokens: int = checked(20, ge=1)
    init: str = checked("vocab", choices=("random", "vocab", "tokens"))
    init_token_ids: list[int] | None = checked(None, ge=0)
    adapter_name: str = "default"


@dataclass
class PTuningConfig:
    """P-tuning v1: virtual tokens produced by a prompt encoder ("mlp" or "lstm") from
    trainable input embeddings; the encoder output can be cached after training."""

    method: ClassVar[str] = "p_tuning"
    num_virtual_tokens: int = checked(20, ge=1)
    encoder: str = checked("mlp", choices=("mlp", "lstm"))
    encoder_hidden_size: int = checked(128, ge=1)
    adapter_name: str = "default"


@dataclass
class PrefixConfig:
    """Trainable key/value prefixes at every layer. projection=True is prefix tuning (a
    reparameterisation MLP during training, folded into plain K/V tensors by `merge`);
    projection=False is P-tuning v2 (the K/V tensors are the parameters)."""

    method: ClassVar[str] = "prefix"
    num_virtual_tokens: int = checked(20, ge=1)
    projection: bool = True
    encoder_hidden_size: int = checked(128, ge=1)
    adapter_name: str = "default"


CONFIG_CLASSES = {
    c.method: c
    for c in (LoraConfig, AdaLoraConfig, IA3Config, AdapterConfig, PromptTuningConfig, PTuningConfig, PrefixConfig)
}
PeftConfig = LoraConfig | AdaLoraConfig | IA3Config | AdapterConfig | PromptTuningConfig | PTuningConfig | PrefixConfig


def config_to_dict(config: PeftConfig) -> dict[str, Any]:
    return {"method": config.method, **dataclasses.asdict(config)}


def config_from_dict(d: dict[str, Any], where: str = "adapter config") -> PeftConfig:
    d = dict(d)
    method = d.pop("method", None)
    cls = CONFIG_CLASSES.get(method)
    if cls is None:
        raise LmforgeError(f"{where}: unknown PEFT method {method!r} (choose from {', '.join(CONFIG_CLASSES)})")
    return build_config(cls, d, where)  # unknown fields, types and ranges, named as `where.field`


def expand_targets(targets: list[str] | str) -> list[str]:
    """Short names -> module names; a bare string is one target."""
    if isinstance(targets, str):
        targets = [targets]
    return [SHORT_NAMES.get(t, t) for t in targets]


def matches(module_name: str, targets: list[str]) -> bool:
    """A module matches a target when its last name component equals it or its full dotted name
    ends with it (so "self_attn.q_proj" works too). The MoE router `mlp.gate` is not `gate_proj`."""
    for t in targets:
        if module_name == t or module_name.endswith("." + t):
            return True
    return False


def validate(config: PeftConfig) -> None:
    """Catch bad values with a message naming the field, before any module is touched."""

    def bad(field_name: str, why: str) -> LmforgeError:
        return LmforgeError(f"{type(config).__name__}.{field_name}={getattr(config, field_name)!r}: {why}")

    if isinstance(config, LoraConfig) and config.r < 1:
        raise bad("r", "rank must be >= 1")
    if isinstance(config, AdaLoraConfig) and not 1 <= config.target_r <= config.init_r:
        raise bad("target_r", "need 1 <= target_r <= init_r")
    if isinstance(config, AdaLoraConfig) and config.total_step <= config.tinit + config.tfinal:
        raise bad("total_step", "must exceed tinit + tfinal (no steps left to prune in)")
    if isinstance(config, AdapterConfig) and config.kind not in ("houlsby", "pfeiffer"):
        raise bad("kind", "choose houlsby or pfeiffer")
    if isinstance(config, PTuningConfig) and config.encoder not in ("mlp", "lstm"):
        raise bad("encoder", "choose mlp or lstm")
    if isinstance(config, PromptTuningConfig) and config.init not in ("random", "vocab", "tokens"):
        raise bad("init", "choose random, vocab or tokens")
    if isinstance(config, PromptTuningConfig) and config.init == "tokens" and not config.init_token_ids:
        raise bad("init_token_ids", "init='tokens' needs a non-empty list of token ids")
    if hasattr(config, "num_virtual_tokens") and config.num_virtual_tokens < 1:
        raise bad("num_virtual_tokens", "must be >= 1")
    if hasattr(config, "dropout") and not 0.0 <= config.dropout < 1.0:
        raise bad("dropout", "must be in [0, 1)")
