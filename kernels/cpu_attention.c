/* Batch-invariant decoder attention for the CPU (fp32): see cpu_attention.py for why it exists.
 *
 * out[b,h,t,:] = softmax(q[b,h,t,:] . k[b,h,s,:] * scale, s < n_keys[b,t]) @ v[b,h,s,:]
 *
 * Invariant: a row's result is a function of that row's query, its n_keys and the keys and values
 * it sees, never of how many other rows (T, B) share the call or which slot it sits in. Every loop
 * bound a row's arithmetic depends on is its own n_keys or a fixed constant (D, CHUNK, the vector
 * width), and every sum runs in an order fixed by those bounds. So a verify pass over T positions
 * gives each position the bits a one-token step gives it.
 *
 * Plain C with GCC/Clang vector extensions (8 floats: one AVX2 register, two NEON registers), OpenMP
 * over (row, head) pairs: each pair is computed by one thread from start to end.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

#if defined(__FMA__)
#include <immintrin.h>
#endif

/* a * b + c, rounded once where the CPU has FMA. Written out, never left to the compiler: the library is
 * built with -ffp-contract=off, so that no sum is fused in one loop and not in its twin. */
static inline v8 fma8(v8 a, v8 b, v8 c) {
#if defined(__FMA__)
    return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

#define CHUNK 64  /* keys per block of the score loop: 64 x D floats of K stay in L1 for every row */
#define DMAX 128  /* largest head dimension (Whisper: 64) */

static inline v8 load8(const float* p) { v8 r; memcpy(&r, p, sizeof r); return r; }
static inline void store8(float* p, v8 a) { memcpy(p, &a, sizeof a); }
static inline v8 splat8(float x) { v8 r = {x, x, x, x, x, x, x, x}; return r; }
static inline v8 select8(vi8 mask, v8 a, v8 b) { return (v8)(((vi8)a & mask) | ((vi8)b & ~mask)); }

/* The 8 lanes summed in a fixed tree, ((0+1) + (2+3)) + ((4+5) + (6+7)): the tree `hsum8x8` uses too. */
static inline float hsum8(v8 a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* hsum8 of eight vectors at once: r[j] = hsum8(a_j), by three levels of pairwise shuffles and adds. */
static inline v8 hsum8x8(v8 a0, v8 a1, v8 a2, v8 a3, v8 a4, v8 a5, v8 a6, v8 a7) {
#define EVEN(x, y) __builtin_shufflevector(x, y, 0, 8, 2, 10, 4, 12, 6, 14)
#define ODD(x, y) __builtin_shufflevector(x, y, 1, 9, 3, 11, 5, 13, 7, 15)
    v8 b01 = EVEN(a0, a1) + ODD(a0, a1), b23 = EVEN(a2, a3) + ODD(a2, a3);  /* pairs of lanes */
    v8 b45 = EVEN(a4, a5) + ODD(a4, a5), b67 = EVEN(a6, a7) + ODD(a6, a7);
    v8 c0 = __builtin_shufflevector(b01, b23, 0, 1, 8, 9, 4, 5, 12, 13)
          + __builtin_shufflevector(b01, b23, 2, 3, 10, 11, 6, 7, 14, 15);  /* quads: a0..a3 low, high */
    v8 c1 = __builtin_shufflevector(b45, b67, 0, 1, 8, 9, 4, 5, 12, 13)
          + __builtin_shufflevector(b45, b67, 2, 3, 10, 11, 6, 7, 14, 15);
    return __builtin_shufflevector(c0, c1, 0, 1, 2, 3, 8, 9, 10, 11)
         + __builtin_shufflevector(c0, c1, 4, 5, 6, 7, 12, 13, 14, 15);
#undef EVEN
#undef ODD
}

/* exp(x) for x <= 0 (a score minus its row's max): x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite),
 * exp(r) by its degree-6 Taylor polynomial (relative error < 2e-7), 2^n built in the exponent bits.
 * Below -87 the result is clamped at exp(-87), ~1e-38: nothing next to the row's own max term (1). */
static inline v8 exp8(v8 x) {
    const v8 lowest = splat8(-87.0f);
    x = select8(x < lowest, lowest, x);
    v8 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    v8 r = x - n * 0.693145751953125f;                              /* ln2, high part (exact in n * hi) */
    r = r - n * 1.428606765330187045e-06f;                          /* ln2, low part */
    v8 p = fma8(r, splat8(1.0f / 720), splat8(1.0f / 120));
    p = fma8(p, r, splat8(1.0f / 24));
    p = fma8(p, r, splat8(1.0f / 6));
    p = fma8(p, r, splat8(0.5f));
    p = fma8(p, r, splat8(1.0f));
    p = fma8(p, r, splat8(1.0f));
    vi8 bits = (__builtin_convertvector(n, vi8) + 127) << 23;
    v8 two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* Scores of eight consecutive keys: eight independent FMA chains, each summing d in the same order as
 * `dot1` does, reduced by the same tree (a key's score does not depend on which of the two computed it). */
static inline void dot8(const float* q, const float* k, int64_t D, float scale, float* out) {
    v8 a[8];
    for (int j = 0; j < 8; j++) a[j] = splat8(0);
    for (int64_t d = 0; d < D; d += 8) {
        v8 qd = load8(q + d);
        for (int j = 0; j < 8; j++) a[j] = fma8(qd, load8(k + j * D + d), a[j]);
    }
    store8(out, hsum8x8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]) * scale);
}

/* Four keys (the drafts' kernel): the same chains and tree as dot1. */
static inline void dot4(const float* q, const float* k, int64_t D, float scale, float* out) {
    v8 a0 = splat8(0), a1 = splat8(0), a2 = splat8(0), a3 = splat8(0);
    for (int64_t d = 0; d < D; d += 8) {
        v8 qd = load8(q + d);
        a0 = fma8(qd, load8(k + d), a0);
        a1 = fma8(qd, load8(k + D + d), a1);
        a2 = fma8(qd, load8(k + 2 * D + d), a2);
        a3 = fma8(qd, load8(k + 3 * D + d), a3);
    }
    out[0] = hsum8(a0) * scale;
    out[1] = hsum8(a1) * scale;
    out[2] = hsum8(a2) * scale;
    out[3] = hsum8(a3) * scale;
}

static inline float dot1(const float* q, const float* k, int64_t D, float scale) {
    v8 a = splat8(0);
    for (int64_t d = 0; d < D; d += 8) a = fma8(load8(q + d), load8(k + d), a);
    return hsum8(a) * scale;
}

/* row[0..n) <- softmax(row[0..n)), in place. The max is exact in any order; the sum of exponentials
 * runs in 8 lanes over whole groups of 8, then the remaining keys one by one, then 1 / sum. */
static void softmax_row(float* row, int64_t n) {
    int64_t s = 0;
    v8 mv = splat8(-INFINITY);
    for (; s + 8 <= n; s += 8) {
        v8 x = load8(row + s);
        mv = select8(x > mv, x, mv);
    }
    float m = -INFINITY;
    for (int j = 0; j < 8; j++) m = mv[j] > m ? mv[j] : m;
    for (; s < n; s++) m = row[s] > m ? row[s] : m;
    v8 lanes = splat8(0);
    for (s = 0; s + 8 <= n; s += 8) {
        v8 e = exp8(load8(row + s) - m);
        store8(row + s, e);
        lanes += e;
    }
    float tail = 0;
    for (; s < n; s++) {
        float e = exp8(splat8(row[s] - m))[0];
        row[s] = e;
        tail += e;
    }
    float inv = 1.0f / (hsum8(lanes) + tail);
    for (s = 0; s < n; s++) row[s] *= inv;
}

/* out[0..D) = sum over s < n of p[s] v[s, :], in order of s */
static void weighted_sum1(const float* p, int64_t n, const float* v, int64_t D, float* out) {
    v8 acc[DMAX / 8];
    for (int64_t j = 0; j < D / 8; j++) acc[j] = splat8(0);
    for (int64_t s = 0; s < n; s++) {
        v8 ps = splat8(p[s]);
        for (int64_t j = 0; j < D / 8; j++) acc[j] = fma8(ps, load8(v + s * D + 8 * j), acc[j]);
    }
    for (int64_t j = 0; j < D / 8; j++) store8(out + 8 * j, acc[j]);
}

/* weighted_sum1 for two rows sharing the V rows both read: the same arithmetic per row */
static void weighted_sum2(const float* p0, const float* p1, int64_t n0, int64_t n1, const float* v, int64_t D,
                          float* out0, float* out1) {
    v8 a0[DMAX / 8], a1[DMAX / 8];
    for (int64_t j = 0; j < D / 8; j++) a0[j] = a1[j] = splat8(0);
    int64_t both = n0 < n1 ? n0 : n1, s = 0;
    for (; s < both; s++) {
        v8 ps0 = splat8(p0[s]), ps1 = splat8(p1[s]);
        for (int64_t j = 0; j < D / 8; j++) {
            v8 vs = load8(v + s * D + 8 * j);
            a0[j] = fma8(ps0, vs, a0[j]);
            a1[j] = fma8(ps1, vs, a1[j]);
        }
    }
    for (int64_t r = s; r < n0; r++)
        for (int64_t j = 0; j < D / 8; j++) a0[j] = fma8(splat8(p0[r]), load8(v + r * D + 8 * j), a0[j]);
    for (int64_t r = s; r < n1; r++)
        for (int64_t j = 0; j < D / 8; j++) a1[j] = fma8(splat8(p1[r]), load8(v + r * D + 8 * j), a1[j]);
    for (int64_t j = 0; j < D / 8; j++) {
        store8(out0 + 8 * j, a0[j]);
        store8(out1 + 8 * j, a1[j]);
    }
}

/* q, out: (B, H, T, D) contiguous. k, v: (B, H, S, D) with rows D floats apart; k_sb, k_sh, v_sb,
 * v_sh their batch and head strides. n_keys: (B, T), each in 1..S. scratch: B * H * T * S floats.
 * D a multiple of 8, at most DMAX. */
void cached_attention(const float* q, const float* k, const float* v, float* out, const int64_t* n_keys,
                      int64_t B, int64_t H, int64_t T, int64_t D, int64_t S,
                      int64_t k_sb, int64_t k_sh, int64_t v_sb, int64_t v_sh,
                      float scale, float* scratch, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H;
        const float* kh = k + b * k_sb + h * k_sh;
        const float* vh = v + b * v_sb + h * v_sh;
        const float* qh = q + bh * T * D;
        float* oh = out + bh * T * D;
        float* scores = scratch + bh * T * S;
        const int64_t* nk = n_keys + b * T;
        int64_t n_max = 0;
        for (int64_t t = 0; t < T; t++) n_max = nk[t] > n_max ? nk[t] : n_max;

        /* scores: key blocks outer, so one block of K serves every row from L1 */
        for (int64_t s0 = 0; s0 < n_max; s0 += CHUNK) {
            for (int64_t t = 0; t < T; t++) {
                int64_t end = s0 + CHUNK < nk[t] ? s0 + CHUNK : nk[t];
                float* row = scores + t * S;
                int64_t s = s0;
                for (; s + 8 <= end; s += 8) dot8(qh + t * D, kh + s * D, D, scale, row + s);
                for (; s < end; s++) row[s] = dot1(qh + t * D, kh + s * D, D, scale);
            }
        }
        for (int64_t t = 0; t < T; t++) softmax_row(scores + t * S, nk[t]);

        /* out = p v: each row sums its keys in order, one 8-wide accumulator per 8 outputs; rows go in
           pairs so that each V row loaded serves two (a row's sums are the same either way) */
        int64_t t = 0;
        for (; t + 2 <= T; t += 2) weighted_sum2(scores + t * S, scores + (t + 1) * S, nk[t], nk[t + 1], vh, D,
                                               oh + t * D, oh + (t + 1) * D);
        for (; t < T; t++) weighted_sum1(scores + t * S, nk[t], vh, D, oh + t * D);
    }
}
