"""Hugging Face config.json <-> ModelConfig, as pure functions over dicts.

Every family is Llama plus a few fields: `_FAMILY_FIELDS[arch](hf)` returns what differs from the
Llama reading of the same config.json, and `config_to_hf` writes those fields back. Both the
transformers v4 field names (`rope_theta`, `rope_scaling`, `rope_local_base_freq`) and v5's
(`rope_parameters`, per layer type for Gemma 3) are read.
"""

from __future__ import annotations

from lmforge.common import LmforgeError

from .config import ModelConfig

_ARCH_CLASS = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
}
SUPPORTED = tuple(_ARCH_CLASS)


def _rope_fields(hf: dict, params: dict | None = None) -> tuple[float, dict | None]:
    """rope_theta and scaling from either the v4 fields or the v5 `rope_parameters` dict."""
    params = dict(hf.get("rope_parameters") or {} if params is None else params)
    params.pop("partial_rotary_factor", None)  # a field of its own (ModelConfig.partial_rotary_factor)
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is None or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return float(theta), None
    scaling = dict(scaling)
    if scaling.get("rope_type", scaling.get("type")) == "su":  # Phi-3's first name for LongRoPE
        scaling["rope_type"] = "longrope"
    if "original_max_position_embeddings" in hf:  # Phi-3 keeps it at the top level
        scaling.setdefault("original_max_position_embeddings", hf["original_max_position_embeddings"])
    return float(theta), scaling


def _layer_types(hf: dict, window: int | None, first_sliding: int = 0) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types): the window only if some layer slides, the list only if layers
    differ. Without `layer_types` in the file, layers from `first_sliding` on slide (Qwen's
    max_window_layers)."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i >= first_sliding else "full_attention" for i in range(n)]
    if window is None or "sliding_attention" not in types:
        return None, None
    return window, None if set(types) == {"sliding_attention"} else list(types)


def _qwen(hf: dict) -> dict:
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    sliding_window, layer_types = _layer_types(hf, window, hf.get("max_window_layers", 0))
    out = dict(sliding_window=sliding_window, layer_types=layer_types)
    if hf["model_type"] == "qwen2":
        out["attention_bias"] = bool(hf.get("attention_bias", True))
    else:
        out["qk_norm"] = "head"
    if hf["model_type"] == "qwen3_moe":
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise LmforgeError(
                "Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step != 1) is not supported"
            )
        out.update(
            num_experts=hf.get("num_experts") or hf["num_local_experts"],
            intermediate_size=hf["moe_intermediate_size"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        )
    return out


def _gemma(hf: dict) -> dict:
    arch = hf["model_type"]
    if hf.get("use_bidirectional_attention"):
        raise LmforgeError(f"{arch} with use_bidirectional_attention is not supported (a decoder only)")
    n, pattern = hf["num_hidden_layers"], 2 if arch == "gemma2" else hf.get("sliding_window_pattern", 6)
    default_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    sliding_window, layer_types = _layer_types(
        {**hf, "layer_types": hf.get("layer_types") or default_types}, hf.get("sliding_window")
    )
    out = dict(
        activation=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        norm_position="sandwich",
        norm_weight_offset=1.0,
        scale_embeddings=True,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0 if arch == "gemma2" else None),
        final_logit_softcapping=hf.get("final_logit_softcapping", 30.0 if arch == "gemma2" else None),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        sliding_window=sliding_window,
        layer_types=layer_types,
        head_dim=hf.get("head_dim", 256),
    )
    if arch == "gemma3_text":
        params = hf.get("rope_parameters") or {}
        if "full_attention" in params:  # v5: one RoPE per layer type
            out["rope_theta"], out["rope_scaling"] = _rope_fields(hf, params["full_attention"])
            out["rope_local_theta"] = float(params.get("sliding_attention", {}).get("rope_theta", 10000.0))
        else:
            out["rope_theta"], out["rope_scaling"] = _rope_fields({"rope_theta": 1_000_000.0, **hf})
            out["rope_local_theta"] = float(hf.get("rope_local_base_freq", 10000.0))
        out["qk_norm"] = "head"
    return out


