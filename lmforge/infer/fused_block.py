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
/* One pre-norm Llama block (RMSNorm, GQA attention with RoPE, SwiGLU MLP) for T consecutive tokens of one
   sequence: T = 1 decodes; T > 1 verifies a speculative proposal or prefills (each matrix is read once for
   all T rows; row t attends to the cache slots up to its own, pos + t). */
typedef struct {
    mat_t q, k, v, o, gate, up, down;
    const float *ln1, *ln2;
    float eps, scale;
    int64_t hidden, n_heads, n_kv, head_dim, rot_dim, inter;
} layer_t;

typedef struct { float *xn, *tmp, *q, *att, *kk, *vv, *g, *u, *sc; int64_t s_max; } scratch_t;

static float *alloc_f(int64_t n) { return (float *)malloc((size_t)(n > 0 ? n : 1) * sizeof(float)); }

/* buffers for T rows at most and S = pos + T keys at most */
static void scratch_init(scratch_t *s, const layer_t *L, int64_t n_layers, int64_t S, int64_t T) {
    int64_t H = 0, QD = 0, KD = 0, I = 0, NH = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        const layer_t *y = L + l;
        H = y->hidden > H ? y->hidden : H, I = y->inter > I ? y->inter : I, NH = y->n_heads > NH ? y->n_heads : NH;
        QD = y->n_heads * y->head_dim > QD ? y->n_heads * y->head_dim : QD;
        KD = y->n_kv * y->head_dim > KD ? y->n_kv * y->head_dim : KD;
    }
    s->xn = alloc_f(T * H), s->tmp = alloc_f(T * H), s->q = alloc_f(T * QD), s->att = alloc_f(T * QD);
    s->kk = alloc_f(T * KD), s->vv = alloc_f(T * KD), s->g = alloc_f(T * I), s->u = alloc_f(T * I);
    s->sc = alloc_f(T * NH * S), s->s_max = S;
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

/* Called by every thread of a team (or serially): h [T, hidden] updated in place; kc / vc: this layer's
   cache [n_kv, max_len, head_dim], slots pos .. pos + T - 1 written; cs / sn [T, rot_dim]. Serial steps
   run in `single` (with its barrier). */
static void layer_step(float *h, int64_t T, const layer_t *L, float *kc, float *vc, int64_t pos, int64_t max_len,
                       const float *cs, const float *sn, scratch_t *W) {
    int64_t H = L->hidden, nh = L->n_heads, nkv = L->n_kv, hd = L->head_dim, group = nh / nkv, rd = L->rot_dim;
    int64_t QD = nh * hd, KD = nkv * hd;
    #pragma omp single
    for (int64_t t = 0; t < T; t++) rmsnorm(h + t * H, L->ln1, L->eps, H, W->xn + t * H);
    mat_t qkv[3] = {L->q, L->k, L->v};
    float *ys[3] = {W->q, W->kk, W->vv};
    matvecs(qkv, 3, W->xn, T, ys);
    #pragma omp single
    for (int64_t t = 0; t < T; t++) {
        rope(W->q + t * QD, nh, hd, rd, cs + t * rd, sn + t * rd);
        rope(W->kk + t * KD, nkv, hd, rd, cs + t * rd, sn + t * rd);
        for (int64_t j = 0; j < nkv; j++) {
            memcpy(kc + (j * max_len + pos + t) * hd, W->kk + t * KD + j * hd, (size_t)hd * sizeof(float));
            memcpy(vc + (j * max_len + pos + t) * hd, W->vv + t * KD + j * hd, (size_t)hd * sizeof(float));
        }
    }
    #pragma omp for schedule(static)
    for (int64_t th = 0; th < T * nh; th++) {
        int64_t t = th / nh, hq = th % nh, S = pos + t + 1;
        const float *qh = W->q + t * QD + hq * hd, *kb = kc + (hq / group) * max_len * hd;
        const float *vb = vc + (hq / group) * max_len * hd;
        float *s = W->sc + th * W->s_max, *o = W->att + t * QD + hq * hd, mx = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < S; j++) s[j] = dot_f32(kb + j * hd, qh, hd) * L->scale, mx = fmaxf(mx, s[j]);
        for (int64_t j = 0; j < S; j++) s[j] = expf(s[j] - mx), sum += s[j];
        for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
        for (int64_t j = 0; j < S; j++) {
            const float *vt = vb + j * hd;
            float p = s[j] / sum;
            for (int64_t i = 0; i < hd; i++) o[i] += p * vt[i];
        }
    }
    float *yo[1] = {W->tmp};
    matvecs(&L->o, 1, W->att, T, yo);
    #pragma omp single
    for (int64_t t = 0; t < T; t++) {
        for (int64_t i = 0; i < H; i++) h[t * H + i] += W->tmp[t * H + i];
        rmsnorm(h + t * H, L->ln2, L->eps, H, W->xn + t * H);
    }
    mat_t gu[2] = {L->gate, L->up};
    float *ygu[2] = {W->g, W->u};
    matvecs(gu, 2, W->xn, T, ygu);
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < T * L->inter; i++) W->g[i] = W->g[i] / (1.0f + expf(-W->g[i])) * W->u[i];
    matvecs(&L->down, 1, W->g, T, yo);
    #pragma omp single
    for (int64_t i = 0; i < T * H; i++) h[i] += W->tmp[i];
}

