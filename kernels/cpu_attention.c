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

#define CHUNK 64  /* keys per block of the score loop: 64 x D floats of K stay in L1 for every row */
#define DMAX 128  /* largest head dimension (Whisper: 64) */

static inline v8 load8(const float* p) { v8 r; memcpy(&r, p, sizeof r); return r; }
static inline void store8(float* p, v8 a) { memcpy(p, &a, sizeof a); }
static inline v8 splat8(float x) { v8 r = {x, x, x, x, x, x, x, x}; return r; }
static inline v8 select8(vi8 mask, v8 a, v8 b) { return (v8)(((vi8)a & mask) | ((vi8)b & ~mask)); }

/* The 8 lanes summed in a fixed tree. */
static inline float hsum8(v8 a) {
    float s0 = a[0] + a[4], s1 = a[1] + a[5], s2 = a[2] + a[6], s3 = a[3] + a[7];
    return (s0 + s2) + (s1 + s3);
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
    v8 p = r * (1.0f / 720) + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vi8 bits = (__builtin_convertvector(n, vi8) + 127) << 23;
    v8 two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* Scores of four consecutive keys: four independent FMA chains, each summing d in the same order
 * as `dot1` does (a key's score does not depend on which of the two computed it). */
static inline void dot4(const float* q, const float* k, int64_t D, float scale, float* out) {
    v8 a0 = splat8(0), a1 = splat8(0), a2 = splat8(0), a3 = splat8(0);
    for (int64_t d = 0; d < D; d += 8) {
        v8 qd = load8(q + d);
        a0 += qd * load8(k + d);
        a1 += qd * load8(k + D + d);
        a2 += qd * load8(k + 2 * D + d);
        a3 += qd * load8(k + 3 * D + d);
    }
    out[0] = hsum8(a0) * scale;
    out[1] = hsum8(a1) * scale;
    out[2] = hsum8(a2) * scale;
    out[3] = hsum8(a3) * scale;
}

static inline float dot1(const float* q, const float* k, int64_t D, float scale) {
    v8 a = splat8(0);
    for (int64_t d = 0; d < D; d += 8) a += load8(q + d) * load8(k + d);
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
                for (; s + 4 <= end; s += 4) dot4(qh + t * D, kh + s * D, D, scale, row + s);
                for (; s < end; s++) row[s] = dot1(qh + t * D, kh + s * D, D, scale);
            }
        }
        for (int64_t t = 0; t < T; t++) softmax_row(scores + t * S, nk[t]);

        /* out = p v: each row sums its keys in order, one 8-wide accumulator per 8 outputs */
        for (int64_t t = 0; t < T; t++) {
            v8 acc[DMAX / 8];
            for (int64_t j = 0; j < D / 8; j++) acc[j] = splat8(0);
            const float* p = scores + t * S;
            for (int64_t s = 0; s < nk[t]; s++) {
                v8 ps = splat8(p[s]);
                const float* vs = vh + s * D;
                for (int64_t j = 0; j < D / 8; j++) acc[j] += ps * load8(vs + 8 * j);
            }
            for (int64_t j = 0; j < D / 8; j++) store8(oh + t * D + 8 * j, acc[j]);
        }
    }
}
