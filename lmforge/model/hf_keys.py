"""Hugging Face <-> lmforge: configs and state-dict key maps, as pure functions over dicts.

Llama, Qwen2 and Mistral already use our names; GPT-2 and Mixtral need renames (and GPT-2's
Conv1D weights are stored transposed, with q/k/v fused in one `c_attn`).
"""

from __future__ import annotations

import re

import torch

from lmforge.common import LmforgeError

from .config import ModelConfig

SUPPORTED = ("gpt2", "llama", "qwen2", "mistral", "mixtral")
_ARCH_CLASS = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


def _rope_fields(hf: dict) -> tuple[float, dict | None]:
    """rope_theta and scaling from either the v4 fields or the v5 `rope_parameters` dict."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    arch = hf.get("model_type")
    if arch not in SUPPORTED:
        raise LmforgeError(f"{source}: unsupported model_type {arch!r} (supported: {', '.join(SUPPORTED)})")
    try:
        if arch == "gpt2":
            h = hf["n_embd"]
            return ModelConfig(
                arch="gpt2",
                vocab_size=hf["vocab_size"],
                hidden_size=h,
                intermediate_size=hf.get("n_inner") or 4 * h,
                num_hidden_layers=hf["n_layer"],
                num_attention_heads=hf["n_head"],
                max_position_embeddings=hf.get("n_positions", 1024),
                norm="layernorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                activation=hf.get("activation_function", "gelu_new"),
                gated_mlp=False,
                position="learned",
                attention_bias=True,
                attention_out_bias=True,
                mlp_bias=True,
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
            )
        theta, scaling = _rope_fields(hf)
        sliding = hf.get("sliding_window")
        if arch == "qwen2" and not hf.get("use_sliding_window", False):
            sliding = None
        return ModelConfig(
            arch=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            activation=hf.get("hidden_act", "silu"),
            gated_mlp=True,
            position="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=sliding if arch in ("mistral", "mixtral", "qwen2") else None,
            num_experts=hf.get("num_local_experts", 0) if arch == "mixtral" else 0,
            num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
    except KeyError as e:
        raise LmforgeError(f"{source}: missing field {e.args[0]!r} for model_type {arch!r}") from None


def config_to_hf(c: ModelConfig) -> dict:
    if c.arch not in SUPPORTED:
        raise LmforgeError(f"cannot export arch {c.arch!r} to Hugging Face (supported: {', '.join(SUPPORTED)})")
    common = {
        "architectures": [_ARCH_CLASS[c.arch]],
        "model_type": c.arch,
        "vocab_size": c.vocab_size,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": c.tie_word_embeddings,
        "initializer_range": c.initializer_range,
        "torch_dtype": "float32",
    }
    if c.arch == "gpt2":
        return {
            **common,
            "n_embd": c.hidden_size,
            "n_inner": c.intermediate_size,
            "n_layer": c.num_hidden_layers,
            "n_head": c.num_attention_heads,
            "n_positions": c.max_position_embeddings,
            "n_ctx": c.max_position_embeddings,
            "layer_norm_epsilon": c.norm_eps,
            "activation_function": c.activation,
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
        }
    out = {
        **common,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.norm_eps,
        "hidden_act": c.activation,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "attention_dropout": 0.0,
    }
    if c.arch == "llama":
        out.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    if c.arch in ("mistral", "mixtral"):
        out["sliding_window"] = c.sliding_window
    if c.arch == "qwen2":
        out.update(
            use_sliding_window=c.sliding_window is not None,
            sliding_window=c.sliding_window,
            max_window_layers=c.num_hidden_layers,
        )
    if c.arch == "mixtral":
        out.update(
            num_local_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            router_aux_loss_coef=c.router_aux_loss_coef,
        )
    return out


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
        elif c.arch == "mixtral":
            out.update(_mixtral_tensor_from_hf(key, t))
        else:
            out[key] = t
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


def _mixtral_tensor_from_hf(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
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
            out[key] = t
        if c.tie_word_embeddings:
            out.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}
