"""L1: the model. `ModelConfig` + presets, leaf layers, the Transformer, its KV cache, HF key maps."""

from .config import PRESETS, ModelConfig
from .kv_cache import KVCache
from .manifest import drop_transforms, has_transform, record_transform, transforms
from .transformer import Transformer, build_mask, per_window_masks


def build_model(config: ModelConfig | str, **overrides) -> Transformer:
    """A randomly initialised model from a config or a preset name."""
    if isinstance(config, str):
        config = ModelConfig.preset(config, **overrides)
    return Transformer(config)


__all__ = [
    "ModelConfig",
    "PRESETS",
    "KVCache",
    "Transformer",
    "build_model",
    "build_mask",
    "per_window_masks",
    "drop_transforms",
    "has_transform",
    "record_transform",
    "transforms",
]
