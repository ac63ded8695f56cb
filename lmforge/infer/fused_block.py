"""Batch-1 decode, verification and prefill of Llama blocks in one C call (`llama_layer`, `llama_forward`).

Why: at batch 1 on CPU a block is ~7 matrix-vector products and ~100 small torch ops; with Q4_0
weights the matmuls of the 110M bench model take ~3 ms per token and the torch ops around them as
long again (each op costs microseconds of dispatch, more on a loaded machine), so llama.cpp, which
runs a block as one compute graph, was 2-4x faster. The C layer does RMSNorm, the q/k/v products
(one parallel loop, one int8 rounding of the input), RoPE with the model's own cos/sin, the KV-cache
write, GQA attention in fp32, o_proj, the residuals and the SwiGLU MLP.

`fuse_blocks(model)` (called by `prepare_for_inference`) gives each eligible block a forward that
takes this path for one token of one sequence with a plain `KVCache` and an all-visible mask, and
otherwise calls the block's own forward. When every block, the final norm and the head qualify, the
model's forward takes T tokens of one sequence in one C call (`llama_forward`): a decode step (T = 1),
a speculative verification (k + 1 rows, each matrix read once for all of them, row t attending up to
slot start + t) or a prompt in chunks of 64 rows (with fp32 matrices only up to 16 rows: past that,
torch's batched products are faster); `_lmforge_propose` drafts k greedy tokens in one call.
Eligible: pre-norm RMSNorm blocks without qk-norm, score soft-capping or sliding windows, a SiLU-gated
MLP, and linears that are fp32 (`nn.Linear`, or a `transposed` type holding `weight_t`), `Q8_0Linear`
or `Q4_0Linear` without an input scale. The results equal the torch path's up to fp32 summation order
(tests: logits within 1e-4, identical greedy tokens).
"""

from __future__ import annotations

import ctypes
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.kv_cache import KVCache
from lmforge.model.layers import MLP, RMSNorm
from lmforge.quant import cpu_kernel
from lmforge.quant.kernel_linear import BlockLinear

from .fused_block_source import BLOCK_SOURCE  # the C of the block, the whole step and greedy drafting


class Mat(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int64), ("w", ctypes.c_void_p), ("d", ctypes.c_void_p), ("bias", ctypes.c_void_p)]
    _fields_ += [("n", ctypes.c_int64), ("k", ctypes.c_int64), ("kp", ctypes.c_int64)]


