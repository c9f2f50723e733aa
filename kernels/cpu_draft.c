/* One decoder step of a distilled draft on the CPU, fused: see cpu_draft.py for why it exists.
 *
 * For each row b of a batch, one new token at position pos[b]:
 *     x = token_embedding[token] + positional[pos]
 *     x = fuse([x ; fuse_norm(feature)])                       (drafts that read the main model's state)
 *     per block: x += attn(ln(x)) over the row's cache (writing this position's K/V first)
 *                x += cross_attn(ln(x)) over the window's audio K/V
 *                x += fc2(gelu(fc1(ln(x))))
 *     hidden = ln(x)
 * Linear weights are int8 with one fp32 scale per output row (w ~ q * scale), multiplied with fp32
 * activations and accumulated in fp32: a draft's numbers only decide what is proposed, never the
 * output, so rounding its weights is safe. One OpenMP parallel region spans the whole step; each
 * matrix-vector product splits its output rows between the threads.
 *
 * The attention helpers (dot4, dot1, softmax_row, exp8) come from cpu_attention.c, compiled with it.
 */

#include "cpu_attention.c"

#if defined(__AVX2__)
#include <immintrin.h>
/* 8 int8 weights as 8 floats: sign-extend to int32, convert (two instructions) */
static inline v8 widen8(const int8_t* p) {
    return (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
int draft_step_vectorized(void) { return 1; }
#else
static inline v8 widen8(const int8_t* p) {
    v8 r = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
    return r;
}
int draft_step_vectorized(void) { return 0; }  /* plain C: correct, too slow to be worth calling */
#endif

typedef struct {                /* y = (q x) * scale + bias, q: (out, in) int8 row-major */
    const int8_t* q;
    const float* scale;
    const float* bias;          /* NULL: none */
    int64_t out, in;
} Linear8;

typedef struct {
    const float* weight;
    const float* bias;
} Norm;

typedef struct {
    Norm attn_ln, cross_ln, mlp_ln;
    Linear8 qkv, attn_out, cross_query, cross_out, fc1, fc2;
} Block;

typedef struct {
    int64_t n_layer, width, heads, head_dim, n_ctx;
    const float* token_embedding;   /* (n_vocab, width) */
    const float* positional;        /* (n_ctx, width) */
    int has_fuse;
    Linear8 fuse;                   /* (width, 2 * width) */
    Norm fuse_norm, final_ln;
    const Block* blocks;            /* n_layer */
} Draft;

/* y[o] for o in this thread's share of rows; four accumulators keep four FMA chains in flight */
static void linear8(const Linear8* l, const float* x, float* y) {
    #pragma omp for schedule(static)
    for (int64_t o = 0; o < l->out; o++) {
        const int8_t* row = l->q + o * l->in;
        v8 a0 = splat8(0), a1 = splat8(0), a2 = splat8(0), a3 = splat8(0);
        int64_t i = 0;
        for (; i + 32 <= l->in; i += 32) {
            a0 += widen8(row + i) * load8(x + i);
            a1 += widen8(row + i + 8) * load8(x + i + 8);
            a2 += widen8(row + i + 16) * load8(x + i + 16);
            a3 += widen8(row + i + 24) * load8(x + i + 24);
        }
        for (; i + 8 <= l->in; i += 8) a0 += widen8(row + i) * load8(x + i);
        float acc = hsum8((a0 + a1) + (a2 + a3));
        for (; i < l->in; i++) acc += row[i] * x[i];
        y[o] = acc * l->scale[o] + (l->bias ? l->bias[o] : 0.0f);
    }
}

static void layer_norm(const Norm* n, const float* x, float* y, int64_t width) {
    float mean = 0, var = 0;
    for (int64_t i = 0; i < width; i++) mean += x[i];
    mean /= width;
    for (int64_t i = 0; i < width; i++) var += (x[i] - mean) * (x[i] - mean);
    float inv = 1.0f / sqrtf(var / width + 1e-5f);
    for (int64_t i = 0; i < width; i++) y[i] = (x[i] - mean) * inv * n->weight[i] + n->bias[i];
}

/* attention of one query (heads x head_dim) over keys 0..n-1 of one (row's) K/V, heads split between threads */
static void attend_row(const float* q, const float* k, const float* v, int64_t n, int64_t heads, int64_t head_dim,
                       int64_t head_stride, float* out, float* scores) {
    float scale = 1.0f / sqrtf((float)head_dim);
    #pragma omp for schedule(static)
    for (int64_t h = 0; h < heads; h++) {
        const float* kh = k + h * head_stride;
        const float* vh = v + h * head_stride;
        const float* qh = q + h * head_dim;
        float* row = scores + h * n;
        int64_t s = 0;
        for (; s + 4 <= n; s += 4) dot4(qh, kh + s * head_dim, head_dim, scale, row + s);
        for (; s < n; s++) row[s] = dot1(qh, kh + s * head_dim, head_dim, scale);
        softmax_row(row, n);
        v8 acc[DMAX / 8];
        for (int64_t j = 0; j < head_dim / 8; j++) acc[j] = splat8(0);
        for (s = 0; s < n; s++) {
            v8 p = splat8(row[s]);
            for (int64_t j = 0; j < head_dim / 8; j++) acc[j] += p * load8(vh + s * head_dim + 8 * j);
        }
        for (int64_t j = 0; j < head_dim / 8; j++) store8(out + h * head_dim + 8 * j, acc[j]);
    }
}

/* tokens, positions: (B,); features: (B, width) or NULL; k_cache, v_cache: (L, B, H, n_ctx, D);
 * audio_k, audio_v: L pointers to (B, H, n_audio, D); hidden: (B, width) out.
 * scratch: at least 12 * width + heads * (n_ctx + n_audio) floats. */
void draft_step(const Draft* m, int64_t B, const int64_t* tokens, const int64_t* positions, const float* features,
                float* k_cache, float* v_cache, const float* const* audio_k, const float* const* audio_v,
                int64_t n_audio, float* hidden, float* scratch, int threads) {
    const int64_t C = m->width, H = m->heads, D = m->head_dim, S = m->n_ctx;
    float* x = scratch;               /* C */
    float* xn = x + C;                /* 2C: a normed input, or [x ; fuse_norm(feature)] */
    float* qkv = xn + 2 * C;          /* 3C */
    float* attn = qkv + 3 * C;        /* C */
    float* mid = attn + C;            /* 4C */
    float* scores = mid + 4 * C;      /* H * max(n_ctx, n_audio) */
    #pragma omp parallel num_threads(threads)
    for (int64_t b = 0; b < B; b++) {
        int64_t pos = positions[b];
        #pragma omp single
        {
            const float* e = m->token_embedding + tokens[b] * C;
            const float* p = m->positional + pos * C;
            for (int64_t i = 0; i < C; i++) x[i] = e[i] + p[i];
            if (m->has_fuse) {
                memcpy(xn, x, C * sizeof(float));
                layer_norm(&m->fuse_norm, features + b * C, xn + C, C);
            }
        }
        if (m->has_fuse) linear8(&m->fuse, xn, x);
        for (int64_t l = 0; l < m->n_layer; l++) {
            const Block* blk = m->blocks + l;
            float* kc = k_cache + ((l * B + b) * H) * S * D;
            float* vc = v_cache + ((l * B + b) * H) * S * D;
            #pragma omp single
            layer_norm(&blk->attn_ln, x, xn, C);
            linear8(&blk->qkv, xn, qkv);
            #pragma omp single
            for (int64_t h = 0; h < H; h++) {
                memcpy(kc + (h * S + pos) * D, qkv + C + h * D, D * sizeof(float));
                memcpy(vc + (h * S + pos) * D, qkv + 2 * C + h * D, D * sizeof(float));
            }
            attend_row(qkv, kc, vc, pos + 1, H, D, S * D, attn, scores);
            linear8(&blk->attn_out, attn, mid);
            #pragma omp single
            {
                for (int64_t i = 0; i < C; i++) x[i] += mid[i];
                layer_norm(&blk->cross_ln, x, xn, C);
            }
            linear8(&blk->cross_query, xn, qkv);
            attend_row(qkv, audio_k[l] + b * H * n_audio * D, audio_v[l] + b * H * n_audio * D, n_audio, H, D,
                       n_audio * D, attn, scores);
            linear8(&blk->cross_out, attn, mid);
            #pragma omp single
            {
                for (int64_t i = 0; i < C; i++) x[i] += mid[i];
                layer_norm(&blk->mlp_ln, x, xn, C);
            }
            linear8(&blk->fc1, xn, mid);
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < 4 * C; i++) mid[i] = 0.5f * mid[i] * (1.0f + erff(mid[i] * 0.70710678118654752f));
            linear8(&blk->fc2, mid, attn);
            #pragma omp single
            for (int64_t i = 0; i < C; i++) x[i] += attn[i];
        }
        #pragma omp single
        layer_norm(&m->final_ln, x, hidden + b * C, C);
    }
}
