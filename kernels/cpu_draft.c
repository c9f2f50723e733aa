/* A distilled draft on the CPU, fused: its decoder step, and whole rounds of greedy drafting.
 * See cpu_draft.py for why it exists.
 *
 * draft_step: for each row b, one new token at position pos[b]:
 *     x = token_embedding[token] + positional[pos]
 *     x = fuse([x ; fuse_norm(feature)])                       (drafts that read the main model's state)
 *     per block: x += attn(ln(x)) over the row's cache (writing this position's K/V first)
 *                x += cross_attn(ln(x)) over the window's audio K/V
 *                x += fc2(gelu(fc1(ln(x))))
 *     hidden = ln(x)
 * draft_propose: from each row's last hidden state, γ times: the shortlist head's scores, Whisper's
 * rules (suppressed tokens, blank suppression, timestamp rules) in the shortlist's layout, the argmax,
 * and (but after the last) a step feeding that token with the draft's own hidden state as its feature.
 *
 * The window's cross-attention K/V are read in fp16 (half the bytes of a step).
 * Linear layers are int8 (one scale per output row) times int8 activations quantized per call (one
 * scale per vector), accumulated in int32: integer dot products (AVX-512 VNNI, else AVX2) do 16 to
 * 64 multiply-adds per instruction. A draft's numbers only decide what is proposed, never the output.
 * One OpenMP parallel region spans a call; each matrix-vector product splits its rows between threads.
 * The attention helpers (dot4, dot1, softmax_row) come from cpu_attention.c, compiled with it.
 */

#include "cpu_attention.c"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__)
int draft_step_vectorized(void) { return 1; }
#else
int draft_step_vectorized(void) { return 0; }  /* plain C: right, but slower than the PyTorch modules */
#endif

/* 8 fp16 values (a draft's cross-attention K/V) as 8 floats */
static inline v8 load8h(const uint16_t* p) {
#if defined(__F16C__)
    return (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#else
    v8 r;
    for (int j = 0; j < 8; j++) {  /* IEEE half -> float by bits (normal numbers and zeros; K/V hold no others) */
        uint32_t h = p[j], sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
        uint32_t bits = exponent ? sign | ((exponent + 112) << 23) | (mantissa << 13) : sign;
        memcpy(&r[j], &bits, 4);
    }
    return r;
#endif
}

typedef struct {                /* y = (q x) * scale + bias, q: (out, in) int8 row-major */
    const int8_t* q;
    const float* scale;
    const float* bias;          /* NULL: none */
    const int32_t* row_sum;     /* sum of each row of q (VNNI's unsigned-activation correction) */
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
    Linear8 head;                   /* shortlist head (K, width), in the layout below */
    const int64_t* head_ids;        /* (K,): position -> token id. 0: end-of-text, 1..n_timestamps: the
                                       timestamps in order, then text tokens */
    const uint8_t* suppressed;      /* (K,): never proposed */
    const uint8_t* begin_suppressed;/* (K,): not as a row's first token */
    int64_t n_timestamps, timestamp_begin, max_initial_timestamp; /* -1: no limit */
    int timestamps;                 /* the timestamp rules apply */
} Draft;

typedef struct {                    /* an input vector quantized for the integer dot products */
    uint8_t* unsigned_q;            /* q + 128, for VNNI */
    int16_t* wide_q;                /* q, for AVX2 */
    float scale;
} Quantized;

static void quantize(const float* x, int64_t n, Quantized* out) {
    float m = 0;
    for (int64_t i = 0; i < n; i++) m = fabsf(x[i]) > m ? fabsf(x[i]) : m;
    float scale = m > 0 ? m / 127.0f : 1.0f, inv = 1.0f / scale;
    for (int64_t i = 0; i < n; i++) {
        int q = (int)lrintf(x[i] * inv);
        q = q > 127 ? 127 : q < -127 ? -127 : q;
        out->unsigned_q[i] = (uint8_t)(q + 128);
        out->wide_q[i] = (int16_t)q;
    }
    out->scale = scale;
}

static int32_t dot_i8(const int8_t* w, const Quantized* x, int64_t n, int32_t row_sum) {
    int64_t i = 0;
    int32_t acc = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (n % 64 == 0) {  /* Whisper's widths: 512, 1024, 2048 */
        __m512i a = _mm512_setzero_si512();
        for (; i < n; i += 64)
            a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(x->unsigned_q + i), _mm512_loadu_si512(w + i));
        return _mm512_reduce_add_epi32(a) - 128 * row_sum;  /* the activations were shifted by +128 */
    }
#endif
#if defined(__AVX2__)
    __m256i a = _mm256_setzero_si256();
    for (; i + 16 <= n; i += 16) {
        __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + i)));
        a = _mm256_add_epi32(a, _mm256_madd_epi16(wv, _mm256_loadu_si256((const __m256i*)(x->wide_q + i))));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    acc = _mm_cvtsi128_si32(s);
