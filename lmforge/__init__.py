"""lmforge: the whole life of a language model in one hackable PyTorch codebase.

Public API (imported lazily so `import lmforge` does not import torch):
    load_model(path)        HF folder or lmforge checkpoint -> torch.nn.Module (input ids -> logits)
    load_tokenizer(path)    tokenizer of a model folder or a tokenizer.json
    generate(model, input_ids, max_new_tokens=..., temperature=0.0, ...) -> new token ids
"""

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("lmforge.checkpoint", "load_model"),
    "save_model": ("lmforge.checkpoint", "save_model"),
    "load_tokenizer": ("lmforge.tokenizer", "load_tokenizer"),
    "generate": ("lmforge.infer.generate", "generate"),
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