def _phi3(hf: dict) -> dict:
    factor = hf.get("partial_rotary_factor") or (hf.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
    return dict(sliding_window=hf.get("sliding_window"), partial_rotary_factor=float(factor))


_FAMILY_FIELDS = {
    "llama": lambda hf: dict(attention_bias=bool(hf.get("attention_bias", False))),
    "mistral": lambda hf: dict(sliding_window=hf.get("sliding_window")),
    "mixtral": lambda hf: dict(sliding_window=hf.get("sliding_window"), num_experts=hf.get("num_local_experts", 0)),
    "qwen2": _qwen,
    "qwen3": _qwen,
    "qwen3_moe": _qwen,
    "gemma2": _gemma,
    "gemma3_text": _gemma,
    "phi3": _phi3,
    "olmo2": lambda hf: dict(
        norm_position="post", qk_norm="full", attention_bias=bool(hf.get("attention_bias", False))
    ),
}


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    arch = hf.get("model_type")
    if arch == "gemma3" and isinstance(hf.get("text_config"), dict):
        raise LmforgeError(
            f"{source}: a Gemma 3 vision-language checkpoint (model_type 'gemma3'); load a text-only "
            "Gemma 3 (model_type 'gemma3_text', e.g. gemma-3-1b)"
        )
    if arch not in SUPPORTED:
        raise LmforgeError(f"{source}: unsupported model_type {arch!r} (supported: {', '.join(SUPPORTED)})")
    try:
        if arch == "gpt2":
            return _gpt2_from_hf(hf)
        theta, scaling = _rope_fields(hf)
        fields = dict(
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
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        fields.update(_FAMILY_FIELDS[arch](hf))
        return ModelConfig.from_dict(fields, where=source)
    except KeyError as e:
        raise LmforgeError(f"{source}: missing field {e.args[0]!r} for model_type {arch!r}") from None


def _gpt2_from_hf(hf: dict) -> ModelConfig:
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
    layer_types = [("sliding_attention" if c.layer_window(i) else "full_attention") for i in range(c.num_hidden_layers)]
    if c.arch in ("llama", "olmo2"):
        out.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    if c.arch in ("mistral", "mixtral", "phi3"):
        out["sliding_window"] = c.sliding_window
    if c.arch.startswith("qwen"):
        out.update(
            use_sliding_window=c.sliding_window is not None,
            sliding_window=c.sliding_window,
            max_window_layers=0,  # which layers slide is in layer_types
            layer_types=layer_types,
            attention_bias=c.attention_bias,
        )
    if c.arch in ("mixtral", "qwen3_moe"):
        out.update(
            num_local_experts=c.num_experts,
            num_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            router_aux_loss_coef=c.router_aux_loss_coef,
        )
    if c.arch == "qwen3_moe":
        out.update(
            moe_intermediate_size=c.intermediate_size,
            norm_topk_prob=c.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if c.arch == "phi3":
        out["partial_rotary_factor"] = c.partial_rotary_factor
        if c.rope_scaling and "original_max_position_embeddings" in c.rope_scaling:
            out["original_max_position_embeddings"] = c.rope_scaling["original_max_position_embeddings"]
    if c.arch in ("gemma2", "gemma3_text"):
        out.update(
            hidden_activation=c.activation,
            # transformers' strict config wants an int here (every Gemma's is one)
            query_pre_attn_scalar=_int_if_whole(c.query_pre_attn_scalar),
            attn_logit_softcapping=c.attn_logit_softcapping,
            final_logit_softcapping=c.final_logit_softcapping,
            sliding_window=c.sliding_window,
            layer_types=layer_types,
        )
    if c.arch == "gemma3_text":
        out["rope_local_base_freq"] = c.rope_local_theta
    return out


def _int_if_whole(x: float | None) -> float | int | None:
    return int(x) if x is not None and float(x).is_integer() else x