void llama_layer(float *h, int64_t T, const layer_t *L, float *kc, float *vc, int64_t pos, int64_t max_len,
                 const float *cs, const float *sn, int threads) {
    scratch_t W;
    scratch_init(&W, L, 1, pos + T, T);
    #pragma omp parallel if(threads > 1) num_threads(threads)
    layer_step(h, T, L, kc, vc, pos, max_len, cs, sn, &W);
    scratch_free(&W);
}

/* T tokens' forward in one team: embedding rows of `tokens` (table [vocab, hidden] fp32, times emb_scale),
   every layer, then the final RMSNorm and the head for the last `keep` rows (logits [keep, vocab]).
   kcs / vcs: each layer's cache. */
void llama_forward(const float *emb, const int64_t *tokens, int64_t T, float emb_scale, const layer_t *layers,
                   int64_t n_layers, float *const *kcs, float *const *vcs, int64_t pos, int64_t max_len,
                   const float *cs, const float *sn, const float *norm, const mat_t *head, int64_t keep,
                   float *logits, int threads) {
    int64_t H = layers[0].hidden;
    float *h = alloc_f(T * H), *xn = alloc_f(keep * H);
    scratch_t W;
    scratch_init(&W, layers, n_layers, pos + T, T);
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < H; i++) h[t * H + i] = emb[tokens[t] * H + i] * emb_scale;
    #pragma omp parallel if(threads > 1) num_threads(threads)
    {
        for (int64_t l = 0; l < n_layers; l++) layer_step(h, T, layers + l, kcs[l], vcs[l], pos, max_len, cs, sn, &W);
        #pragma omp single
        for (int64_t t = 0; t < keep; t++) rmsnorm(h + (T - keep + t) * H, norm, layers[0].eps, H, xn + t * H);
        matvecs(head, 1, xn, keep, &logits);
    }
    scratch_free(&W);
    free(h); free(xn);
}

/* Greedy drafting in one call: feed `tokens` [T] at pos, take the argmax of the head (row r stands for token
   ids[r], or r without ids), feed it, ... up to k proposals into out. After the first, a proposal whose
   probability is below min_conf is dropped and drafting stops (it was fed: the cache holds it). cs / sn: the
   rotary rows of positions pos .. pos + T + k - 2. Returns the tokens fed (the cache's new valid length - pos);
   *n_out: the proposals kept. */
