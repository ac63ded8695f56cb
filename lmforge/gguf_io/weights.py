"""lmforge <-> GGUF (llama.cpp): the model config as GGUF metadata and the state dict as GGUF tensors.

Pure functions over dicts and tensors; the file itself is read and written in `gguf_io.__init__`.
GGUF names follow llama.cpp (gguf-py's `constants.TENSOR_NAMES`); three layouts differ from ours:

* arch "llama": llama.cpp's rotary embedding rotates adjacent pairs (x0, x1), Hugging Face's and
  ours rotate halves (x_i, x_{i+d/2}), so q_proj / k_proj rows (and biases) are permuted on the way
  out, as convert_hf_to_gguf.py's `LlamaModel.permute`, and back on the way in. "qwen2" uses
  llama.cpp's NEOX rotation (halves, like ours): no permutation.
* "gpt2": q/k/v are one fused `attn_qkv` tensor.
* mixture of experts: per-expert matrices are stacked into one `ffn_{gate,up,down}_exps` tensor.
"""

from __future__ import annotations

import math
import re

import torch

from lmforge.common import LmforgeError
from lmforge.model import ModelConfig

# lmforge arch -> GGUF arch (Mistral and Mixtral are "llama" in llama.cpp, as convert_hf_to_gguf.py writes them).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.embed_positions.weight": "position_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "model.norm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",  # the MoE router
}
_EXPERT = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
# Kept in F32 whatever the file type (as convert_hf_to_gguf.py: routers and position tables are small
# and precision-sensitive); every 1-D tensor (norms, biases) is F32 too.
KEEP_F32 = re.compile(r"(ffn_gate_inp|position_embd|rope_freqs)\.weight$")


def check_exportable(c: ModelConfig) -> str:
    """The GGUF arch for `c`, or a clear error naming the feature llama.cpp's arch cannot express."""
    if c.arch not in GGUF_ARCH:
        raise LmforgeError(
            f"cannot export arch {c.arch!r} to GGUF yet (supported: {', '.join(sorted(GGUF_ARCH))}); "
            "export it to a Hugging Face folder with `lmforge convert --to-hf` instead"
        )
    arch = GGUF_ARCH[c.arch]
    if arch == "qwen2" and not c.attention_bias:
        arch = "llama"  # llama.cpp's qwen2 requires q/k/v biases; without them the model is a Llama
    unsupported = {
        "norm_position": (c.norm_position, "pre"),
        "norm_weight_offset": (c.norm_weight_offset, 0.0),
        "qk_norm": (c.qk_norm, None),
        "partial_rotary_factor": (c.partial_rotary_factor, 1.0),
        "layer_types": (c.layer_types, None),
        "scale_embeddings": (c.scale_embeddings, False),
        "query_pre_attn_scalar": (c.query_pre_attn_scalar, None),
        "attn_logit_softcapping": (c.attn_logit_softcapping, None),
        "final_logit_softcapping": (c.final_logit_softcapping, None),
        "causal": (c.causal, True),
        "attention_out_bias": (c.attention_out_bias, arch == "gpt2"),
    }
    wanted_act = ("gelu_new", "gelu_pytorch_tanh") if arch == "gpt2" else ("silu",)
    if c.activation not in wanted_act:
        unsupported["activation"] = (c.activation, wanted_act[0])
    for name, (value, plain) in unsupported.items():
        if value != plain:
            raise LmforgeError(
                f"cannot export to GGUF arch {arch!r}: model config {name}={value!r} has no equivalent there "
                f"(expected {plain!r})"
            )
    rope_type = (c.rope_scaling or {}).get("rope_type", (c.rope_scaling or {}).get("type"))
    if rope_type not in (None, "default", "linear", "llama3"):
        raise LmforgeError(f"cannot export to GGUF: rope_scaling type {rope_type!r} (supported: linear, llama3)")
    if c.num_experts and c.arch != "mixtral":
        raise LmforgeError(f"cannot export to GGUF: a mixture of experts in arch {c.arch!r} (only mixtral)")
    return arch


def metadata(c: ModelConfig, arch: str) -> dict[str, object]:
    """GGUF metadata of the model (`{arch}.` keys), as gguf-py's `Keys.LLM` / `Keys.Attention` name them."""
    m: dict[str, object] = {
        "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size,
        "block_count": c.num_hidden_layers,
        "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads,
        "attention.head_count_kv": c.num_key_value_heads,
    }
    if arch == "gpt2":
        m["attention.layer_norm_epsilon"] = float(c.norm_eps)
        return m
    m.update({"attention.layer_norm_rms_epsilon": float(c.norm_eps), "rope.freq_base": float(c.rope_theta)})
    m["rope.dimension_count"] = c.head_dim
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        m.update({"attention.key_length": c.head_dim, "attention.value_length": c.head_dim})
    rope = c.rope_scaling or {}
    if rope.get("rope_type", rope.get("type")) == "linear":
        m.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(rope["factor"])})
    if c.num_experts:
        m.update({"expert_count": c.num_experts, "expert_used_count": c.num_experts_per_tok})
    return m


