"""The C source of `fused_block`: one Llama block for T consecutive tokens of one sequence, the whole
forward of T tokens in one OpenMP team, and greedy drafting (k forwards and argmaxes) in one call. Compiled
after `lmforge.quant.cpu_kernel.SOURCE` (its `mat_t`, `matvecs` and `dot_f32`) into one library."""

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

#if defined(__AVX512F__)
/* e^x for 16 lanes: Cephes' expf (x = n ln2 + r, a degree-6 polynomial in r, times 2^n by vscalefps),
   within ~1 ulp of libm's; x is clamped to [-87.3, 88.7] (e^x then under/overflows as libm's would). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* g[i] = silu(g[i]) * u[i] for n values: the SwiGLU gate, 16 lanes at a time where AVX-512 is there (the
   scalar expf over every intermediate value of every row was ~3% of a 110M model's token) */
static void silu_mul(float *g, const float *u, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i);
        __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), _mm512_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void swiglu(float *g, const float *u, int64_t n) { silu_mul(g, u, n); }  /* for the tests */

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
    for (int64_t i0 = 0; i0 < T * L->inter; i0 += 256) silu_mul(W->g + i0, W->u + i0, T * L->inter - i0 < 256 ? T * L->inter - i0 : 256);
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
        if (keep > 0) matvecs(head, 1, xn, keep, &logits);  /* keep 0: a prompt chunk before the last */
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