#endif
    (void)row_sum;
    for (; i < n; i++) acc += w[i] * x->wide_q[i];
    return acc;
}

/* y = W x + b for an input x every thread sees; rows split between the threads */
static void linear8(const Linear8* l, const float* x, float* y, Quantized* buffer) {
    #pragma omp single
    quantize(x, l->in, buffer);
    #pragma omp for schedule(static)
    for (int64_t o = 0; o < l->out; o++) {
        int32_t acc = dot_i8(l->q + o * l->in, buffer, l->in, l->row_sum ? l->row_sum[o] : 0);
        y[o] = acc * l->scale[o] * buffer->scale + (l->bias ? l->bias[o] : 0.0f);
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

/* cross-attention of one query over fp16 K/V (heads x n x head_dim), heads split between threads */
static void attend_row_half(const float* q, const uint16_t* k, const uint16_t* v, int64_t n, int64_t heads,
                            int64_t head_dim, float* out, float* scores) {
    float scale = 1.0f / sqrtf((float)head_dim);
    #pragma omp for schedule(static)
    for (int64_t h = 0; h < heads; h++) {
        const uint16_t* kh = k + h * n * head_dim;
        const uint16_t* vh = v + h * n * head_dim;
        const float* qh = q + h * head_dim;
        float* row = scores + h * n;
        for (int64_t s = 0; s < n; s++) {
            v8 a = splat8(0);
            for (int64_t d = 0; d < head_dim; d += 8) a = fma8(load8(qh + d), load8h(kh + s * head_dim + d), a);
            row[s] = hsum8(a) * scale;
        }
        softmax_row(row, n);
        v8 acc[DMAX / 8];
        for (int64_t j = 0; j < head_dim / 8; j++) acc[j] = splat8(0);
        for (int64_t s = 0; s < n; s++) {
            v8 p = splat8(row[s]);
            for (int64_t j = 0; j < head_dim / 8; j++) acc[j] = fma8(p, load8h(vh + s * head_dim + 8 * j), acc[j]);
        }
        for (int64_t j = 0; j < head_dim / 8; j++) store8(out + h * head_dim + 8 * j, acc[j]);
    }
}

/* attention of one query (heads x head_dim) over keys 0..n-1 of one row's K/V, heads split between threads */
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
            for (int64_t j = 0; j < head_dim / 8; j++) acc[j] = fma8(p, load8(vh + s * head_dim + 8 * j), acc[j]);
        }
        for (int64_t j = 0; j < head_dim / 8; j++) store8(out + h * head_dim + 8 * j, acc[j]);
    }
}

typedef struct {
    float *x, *xn, *qkv, *attn, *mid, *scores;
    Quantized quantized;
} Scratch;

/* Scratch from one float buffer of `scratch_floats(m, n_audio)` floats. */
static Scratch carve(const Draft* m, float* buffer, int64_t n_audio) {
    int64_t C = m->width, longest = m->n_ctx > n_audio ? m->n_ctx : n_audio;
    Scratch s;
    s.x = buffer;                        /* C */
    s.xn = s.x + C;                      /* 2C: a normed input, or [x ; fuse_norm(feature)] */
    s.qkv = s.xn + 2 * C;                /* 3C */
    s.attn = s.qkv + 3 * C;              /* C */
    s.mid = s.attn + C;                  /* 4C */
    s.scores = s.mid + 4 * C;            /* H * longest */
    float* rest = s.scores + m->heads * longest;
    s.quantized.wide_q = (int16_t*)rest; /* 4C int16 */
    s.quantized.unsigned_q = (uint8_t*)(rest + 2 * C);  /* 4C bytes */
    return s;
}

int64_t scratch_floats(const Draft* m, int64_t n_audio) {
    int64_t longest = m->n_ctx > n_audio ? m->n_ctx : n_audio;
    return 12 * m->width + m->heads * longest + 4 * m->width;
}

