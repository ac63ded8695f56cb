"""Batch-1 decode of a whole Llama block in one C call (`cpu_kernel.llama_layer`).

Why: at batch 1 on CPU a block is ~7 matrix-vector products and ~100 small torch ops; with Q4_0
weights the matmuls of the 110M bench model take ~3 ms per token and the torch ops around them as
long again (each op costs microseconds of dispatch, more on a loaded machine), so llama.cpp, which
runs a block as one compute graph, was 2-4x faster. The C layer does RMSNorm, the q/k/v products
(one parallel loop, one int8 rounding of the input), RoPE with the model's own cos/sin, the KV-cache
write, GQA attention in fp32, o_proj, the residuals and the SwiGLU MLP.

`fuse_blocks(model)` (called by `prepare_for_inference`) gives each eligible block a forward that
takes this path for one token of one sequence with a plain `KVCache` and an all-visible mask, and
otherwise calls the block's own forward. Eligible: pre-norm RMSNorm blocks without qk-norm, score
soft-capping or sliding windows, a SiLU-gated MLP, and linears that are fp32 `nn.Linear` (weight
[out, in]), `Q8_0Linear` or `Q4_0Linear` without an input scale. The results equal the torch path's
up to fp32 summation order (tests: logits within 1e-4, identical greedy tokens).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.kv_cache import KVCache
from lmforge.model.layers import MLP, RMSNorm
from lmforge.quant import cpu_kernel
from lmforge.quant.kernel_linear import BlockLinear


class Mat(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int64), ("w", ctypes.c_void_p), ("d", ctypes.c_void_p), ("bias", ctypes.c_void_p)]
    _fields_ += [("n", ctypes.c_int64), ("k", ctypes.c_int64), ("kp", ctypes.c_int64)]


class Layer(ctypes.Structure):
    _fields_ = [(name, Mat) for name in ("q", "k", "v", "o", "gate", "up", "down")]
    _fields_ += [("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p), ("eps", ctypes.c_float), ("scale", ctypes.c_float)]
    _fields_ += [(n, ctypes.c_int64) for n in ("hidden", "n_heads", "n_kv", "head_dim", "rot_dim", "inter")]


def _f32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def _mat(m: nn.Module) -> Mat | None:
    bias = getattr(m, "bias", None)
    if not _f32(bias):
        return None
    b = None if bias is None else bias.data_ptr()
    if isinstance(m, BlockLinear) and m.input_scale is None and m.qweight.device.type == "cpu":
        kp = m.padded_in_features
        return Mat(m.bits, m.qweight.data_ptr(), m.scales.data_ptr(), b, m.out_features, m.in_features, kp)
    if isinstance(m, nn.Linear) and type(m).forward in (nn.Linear.forward, KernelLinear.forward) and _f32(m.weight):
        return Mat(0, m.weight.data_ptr(), None, b, m.out_features, m.in_features, m.in_features)
    return None


class KernelLinear(nn.Linear):
    """nn.Linear (weight [out, in], same state dict) whose forward at a few rows is the C gemv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > 8 * self.in_features or x.dtype != torch.float32 or torch.is_grad_enabled():
            return super().forward(x)
        lib = cpu_kernel.library()
        y = cpu_kernel.f32_linear(x.reshape(-1, self.in_features), self.weight.detach(), lib)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def layer_spec(block: nn.Module, config) -> Layer | None:
    """The C description of `block`, or None when it is not a block the C layer computes exactly."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    norms = (getattr(block, "input_layernorm", None), getattr(block, "post_attention_layernorm", None))
    if attn is None or type(mlp) is not MLP or mlp.gate_proj is None or mlp.act is not F.silu:
        return None
    if block.norm_position != "pre" or block.window is not None or config.position != "rope":
        return None
    if attn.qk_norm is not None or attn.softcap is not None or attn.num_heads % attn.num_kv_heads:
        return None
    if not all(type(n) is RMSNorm and n.offset == 0 and _f32(n.weight) for n in norms):
        return None
    rot = int(attn.head_dim * config.partial_rotary_factor)
    if rot > 1024 or rot % 2:
        return None
    mats = [_mat(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj)]
    mats.append(_mat(mlp.down_proj))
    if any(m is None for m in mats):
        return None
    scale = attn.scale if attn.scale is not None else attn.head_dim**-0.5
    return Layer(
        *mats,
        norms[0].weight.data_ptr(),
        norms[1].weight.data_ptr(),
        norms[0].eps,
        scale,
        config.hidden_size,
        attn.num_heads,
        attn.num_kv_heads,
        attn.head_dim,
        rot,
        mlp.up_proj.out_features,
    )


def _fast_forward(block: nn.Module, spec: Layer, lib: ctypes.CDLL):
    torch_forward = block.forward
    seen_mask: list = [None, False]  # the last mask checked (the same object reaches every layer of a step)

    def forward(x, rope, mask, kv_cache=None, start_pos: int = 0, is_causal: bool = False):
        if not (
            type(kv_cache) is KVCache
            and x.shape[0] == 1
            and x.shape[1] == 1
            and x.dtype == torch.float32
            and rope is not None
            and block.self_attn.kv_prefix is None
            and not (torch.is_grad_enabled() and x.requires_grad)
            and start_pos < kv_cache.max_len
            and _visible(mask, seen_mask)
        ):
            return torch_forward(x, rope, mask, kv_cache, start_pos, is_causal)
        kc, vc = kv_cache.k[block.self_attn.layer_idx], kv_cache.v[block.self_attn.layer_idx]
        if not (_f32(kc) and _f32(vc)):
            return torch_forward(x, rope, mask, kv_cache, start_pos, is_causal)
        h = x.reshape(-1).clone()
        cos, sin = rope[0].reshape(-1).contiguous(), rope[1].reshape(-1).contiguous()
        lib.llama_layer(
            h.data_ptr(),
            ctypes.byref(spec),
            kc.data_ptr(),
            vc.data_ptr(),
            start_pos,
            kv_cache.max_len,
            cos.data_ptr(),
            sin.data_ptr(),
            torch.get_num_threads(),
        )
        return h.view(x.shape), None

    return forward


def _visible(mask, seen: list) -> bool:
    """True when the mask hides nothing (None, or all True): the C layer attends to every cached slot."""
    if mask is None:
        return True
    if seen[0] is not mask:
        seen[0], seen[1] = mask, bool(mask.all())
    return seen[1]


def fuse_blocks(model: nn.Module) -> int:
    """Give every eligible block of `model` the C decode path; returns how many got it (0 without
    the C kernels or a fitting architecture). Weights must not be replaced afterwards: the C
    description holds their addresses (prepare again after loading new weights)."""
    lib = cpu_kernel.library()
    config = getattr(model, "config", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if lib is None or config is None or layers is None or config.rope_scaling and "longrope" in str(config.rope_scaling):
        return 0
    fused = 0
    for block in layers:
        spec = layer_spec(block, config)
        if spec is not None:
            # the struct, and every tensor whose address it holds, live as long as the block
            block._lmforge_layer_spec = spec, [t for t in block.state_dict(keep_vars=True).values()]
            block.forward = _fast_forward(block, spec, lib)
            fused += 1
    return fused
