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
soft-capping or sliding windows, a SiLU-gated MLP, and linears that are fp32 (`TransposedLinear`
or `nn.Linear`), `Q8_0Linear` or `Q4_0Linear` without an input scale. The results equal the torch path's
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

BLOCK_SOURCE = r"""
/* One pre-norm Llama block (RMSNorm, GQA attention with RoPE, SwiGLU MLP) for one token at batch 1. */
typedef struct {
    mat_t q, k, v, o, gate, up, down;
    const float *ln1, *ln2;
    float eps, scale;
    int64_t hidden, n_heads, n_kv, head_dim, rot_dim, inter;
} layer_t;

typedef struct { float *xn, *tmp, *q, *att, *kk, *vv, *g, *u, *sc; } scratch_t;

static void scratch_init(scratch_t *s, const layer_t *L, int64_t n_layers, int64_t S) {
    int64_t H = 0, QD = 0, KD = 0, I = 0, NS = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        const layer_t *y = L + l;
        H = y->hidden > H ? y->hidden : H, I = y->inter > I ? y->inter : I;
        QD = y->n_heads * y->head_dim > QD ? y->n_heads * y->head_dim : QD;
        KD = y->n_kv * y->head_dim > KD ? y->n_kv * y->head_dim : KD;
        NS = y->n_heads * S > NS ? y->n_heads * S : NS;
    }
    s->xn = (float *)malloc((size_t)H * sizeof(float)), s->tmp = (float *)malloc((size_t)H * sizeof(float));
    s->q = (float *)malloc((size_t)QD * sizeof(float)), s->att = (float *)malloc((size_t)QD * sizeof(float));
    s->kk = (float *)malloc((size_t)KD * sizeof(float)), s->vv = (float *)malloc((size_t)KD * sizeof(float));
    s->g = (float *)malloc((size_t)I * sizeof(float)), s->u = (float *)malloc((size_t)I * sizeof(float));
    s->sc = (float *)malloc((size_t)NS * sizeof(float));
}

static void scratch_free(scratch_t *s) {
    free(s->xn); free(s->tmp); free(s->q); free(s->att); free(s->kk); free(s->vv); free(s->g); free(s->u); free(s->sc);
}

static void rmsnorm(const float *x, const float *w, float eps, int64_t n, float *out) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

static void rope(float *x, int64_t heads, int64_t hd, int64_t rd, const float *cs, const float *sn) {
    int64_t half = rd / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * hd, tmp[1024];
        for (int64_t i = 0; i < rd; i++) tmp[i] = v[i];
        for (int64_t i = 0; i < rd; i++) v[i] = tmp[i] * cs[i] + (i < half ? -tmp[i + half] : tmp[i - half]) * sn[i];
    }
}

/* Called by every thread of a team (or serially): h [hidden] updated in place; kc / vc: this layer's
   cache [n_kv, max_len, head_dim], slot pos written. Serial steps run in `single` (with its barrier). */
static void layer_step(float *h, const layer_t *L, float *kc, float *vc, int64_t pos, int64_t max_len,
                       const float *cs, const float *sn, scratch_t *W) {
    int64_t H = L->hidden, nh = L->n_heads, nkv = L->n_kv, hd = L->head_dim, S = pos + 1, group = nh / nkv;
    #pragma omp single
    rmsnorm(h, L->ln1, L->eps, H, W->xn);
    mat_t qkv[3] = {L->q, L->k, L->v};
    float *ys[3] = {W->q, W->kk, W->vv};
    matvecs(qkv, 3, W->xn, 1, ys);
    #pragma omp single
    {
        rope(W->q, nh, hd, L->rot_dim, cs, sn);
        rope(W->kk, nkv, hd, L->rot_dim, cs, sn);
        for (int64_t j = 0; j < nkv; j++) {
            memcpy(kc + (j * max_len + pos) * hd, W->kk + j * hd, (size_t)hd * sizeof(float));
            memcpy(vc + (j * max_len + pos) * hd, W->vv + j * hd, (size_t)hd * sizeof(float));
        }
    }
    #pragma omp for schedule(static)
    for (int64_t hq = 0; hq < nh; hq++) {
        const float *qh = W->q + hq * hd, *kb = kc + (hq / group) * max_len * hd, *vb = vc + (hq / group) * max_len * hd;
        float *s = W->sc + hq * S, *o = W->att + hq * hd, mx = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < S; t++) s[t] = dot_f32(kb + t * hd, qh, hd) * L->scale, mx = fmaxf(mx, s[t]);
        for (int64_t t = 0; t < S; t++) s[t] = expf(s[t] - mx), sum += s[t];
        for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
        for (int64_t t = 0; t < S; t++) {
            const float *vt = vb + t * hd;
            float p = s[t] / sum;
            for (int64_t i = 0; i < hd; i++) o[i] += p * vt[i];
        }
    }
    float *yo[1] = {W->tmp};
    matvecs(&L->o, 1, W->att, 1, yo);
    #pragma omp single
    {
        for (int64_t i = 0; i < H; i++) h[i] += W->tmp[i];
        rmsnorm(h, L->ln2, L->eps, H, W->xn);
    }
    mat_t gu[2] = {L->gate, L->up};
    float *ygu[2] = {W->g, W->u};
    matvecs(gu, 2, W->xn, 1, ygu);
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < L->inter; i++) W->g[i] = W->g[i] / (1.0f + expf(-W->g[i])) * W->u[i];
    matvecs(&L->down, 1, W->g, 1, yo);
    #pragma omp single
    for (int64_t i = 0; i < H; i++) h[i] += W->tmp[i];
}

void llama_layer(float *h, const layer_t *L, float *kc, float *vc, int64_t pos, int64_t max_len, const float *cs,
                 const float *sn, int threads) {
    scratch_t W;
    scratch_init(&W, L, 1, pos + 1);
    #pragma omp parallel if(threads > 1) num_threads(threads)
    layer_step(h, L, kc, vc, pos, max_len, cs, sn, &W);
    scratch_free(&W);
}

/* A whole decode step in one team: embedding row of `token` (table [vocab, hidden] fp32, times emb_scale),
   every layer, the final RMSNorm and the head (logits [vocab]). kcs / vcs: each layer's cache. */
void llama_forward(const float *emb, int64_t token, float emb_scale, const layer_t *layers, int64_t n_layers,
                   float *const *kcs, float *const *vcs, int64_t pos, int64_t max_len, const float *cs,
                   const float *sn, const float *norm, const mat_t *head, float *logits, int threads) {
    int64_t H = layers[0].hidden;
    float *h = (float *)malloc((size_t)H * sizeof(float)), *xn = (float *)malloc((size_t)H * sizeof(float));
    scratch_t W;
    scratch_init(&W, layers, n_layers, pos + 1);
    for (int64_t i = 0; i < H; i++) h[i] = emb[token * H + i] * emb_scale;
    #pragma omp parallel if(threads > 1) num_threads(threads)
    {
        for (int64_t l = 0; l < n_layers; l++) layer_step(h, layers + l, kcs[l], vcs[l], pos, max_len, cs, sn, &W);
        #pragma omp single
        rmsnorm(h, norm, layers[0].eps, H, xn);
        matvecs(head, 1, xn, 1, &logits);
    }
    scratch_free(&W);
    free(h); free(xn);
}
"""


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
        lib.llama_layer.argtypes = [ptr] * 4 + [i64] * 2 + [ptr] * 2 + [ctypes.c_int]
        lib.llama_forward.argtypes = [ptr, i64, ctypes.c_float, ptr, i64, ptr, ptr, i64, i64] + [ptr] * 5
        lib.llama_forward.argtypes += [ctypes.c_int]
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
    if len(specs) == len(layers) and len(specs):
        _fuse_model(model, specs, lib, transposed)
    return len(specs)


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

    def forward(input_ids=None, **kw):
        cache = kw.get("kv_cache")
        start = kw.get("start_pos", 0)
        if not (
            type(cache) is KVCache
            and isinstance(input_ids, torch.Tensor)
            and input_ids.shape == (1, 1)
            and kw.keys() <= _STEP_ARGS
            and kw.get("inputs_embeds") is None
            and start < cache.max_len
            and _f32(cache.k[0])
            and not torch.is_grad_enabled()
            and all(b.self_attn.kv_prefix is None for b in m.layers)
            and (kw.get("attention_mask") is None or bool(kw["attention_mask"].all()))
        ):
            return torch_forward(input_ids, **kw)
        token = int(input_ids)
        if not 0 <= token < emb.num_embeddings:
            return torch_forward(input_ids, **kw)
        positions = kw.get("position_ids")
        if positions is None:
            positions = torch.tensor([[start]])
        cos, sin = (t.reshape(-1).contiguous() for t in m.rotary(positions, torch.float32))
        n = len(specs)
        kcs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in cache.k])
        vcs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in cache.v])
        logits = torch.empty(1, 1, vocab)
        lib.llama_forward(
            emb.weight.data_ptr(), token, 1.0, table, n, kcs, vcs, start, cache.max_len,
            cos.data_ptr(), sin.data_ptr(), norm.weight.data_ptr(), ctypes.byref(head), logits.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return logits

    model.forward = forward


# Keyword arguments the one-call step accepts (anything else, e.g. attn_mask or return_hidden, takes
# the torch forward); logits_to_keep does not matter for one token.
_STEP_ARGS = {"inputs_embeds", "attention_mask", "position_ids", "kv_cache", "start_pos", "logits_to_keep"}