class Layer(ctypes.Structure):
    _fields_ = [(name, Mat) for name in ("q", "k", "v", "o", "gate", "up", "down")]
    _fields_ += [("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p), ("eps", ctypes.c_float), ("scale", ctypes.c_float)]
    _fields_ += [(n, ctypes.c_int64) for n in ("hidden", "n_heads", "n_kv", "head_dim", "rot_dim", "inter")]


def _f32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous())


def _mat(m: nn.Module, transposed: tuple[type, ...] = ()) -> Mat | None:
    """`transposed`: module types holding an fp32 `weight_t` [in, out] (prepare's TransposedLinear; passed
    in, as prepare imports this module)."""
    bias = getattr(m, "bias", None)
    if not _f32(bias):
        return None
    b = None if bias is None else bias.data_ptr()
    if isinstance(m, BlockLinear) and m.input_scale is None and m.qweight.device.type == "cpu":
        kp = m.padded_in_features
        return Mat(m.bits, m.qweight.data_ptr(), m.scales.data_ptr(), b, m.out_features, m.in_features, kp)
    if type(m) in transposed and _f32(m.weight_t):
        return Mat(1, m.weight_t.data_ptr(), None, b, m.out_features, m.in_features, m.in_features)
    if type(m) is nn.Linear and _f32(m.weight):
        return Mat(0, m.weight.data_ptr(), None, b, m.out_features, m.in_features, m.in_features)
    return None


def block_library(kernel: str = "native") -> ctypes.CDLL | None:
    """cpu_kernel's library with the block step compiled in (None without a compiler)."""
    lib = cpu_kernel.library(kernel, BLOCK_SOURCE)
    if lib is not None and lib.llama_layer.restype is not None:  # ctypes' default restype (int): not declared yet
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.llama_layer.restype = lib.llama_forward.restype = None
        lib.llama_layer.argtypes = [ptr, i64] + [ptr] * 3 + [i64] * 2 + [ptr] * 2 + [ctypes.c_int]
        lib.llama_forward.argtypes = [ptr, ptr, i64, ctypes.c_float, ptr, i64, ptr, ptr, i64, i64] + [ptr] * 4
        lib.llama_forward.argtypes += [i64, ptr, ctypes.c_int]
        lib.llama_propose.restype = i64
        lib.llama_propose.argtypes = [ptr, ptr, i64, ptr, i64, ptr, ptr, i64, i64] + [ptr] * 5
        lib.llama_propose.argtypes += [i64, ctypes.c_float, ptr, ptr, ctypes.c_int]
    return lib


def layer_spec(block: nn.Module, config, transposed: tuple[type, ...] = ()) -> Layer | None:
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
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    mats = [_mat(m, transposed) for m in linears]
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
            1,
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


def fuse_blocks(model: nn.Module, kernel: str = "native", transposed: tuple[type, ...] = ()) -> int:
    """Give every eligible block of `model` the C decode path, and the model a one-call decode step
    when every block, the final norm and the head qualify; returns how many blocks got it (0 without
    the C kernels or a fitting architecture). The C descriptions hold the weights' addresses (and
    references that keep them alive): prepare again after replacing weights (not needed after an
    in-place load_state_dict). `kernel`: the C path (native, avx2, scalar; tests force the narrower)."""
    lib = block_library(kernel)
    config = getattr(model, "config", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if lib is None or config is None or layers is None or "longrope" in str(config.rope_scaling):
        return 0
    specs = []
    for block in layers:
        spec = layer_spec(block, config, transposed)
        if spec is not None:
            # the struct, and every tensor whose address it holds, live as long as the block
            block._lmforge_layer_spec = spec, list(block.state_dict(keep_vars=True).values())
            block.forward = _fast_forward(block, spec, lib)
            specs.append(spec)
    model.model._lmforge_kernel = kernel
    if len(specs) == len(layers) and len(specs):
        _fuse_model(model, specs, lib, transposed)
    return len(specs)


def fuse_step(model: nn.Module, transposed: tuple[type, ...] = ()) -> bool:
    """Give `model`, a causal LM over a backbone whose blocks `fuse_blocks` already fused (a draft with a
    sub-vocabulary head shares its backbone), the one-call step over its own head; True when it got it.
    `transposed`: the head's module types that hold an fp32 `weight_t` [in, out]."""
    backbone = getattr(model, "model", None)
    blocks = getattr(backbone, "layers", None) or []
    specs = [getattr(b, "_lmforge_layer_spec", (None,))[0] for b in blocks]
    if not specs or any(spec is None for spec in specs):
        return False
    _fuse_model(model, specs, block_library(backbone._lmforge_kernel), transposed)
    return hasattr(model, "_lmforge_step_spec")


def _fuse_model(model: nn.Module, specs: list[Layer], lib: ctypes.CDLL, transposed: tuple[type, ...]) -> None:
    """The whole decode step in one C call: embedding row, blocks, final norm, head."""
    c, m = model.config, model.model
    emb, norm, head = m.embed_tokens, m.norm, _mat(model.lm_head, transposed)
    if (
        head is None
        or c.final_logit_softcapping is not None
        or hasattr(m, "rotary_local")
        or type(norm) is not RMSNorm
        or norm.offset != 0
        or ctypes.c_float(norm.eps).value != specs[0].eps
        or not _f32(emb.weight)
        or not _f32(norm.weight)
        or type(emb) is not nn.Embedding  # (Gemma's scaled embedding has offset norms: not fused anyway)
    ):
        return
    table = (Layer * len(specs))(*specs)
    model._lmforge_step_spec = table, head, list(model.state_dict(keep_vars=True).values())
    torch_forward = model.forward
    vocab = model.lm_head.out_features

    rope = _RopeTable(m.rotary)
    pointers = _CachePointers()
    step_team, propose_team = TeamSize(), TeamSize()
    # With fp32 matrices, prompts longer than a verification take torch's batched products (faster there).
    max_rows = MAX_F32_ROWS if any(mat.type < 4 for mat in _mats(specs, head)) else 1 << 62
    attentions = [b.self_attn for b in m.layers]

    def fits(cache, end: int, ids: list[int]) -> bool:
        """The C step can write slots up to `end` of `cache` and embed `ids` (one sequence, fp32 cache)."""
        return (
            type(cache) is KVCache
            and end <= cache.max_len
            and _f32(cache.k[0])
            and cache.k[0].shape[0] == 1
            and all(a.kv_prefix is None for a in attentions)  # prefix tuning: the torch path's
            and 0 <= min(ids)
            and max(ids) < emb.num_embeddings
        )

    def forward(input_ids=None, **kw):
        cache = kw.get("kv_cache")
        start = kw.get("start_pos", 0)
        if not (
            isinstance(input_ids, torch.Tensor)
            and input_ids.dim() == 2
            and input_ids.shape[0] == 1
            and 0 < input_ids.shape[1] <= max_rows
            and kw.keys() <= _STEP_ARGS
            and not (kw.get("inputs_embeds") is not None or kw.get("return_hidden") or kw.get("return_aux_loss"))
            and not torch.is_grad_enabled()
            and fits(cache, start + input_ids.shape[1], ids := input_ids[0].tolist())
            and (kw.get("attention_mask") is None or bool(kw["attention_mask"].all()))
        ):
            return torch_forward(input_ids, **kw)
        tokens = torch.tensor(ids, dtype=torch.int64)
        T = len(ids)
        keep = min(int(kw.get("logits_to_keep") or T), T)
        if keep > (T - 1) % MAX_ROWS + 1:  # the logits wanted span more than the last chunk's rows
            return torch_forward(input_ids, **kw)
        cos, sin = rope(kw.get("position_ids"), start, T)
        kcs, vcs = pointers(cache)
        logits = torch.empty(1, keep, vocab)
        threads, began = step_team(), time.perf_counter()
        for c0 in range(0, T, MAX_ROWS):  # a long prompt in chunks: each row attends to the slots before it
            n = min(MAX_ROWS, T - c0)
            lib.llama_forward(
                emb.weight.data_ptr(), tokens[c0:].data_ptr(), n, 1.0, table, len(specs), kcs, vcs, start + c0,
                cache.max_len, cos[c0:].data_ptr(), sin[c0:].data_ptr(), norm.weight.data_ptr(), ctypes.byref(head),
                keep if c0 + n == T else 0, logits.data_ptr(), threads,
            )  # fmt: skip
        if T == 1:  # decode steps are alike: their times choose the team size
            step_team.record(threads, time.perf_counter() - began)
        return logits

    ids = getattr(model, "ids", None)  # a sub-vocabulary head's row -> token id
    id_map = None if ids is None else ids.to(torch.int64).contiguous()

    def propose(tokens: list[int], cache, start: int, k: int, min_confidence: float) -> tuple[list[int], int] | None:
        """Up to k greedy proposals after feeding `tokens` at `start`, in one C call (`llama_propose`), and how
        many tokens were fed; None where the one-call step does not apply."""
        T = len(tokens)
        if not (0 < T <= MAX_ROWS and k > 0 and fits(cache, start + T + k - 1, tokens)):
            return None
        feed = torch.tensor(tokens, dtype=torch.int64)
        cos, sin = rope(None, start, T + k - 1)
        kcs, vcs = pointers(cache)
        out, n_out = (ctypes.c_int64 * k)(), ctypes.c_int64()
        threads, began = propose_team(), time.perf_counter()
        fed = lib.llama_propose(
            emb.weight.data_ptr(), feed.data_ptr(), T, table, len(specs), kcs, vcs, start, cache.max_len,
            cos.data_ptr(), sin.data_ptr(), norm.weight.data_ptr(), ctypes.byref(head),
            None if id_map is None else id_map.data_ptr(), k, min_confidence, out, ctypes.byref(n_out), threads,
        )  # fmt: skip
        propose_team.record(threads, (time.perf_counter() - began) / fed)
        return list(out[: n_out.value]), fed

    model.forward = forward
    model._lmforge_propose = propose


# Rows one C call takes: a decode step (1), a speculative verification (k + 1) or a chunk of a prompt.
MAX_ROWS = 64
MAX_F32_ROWS = 16


def _mats(specs: list[Layer], head: Mat) -> list[Mat]:
    return [getattr(spec, name) for spec in specs for name in ("q", "k", "v", "o", "gate", "up", "down")] + [head]


class TeamSize:
    """How many threads a C call runs on: torch's thread count, or 1 where that is faster. Beside another
    CPU-bound program, a thread of a 2-thread team on the busy core waits a time slice at each of a step's
    dozens of barriers (bench/contention.py: decoding 4.8x slower beside one busy loop), while one thread
    keeps the free core to itself. So the calls are timed (wall clock): each cycle of CYCLE calls starts
    with PROBE calls on the current size and PROBE on the other, and the faster median stays for the rest
    of the cycle. When quiet this costs PROBE of CYCLE calls on the slower size (~1%)."""

    CYCLE, PROBE = 512, 8

    def __init__(self):
        self.best, self.calls, self.seconds = 0, 0, {}

    def __call__(self) -> int:
        n = torch.get_num_threads()
        if n == 1:
            return 1
        if self.best not in (1, n):  # the first call, or torch's thread count changed: start over
            self.best, self.calls = n, 0
        phase = self.calls % self.CYCLE
        return self.best if phase < self.PROBE or phase >= 2 * self.PROBE else (1 if self.best != 1 else n)

    def record(self, threads: int, seconds: float) -> None:
        phase = self.calls % self.CYCLE
        self.calls += 1
        if phase >= 2 * self.PROBE or torch.get_num_threads() == 1:
            return
        self.seconds.setdefault(threads, []).append(seconds)
        if phase == 2 * self.PROBE - 1:  # both sizes timed: keep the faster
            times = {t: statistics.median(v) for t, v in self.seconds.items()}
            self.best, self.seconds = min(times, key=times.get), {}


class _RopeTable:
    """cos / sin rows [T, rot_dim] for positions start .. start + T - 1 from a table grown on demand (the
    rotary embedding is a function of the position alone: longrope, which is not, never gets here), or
    computed for explicit position_ids."""

    def __init__(self, rotary: nn.Module):
        self.rotary, self.cos, self.sin = rotary, torch.empty(0), torch.empty(0)

    def __call__(self, positions, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is not None:
            cos, sin = self.rotary(positions.reshape(1, T), torch.float32)
            return cos.reshape(T, -1).contiguous(), sin.reshape(T, -1).contiguous()
        if start + T > self.cos.shape[0]:
            n = max(2 * self.cos.shape[0], start + T, 256)
            cos, sin = self.rotary(torch.arange(n)[None], torch.float32)
            self.cos, self.sin = cos.reshape(n, -1).contiguous(), sin.reshape(n, -1).contiguous()
        return self.cos[start : start + T], self.sin[start : start + T]


class _CachePointers:
    """The ctypes arrays of a KVCache's per-layer key and value addresses, rebuilt when the cache changes."""

    def __init__(self):
        self.key, self.arrays = None, None

    def __call__(self, cache: KVCache):
        key = tuple(t.data_ptr() for t in cache.k) + tuple(t.data_ptr() for t in cache.v)
        if key != self.key:
            n = len(cache.k)
            self.key = key
            self.arrays = (ctypes.c_void_p * n)(*key[:n]), (ctypes.c_void_p * n)(*key[n:])
        return self.arrays


# Keyword arguments the one-call step accepts (anything else, e.g. attn_mask, takes the torch forward).
_STEP_ARGS = {"inputs_embeds", "attention_mask", "position_ids", "kv_cache", "start_pos", "logits_to_keep"}
_STEP_ARGS |= {"return_hidden", "return_aux_loss"}  # accepted when false