/* One position of row b, inside a parallel region: writes its K/V into the cache, leaves ln(x) in hidden. */
static void step_row(const Draft* m, int64_t B, int64_t b, int64_t token, int64_t pos, const float* feature,
                     float* k_cache, float* v_cache, const uint16_t* const* audio_k, const uint16_t* const* audio_v,
                     int64_t n_audio, float* hidden, Scratch* s) {
    const int64_t C = m->width, H = m->heads, D = m->head_dim, S = m->n_ctx;
    #pragma omp single
    {
        const float* e = m->token_embedding + token * C;
        const float* p = m->positional + pos * C;
        for (int64_t i = 0; i < C; i++) s->x[i] = e[i] + p[i];
        if (m->has_fuse) {
            memcpy(s->xn, s->x, C * sizeof(float));
            layer_norm(&m->fuse_norm, feature, s->xn + C, C);
        }
    }
    if (m->has_fuse) linear8(&m->fuse, s->xn, s->x, &s->quantized);
    for (int64_t l = 0; l < m->n_layer; l++) {
        const Block* blk = m->blocks + l;
        float* kc = k_cache + ((l * B + b) * H) * S * D;
        float* vc = v_cache + ((l * B + b) * H) * S * D;
        #pragma omp single
        layer_norm(&blk->attn_ln, s->x, s->xn, C);
        linear8(&blk->qkv, s->xn, s->qkv, &s->quantized);
        #pragma omp single
        for (int64_t h = 0; h < H; h++) {
            memcpy(kc + (h * S + pos) * D, s->qkv + C + h * D, D * sizeof(float));
            memcpy(vc + (h * S + pos) * D, s->qkv + 2 * C + h * D, D * sizeof(float));
        }
        attend_row(s->qkv, kc, vc, pos + 1, H, D, S * D, s->attn, s->scores);
        linear8(&blk->attn_out, s->attn, s->mid, &s->quantized);
        #pragma omp single
        {
            for (int64_t i = 0; i < C; i++) s->x[i] += s->mid[i];
            layer_norm(&blk->cross_ln, s->x, s->xn, C);
        }
        linear8(&blk->cross_query, s->xn, s->qkv, &s->quantized);
        attend_row_half(s->qkv, audio_k[l] + b * H * n_audio * D, audio_v[l] + b * H * n_audio * D, n_audio, H, D,
                        s->attn, s->scores);
        linear8(&blk->cross_out, s->attn, s->mid, &s->quantized);
        #pragma omp single
        {
            for (int64_t i = 0; i < C; i++) s->x[i] += s->mid[i];
            layer_norm(&blk->mlp_ln, s->x, s->xn, C);
        }
        linear8(&blk->fc1, s->xn, s->mid, &s->quantized);
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < 4 * C; i++) s->mid[i] = 0.5f * s->mid[i] * (1.0f + erff(s->mid[i] * 0.70710678118654752f));
        linear8(&blk->fc2, s->mid, s->attn, &s->quantized);
        #pragma omp single
        for (int64_t i = 0; i < C; i++) s->x[i] += s->attn[i];
    }
    #pragma omp single
    layer_norm(&m->final_ln, s->x, hidden, C);
}

/* tokens, positions: (B,); features: (B, width) or NULL; k_cache, v_cache: (L, B, H, n_ctx, D);
 * audio_k, audio_v: L pointers to (B, H, n_audio, D) fp16; hidden: (B, width) out. */
void draft_step(const Draft* m, int64_t B, const int64_t* tokens, const int64_t* positions, const float* features,
                float* k_cache, float* v_cache, const uint16_t* const* audio_k, const uint16_t* const* audio_v,
                int64_t n_audio, float* hidden, float* scratch, int threads) {
    Scratch s = carve(m, scratch, n_audio);
    #pragma omp parallel num_threads(threads)
    for (int64_t b = 0; b < B; b++)
        step_row(m, B, b, tokens[b], positions[b], m->has_fuse ? features + b * m->width : NULL, k_cache, v_cache,
                 audio_k, audio_v, n_audio, hidden + b * m->width, &s);
}

/* Whisper's rules (decoding.LogitRules) on shortlist scores: -inf where the token may not follow. `last`,
 * `before_last`: the row's last two tokens (-1: none), `last_timestamp`: its latest timestamp (-1: none),
 * `n_generated`: how many tokens it has. */