def config_from_metadata(arch: str, meta: dict, n_vocab: int, tensors: set[str], source: str) -> dict:
    """ModelConfig fields from a GGUF file's metadata (`meta`: keys without the `{arch}.` prefix)."""

    def need(key: str):
        if key not in meta:
            raise LmforgeError(f"{source}: GGUF metadata key {arch}.{key} is missing")
        return meta[key]

    n_head = int(need("attention.head_count"))
    fields = dict(
        vocab_size=n_vocab,
        hidden_size=int(need("embedding_length")),
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(meta.get("attention.head_count_kv", n_head)),
        max_position_embeddings=int(meta.get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
    )
    if arch == "gpt2":
        return dict(
            fields,
            arch="gpt2",
            norm="layernorm",
            norm_eps=float(meta.get("attention.layer_norm_epsilon", 1e-5)),
            activation="gelu_new",
            gated_mlp=False,
            position="learned",
            attention_bias=True,
            attention_out_bias=True,
            mlp_bias=True,
        )
    if arch not in ("llama", "qwen2"):
        raise LmforgeError(f"{source}: GGUF arch {arch!r} is not supported (supported: gpt2, llama, qwen2)")
    experts = int(meta.get("expert_count", 0))
    fields.update(
        arch="mixtral" if experts else arch,
        head_dim=int(meta.get("attention.key_length", fields["hidden_size"] // n_head)),
        norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        num_experts=experts,
        num_experts_per_tok=int(meta.get("expert_used_count", 2)),
    )
    if meta.get("rope.scaling.type", "none") not in ("none", "linear"):
        raise LmforgeError(f"{source}: rope scaling type {meta['rope.scaling.type']!r} is not supported")
    if meta.get("rope.scaling.type") == "linear":
        fields["rope_scaling"] = {"rope_type": "linear", "factor": float(meta["rope.scaling.factor"])}
    return fields


# ----------------------------------------------------------------------------- tensors


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's half-split rotary layout -> llama.cpp's adjacent pairs (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_rotary`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rename(key: str) -> str | None:
    if key in _TOP:
        return _TOP[key]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def llama3_rope_factors(c: ModelConfig) -> torch.Tensor:
    """llama.cpp's `rope_freqs` for Llama 3.1 rope scaling (convert_hf_to_gguf.py's LlamaModel)."""
    s = c.rope_scaling or {}
    factor, low, high = s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def to_gguf(state: dict[str, torch.Tensor], c: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """lmforge state dict -> GGUF tensors (float, PyTorch's [out, in] layout; the writer reverses it)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, t in state.items():
        t = t.detach().float().cpu()
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$", key)
        if m:
            experts.setdefault((m.group(1), _EXPERT[m.group(3)]), {})[int(m.group(2))] = t
            continue
        name = _rename(key)
        if name is None:
            raise LmforgeError(f"GGUF export: no GGUF name for tensor {key!r}")
        if arch == "llama" and re.search(r"\.attn_[qk]\.", name):
            heads = c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads
            t = permute_rotary(t, heads)
        out[name] = t
    for (layer, name), by_expert in experts.items():
        out[f"blk.{layer}.{name}.weight"] = torch.stack([by_expert[e] for e in sorted(by_expert)])
    if arch == "gpt2":
        for i in range(c.num_hidden_layers):
            for kind in ("weight", "bias"):
                parts = [out.pop(f"blk.{i}.attn_{p}.{kind}") for p in "qkv"]
                out[f"blk.{i}.attn_qkv.{kind}"] = torch.cat(parts, dim=0)
    if (c.rope_scaling or {}).get("rope_type") == "llama3":
        out["rope_freqs.weight"] = llama3_rope_factors(c)
    if c.tie_word_embeddings:
        out.pop("output.weight", None)  # llama.cpp uses token_embd when output is absent
    return out


def from_gguf(tensors: dict[str, torch.Tensor], c: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """GGUF tensors (float, [out, in]) -> lmforge state dict: the inverse of `to_gguf`."""
    inverse_top = {v: k for k, v in _TOP.items()}
    inverse_layer = {v: k for k, v in _LAYER.items()}
    inverse_expert = {v: k for k, v in _EXPERT.items()}
    state: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue  # recomputed from the config's rope_scaling
        if name in inverse_top:
            state[inverse_top[name]] = t
            continue
        m = re.match(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$", name)
        if not m:
            raise LmforgeError(f"GGUF tensor {name!r} has no lmforge equivalent")
        i, part, kind = m.groups()
        pre = f"model.layers.{i}."
        if part == "attn_qkv":
            q, k, v = t.split([c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2)
            state.update({f"{pre}self_attn.{p}_proj.{kind}": x.contiguous() for p, x in zip("qkv", (q, k, v))})
        elif part in inverse_expert:
            for e in range(t.shape[0]):
                state[f"{pre}mlp.experts.{e}.{inverse_expert[part]}.weight"] = t[e].contiguous()
        elif part in inverse_layer:
            if arch == "llama" and part in ("attn_q", "attn_k"):
                t = unpermute_rotary(t, c.num_attention_heads if part == "attn_q" else c.num_key_value_heads)
            state[f"{pre}{inverse_layer[part]}.{kind}"] = t.contiguous()
        else:
            raise LmforgeError(f"GGUF tensor {name!r} has no lmforge equivalent")
    return state
