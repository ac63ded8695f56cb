"""L2: parameter-efficient fine-tuning by wrapping or hooking modules of an existing model
(never editing the model file). Imports lmforge.common only.

    model = peft.apply(model, peft.LoraConfig(r=8, target_modules=["q", "v"]))  # base frozen
    ... train ...
    peft.save_adapter(model, "out/adapter", base_model_name="llama-100m")
    peft.export_peft(model, "out/peft")          # Hugging Face PEFT format
    peft.merge(model) / peft.unmerge(model)      # fold into / out of the base weights

Multi-adapter: apply/load several adapters with distinct adapter_name, then
`set_adapter(model, name)` for the whole batch or `with adapter_rows(model, [name|None per row]):`
for per-row selection (multi-LoRA serving).
"""

from .adalora import AdaLoraLinear, RankAllocator, orthogonal_regularization
from .api import (
    adapter_rows,
    adapter_state_dict,
    apply,
    base_state_dict,
    count_parameters,
    delete_adapter,
    is_adapter_key,
    mark_only_adapters_trainable,
    merge,
    merge_and_unload,
    peft_configs,
    replay,
    set_adapter,
    unmerge,
)
from .bottleneck import AdapterSlot, Bottleneck
from .config import (
    AdaLoraConfig,
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixConfig,
    PromptTuningConfig,
    PTuningConfig,
    config_from_dict,
    config_to_dict,
)
from .io import export_peft, import_peft, load_adapter, save_adapter
from .layers import IA3Linear, LoraLinear, WrappedLinear
from .prompt import PrefixSlot, PromptSlot, virtual_tokens

__all__ = [
    "LoraConfig",
    "AdaLoraConfig",
    "IA3Config",
    "AdapterConfig",
    "PromptTuningConfig",
    "PTuningConfig",
    "PrefixConfig",
    "PeftConfig",
    "config_to_dict",
    "config_from_dict",
    "apply",
    "mark_only_adapters_trainable",
    "count_parameters",
    "merge",
    "unmerge",
    "merge_and_unload",
    "set_adapter",
    "delete_adapter",
    "adapter_rows",
    "adapter_state_dict",
    "base_state_dict",
    "is_adapter_key",
    "peft_configs",
    "save_adapter",
    "load_adapter",
    "export_peft",
    "import_peft",
    "virtual_tokens",
    "replay",
    "orthogonal_regularization",
    "RankAllocator",
    "LoraLinear",
    "IA3Linear",
    "AdaLoraLinear",
    "WrappedLinear",
    "Bottleneck",
    "AdapterSlot",
    "PromptSlot",
    "PrefixSlot",
]
