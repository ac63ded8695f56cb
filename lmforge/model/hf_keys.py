"""Hugging Face <-> lmforge state-dict key maps, as pure functions over dicts (configs: `hf_config`).

Llama, Qwen2/3, Mistral, Gemma 2/3 and OLMo 2 already use our names; GPT-2, Mixtral and Phi-3 need
renames or splits: GPT-2's Conv1D weights are stored transposed with q/k/v fused in one `c_attn`,
Phi-3 fuses q/k/v in `qkv_proj` and gate/up in `gate_up_proj` (split on load, fused on export), and
transformers v5 may store MoE experts fused in 3-D tensors (Mixtral, Qwen3-MoE).
"""

from __future__ import annotations

import re

import torch

from .config import ModelConfig
from .hf_config import SUPPORTED, config_from_hf, config_to_hf  # noqa: F401  (re-exported: the one import site)

# ----------------------------------------------------------------------------- state dicts

_GPT2_RENAMES = [  # (HF regex, lmforge replacement); c_attn and Conv1D transposes handled separately
    (r"^wte\.", "model.embed_tokens."),
    (r"^wpe\.", "model.embed_positions."),
    (r"^ln_f\.", "model.norm."),
    (r"^h\.(\d+)\.ln_1\.", r"model.layers.\1.input_layernorm."),
    (r"^h\.(\d+)\.ln_2\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^h\.(\d+)\.attn\.c_proj\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^h\.(\d+)\.mlp\.c_fc\.", r"model.layers.\1.mlp.up_proj."),
    (r"^h\.(\d+)\.mlp\.c_proj\.", r"model.layers.\1.mlp.down_proj."),
]
_MIXTRAL_EXPERT = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias$|\.attn\.masked_bias$)")


def state_dict_from_hf(sd: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> lmforge names (tensors are not copied unless a transpose/split needs it)."""
    out = {}
    for key, t in sd.items():
        if _IGNORED.search(key):
            continue
        if c.arch == "gpt2":
            out.update(_gpt2_tensor_from_hf(key.removeprefix("transformer."), t, c))
        elif c.arch == "phi3":
            out.update(_phi3_tensor_from_hf(key, t, c))
        else:
            out.update(_moe_tensor_from_hf(key, t))
    if c.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _gpt2_tensor_from_hf(key: str, t: torch.Tensor, c: ModelConfig) -> dict[str, torch.Tensor]:
    if key == "lm_head.weight":
        return {key: t}
    m = re.match(r"^h\.(\d+)\.attn\.c_attn\.(weight|bias)$", key)
    if m:
        i, kind = m.groups()
        t = t.t() if kind == "weight" else t  # Conv1D stores [in, out]
        q, k, v = t.split(c.hidden_size, dim=0)
        pre = f"model.layers.{i}.self_attn."
        return {
            f"{pre}q_proj.{kind}": q.contiguous(),
            f"{pre}k_proj.{kind}": k.contiguous(),
            f"{pre}v_proj.{kind}": v.contiguous(),
        }
    for pattern, repl in _GPT2_RENAMES:
        if re.match(pattern, key):
            new = re.sub(pattern, repl, key)
            if new.endswith(".weight") and re.search(r"(o_proj|up_proj|down_proj)\.weight$", new):
                t = t.t().contiguous()
            return {new: t}
    return {key: t}  # unknown: let the loader report it as unexpected


def _phi3_tensor_from_hf(key: str, t: torch.Tensor, c: ModelConfig) -> dict[str, torch.Tensor]:
    """Phi-3's fused projections, split along the output dim: qkv_proj = [q; k; v], gate_up_proj = [gate; up]."""
    pre, _, kind = key.rpartition(".")
    if pre.endswith(".self_attn.qkv_proj"):
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        parts = dict(zip("qkv", t.split([q, kv, kv], dim=0)))
        return {f"{pre.removesuffix('qkv_proj')}{p}_proj.{kind}": parts[p] for p in "qkv"}
    if pre.endswith(".mlp.gate_up_proj"):
        gate, up = t.chunk(2, dim=0)
        base = pre.removesuffix("gate_up_proj")
        return {f"{base}gate_proj.{kind}": gate, f"{base}up_proj.{kind}": up}
    return {key: t}


def _moe_tensor_from_hf(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mixtral's names (block_sparse_moe, w1/w2/w3) and v5's fused 3-D experts -> one Linear per expert;
    any other key unchanged."""
    key = key.replace(".block_sparse_moe.", ".mlp.")
    m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(w[123])\.weight$", key)
    if m:
        return {f"{m.group(1)}.{m.group(2)}.{_MIXTRAL_EXPERT[m.group(3)]}.weight": t}
    m = re.match(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", key)  # transformers v5 fused experts
    if m:
        out = {}
        for e in range(t.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{m.group(1)}.{e}.down_proj.weight"] = t[e]
            else:
                gate, up = t[e].chunk(2, dim=0)
                out[f"{m.group(1)}.{e}.gate_proj.weight"], out[f"{m.group(1)}.{e}.up_proj.weight"] = gate, up
        return out
    return {key: t}


def state_dict_to_hf(sd: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge names -> HF tensors (contiguous, no shared storage: safetensors refuses aliasing)."""
    out: dict[str, torch.Tensor] = {}
    if c.arch == "gpt2":
        inverse = {"embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f"}
        for key, t in sd.items():
            m = re.match(r"^model\.(embed_tokens|embed_positions|norm)\.(.*)$", key)
            if m:
                out[f"transformer.{inverse[m.group(1)]}.{m.group(2)}"] = t
                continue
            m = re.match(r"^model\.layers\.(\d+)\.(.*)$", key)
            if not m:
                continue  # lm_head is tied in GPT-2
            i, rest = m.groups()
            simple = {
                "input_layernorm": "ln_1",
                "post_attention_layernorm": "ln_2",
                "self_attn.o_proj": "attn.c_proj",
                "mlp.up_proj": "mlp.c_fc",
                "mlp.down_proj": "mlp.c_proj",
            }
            for ours, theirs in simple.items():
                if rest.startswith(ours + "."):
                    kind = rest[len(ours) + 1 :]
                    is_conv = kind == "weight" and ours not in ("input_layernorm", "post_attention_layernorm")
                    out[f"transformer.h.{i}.{theirs}.{kind}"] = t.t() if is_conv else t
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                pre = f"model.layers.{i}.self_attn."
                fused = torch.cat([sd[f"{pre}{p}_proj.{kind}"] for p in "qkv"], dim=0)
                out[f"transformer.h.{i}.attn.c_attn.{kind}"] = fused.t() if kind == "weight" else fused
    else:
        for key, t in sd.items():
            if c.arch == "mixtral":
                key = key.replace(".mlp.", ".block_sparse_moe.")
                for w, ours in _MIXTRAL_EXPERT.items():
                    key = key.replace(f".{ours}.", f".{w}.") if ".experts." in key else key
            if c.arch == "phi3" and re.search(r"\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.", key):
                continue  # fused below
            out[key] = t
        if c.arch == "phi3":
            for i in range(c.num_hidden_layers):
                pre = f"model.layers.{i}."
                for fused, parts in (("self_attn.qkv_proj", ("q", "k", "v")), ("mlp.gate_up_proj", ("gate", "up"))):
                    family = fused.split(".")[0]
                    for kind in ("weight", "bias"):
                        names = [f"{pre}{family}.{p}_proj.{kind}" for p in parts]
                        if names[0] in sd:
                            out[f"{pre}{fused}.{kind}"] = torch.cat([sd[n] for n in names], dim=0)
        if c.tie_word_embeddings:
            out.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}