static void apply_rules(const Draft* m, float* scores, int64_t n_generated, int64_t last, int64_t before_last,
                        int64_t last_timestamp) {
    const int64_t K = m->head.out, T = m->n_timestamps, ts = m->timestamp_begin;
    for (int64_t k = 0; k < K; k++)
        if (m->suppressed[k] || (n_generated == 0 && m->begin_suppressed[k])) scores[k] = -INFINITY;
    if (!m->timestamps) return;
    int last_ts = n_generated >= 1 && last >= ts, before_ts = n_generated < 2 || before_last >= ts;
    if (last_ts) {
        if (before_ts) for (int64_t k = 1; k <= T; k++) scores[k] = -INFINITY;   /* text must follow */
        else for (int64_t k = 1 + T; k < K; k++) scores[k] = -INFINITY;          /* timestamp or end */
    }
    if (last_timestamp >= 0) {  /* timestamps never go backwards */
        int64_t floor = (last_ts && !before_ts) ? last_timestamp : last_timestamp + 1;
        for (int64_t k = 1; k <= T && k - 1 + ts < floor; k++) scores[k] = -INFINITY;
    }
    if (n_generated == 0) {
        scores[0] = -INFINITY;
        for (int64_t k = 1 + T; k < K; k++) scores[k] = -INFINITY;
        if (m->max_initial_timestamp >= 0)
            for (int64_t k = 2 + m->max_initial_timestamp; k <= T; k++) scores[k] = -INFINITY;
    }
    /* all timestamps together outweigh the best other token: only a timestamp */
    float best_other = -INFINITY, top = -INFINITY;
    for (int64_t k = 0; k < K; k++) top = scores[k] > top ? scores[k] : top;
    if (top == -INFINITY) return;
    best_other = scores[0];
    for (int64_t k = 1 + T; k < K; k++) best_other = scores[k] > best_other ? scores[k] : best_other;
    double sum_ts = 0;
    for (int64_t k = 1; k <= T; k++) sum_ts += exp((double)scores[k] - top);
    if (sum_ts > 0 && log(sum_ts) + top > best_other) {
        scores[0] = -INFINITY;
        for (int64_t k = 1 + T; k < K; k++) scores[k] = -INFINITY;
    }
}

/* Up to gamma greedy drafts per active row, starting from hidden (B, width), the draft's state after each
 * row's last fed token at positions (B,). Rows stop after end-of-text. out_tokens: (B, gamma), n_out: (B,).
 * last/before_last/last_timestamp/n_generated: each row's rule state (see apply_rules), updated in place. */
void draft_propose(const Draft* m, int64_t B, int64_t gamma, const uint8_t* active, float* hidden,
                   const int64_t* positions, int64_t* last, int64_t* before_last, int64_t* last_timestamp,
                   int64_t* n_generated, float* k_cache, float* v_cache, const uint16_t* const* audio_k,
                   const uint16_t* const* audio_v, int64_t n_audio, int64_t* out_tokens, int64_t* n_out,
                   float* scores, float* feature, float* scratch, int threads) {
    Scratch s = carve(m, scratch, n_audio);
    const int64_t K = m->head.out, C = m->width;
    #pragma omp parallel num_threads(threads)
    for (int64_t b = 0; b < B; b++) {
        #pragma omp single
        n_out[b] = 0;
        if (!active[b]) continue;
        for (int64_t step = 0; step < gamma; step++) {
            linear8(&m->head, hidden + b * C, scores, &s.quantized);
            int64_t token;
            #pragma omp single copyprivate(token)
            {
                apply_rules(m, scores, n_generated[b], last[b], before_last[b], last_timestamp[b]);
                int64_t best = 0;
                for (int64_t k = 1; k < K; k++) best = scores[k] > scores[best] ? k : best;
                token = m->head_ids[best];
                out_tokens[b * gamma + step] = token;
                n_out[b] = step + 1;
                before_last[b] = last[b];
                last[b] = token;
                if (token >= m->timestamp_begin) last_timestamp[b] = token;
                n_generated[b] += 1;
                memcpy(feature, hidden + b * C, C * sizeof(float));  /* its own state as the next feature */
            }
            if (token == m->head_ids[0] || step == gamma - 1) break;  /* end-of-text, or the last draft */
            step_row(m, B, b, token, positions[b] + step, feature, k_cache, v_cache, audio_k, audio_v, n_audio,
                     hidden + b * C, &s);
        }
    }
}