int64_t llama_propose(const float *emb, const int64_t *tokens, int64_t T, const layer_t *layers, int64_t n_layers,
                      float *const *kcs, float *const *vcs, int64_t pos, int64_t max_len, const float *cs,
                      const float *sn, const float *norm, const mat_t *head, const int64_t *ids, int64_t k,
                      float min_conf, int64_t *out, int64_t *n_out, int threads) {
    int64_t V = head->n, fed = 0, rd = layers[0].rot_dim;
    float *logits = alloc_f(V);
    *n_out = 0;
    for (int64_t i = 0; i < k; i++) {
        const int64_t *feed = i == 0 ? tokens : out + i - 1;
        int64_t n = i == 0 ? T : 1;
        llama_forward(emb, feed, n, 1.0f, layers, n_layers, kcs, vcs, pos + fed, max_len, cs + fed * rd,
                      sn + fed * rd, norm, head, 1, logits, threads);
        fed += n;
        int64_t best = 0;
        for (int64_t r = 1; r < V; r++) best = logits[r] > logits[best] ? r : best;
        if (i > 0 && min_conf > 0.0f) {
            float sum = 0.0f;
            for (int64_t r = 0; r < V; r++) sum += expf(logits[r] - logits[best]);
            if (1.0f / sum < min_conf) break;
        }
        out[(*n_out)++] = ids ? ids[best] : best;
    }
    free(logits);
    return fed;
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

    def forward(input_ids=None, **kw):
        cache = kw.get("kv_cache")
        start = kw.get("start_pos", 0)
        if not (
            type(cache) is KVCache
            and isinstance(input_ids, torch.Tensor)
            and input_ids.dim() == 2
            and input_ids.shape[0] == 1
            and 0 < input_ids.shape[1] <= MAX_ROWS
            and kw.keys() <= _STEP_ARGS
            and not (kw.get("inputs_embeds") is not None or kw.get("return_hidden") or kw.get("return_aux_loss"))
            and start + input_ids.shape[1] <= cache.max_len
            and _f32(cache.k[0])
            and not torch.is_grad_enabled()
            and all(b.self_attn.kv_prefix is None for b in m.layers)
            and (kw.get("attention_mask") is None or bool(kw["attention_mask"].all()))
        ):
            return torch_forward(input_ids, **kw)
        tokens = input_ids.reshape(-1).to(torch.int64).contiguous()
        T = tokens.numel()
        if not (0 <= int(tokens.min()) and int(tokens.max()) < emb.num_embeddings):
            return torch_forward(input_ids, **kw)
        keep = min(int(kw.get("logits_to_keep") or T), T)
        cos, sin = rope(kw.get("position_ids"), start, T)
        kcs, vcs = pointers(cache)
        logits = torch.empty(1, keep, vocab)
        lib.llama_forward(
            emb.weight.data_ptr(), tokens.data_ptr(), T, 1.0, table, len(specs), kcs, vcs, start, cache.max_len,
            cos.data_ptr(), sin.data_ptr(), norm.weight.data_ptr(), ctypes.byref(head), keep, logits.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        return logits

    ids = getattr(model, "ids", None)  # a sub-vocabulary head's row -> token id
    id_map = None if ids is None else ids.to(torch.int64).contiguous()

    def propose(tokens: list[int], cache, start: int, k: int, min_confidence: float) -> tuple[list[int], int] | None:
        """Up to k greedy proposals after feeding `tokens` at `start`, in one C call (`llama_propose`), and how
        many tokens were fed; None where the one-call step does not apply."""
        T = len(tokens)
        if not (
            type(cache) is KVCache
            and 0 < T <= MAX_ROWS
            and k > 0
            and start + T + k - 1 <= cache.max_len
            and _f32(cache.k[0])
            and all(b.self_attn.kv_prefix is None for b in m.layers)
            and all(0 <= t < emb.num_embeddings for t in tokens)
        ):
            return None
        feed = torch.tensor(tokens, dtype=torch.int64)
        cos, sin = rope(None, start, T + k - 1)
        kcs, vcs = pointers(cache)
        out, n_out = (ctypes.c_int64 * k)(), ctypes.c_int64()
        fed = lib.llama_propose(
            emb.weight.data_ptr(), feed.data_ptr(), T, table, len(specs), kcs, vcs, start, cache.max_len,
            cos.data_ptr(), sin.data_ptr(), norm.weight.data_ptr(), ctypes.byref(head),
            None if id_map is None else id_map.data_ptr(), k, min_confidence, out, ctypes.byref(n_out),
            torch.get_num_threads(),
        )  # fmt: skip
        return list(out[: n_out.value]), fed

    model.forward = forward
    model._lmforge_propose = propose


# Rows one call takes: a decode step (1), a speculative verification (k + 1) or a prefill chunk; a longer
# prompt takes the torch path, whose batched matrix products are faster there.
MAX_ROWS = 64


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
_STEP_ARGS |= {"return_hidden", "return_aux_loss"}  # when false
