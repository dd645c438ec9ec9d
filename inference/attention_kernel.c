/* Causal attention with the release's sink for heads of at most 16 dimensions, float32, AVX-512.

   Compiled and loaded by inference/attention_kernel.py (see there for why C and how it is built).
   Flash attention's running maximum, arranged around what AbsTopK leaves: about 1/4 of each of q, k
   and v nonzero, at dimensions that differ from token to token.

   - Queries sit in the lanes: a pass takes 32 queries (two halves of 16 lanes) and holds, for every
     key of a tile of KT keys, their 32 scores (the array S). The softmax's maximum and sum are then
     per lane: no reduction across lanes until one transpose at the end.
   - Scores: each key keeps its first 4 nonzeros in slots (dimension, value; a zero row of q past
     its count), so most of a key's 32 scores are 4 multiply-adds in registers and one store; the
     rest of its nonzeros (~0.7 per key at 1/4 density) are lists per dimension (key, value) that add
     q[., d] k[j, d] to the stored scores. (Lists alone, every product a load and a store of the
     scores, were 1.09x slower: a 64-byte store per cycle is the limit there.)
   - Outputs: the values are lists per dimension of their nonzeros, in key order (`append_rows`):
     each adds p[., j] v[j, d] to dimension d of the 32 outputs, four keys at a time.
     Both do the work of the nonzeros only. (The previous kernel had the keys in the lanes: it
     summed all 16 value dimensions, then reduced across lanes for each query and tile. With the
     items below this one is ~1.3x faster on one core; bench/README.md.)
   - Scores are kept in units of log2 (q is scaled by log2(e) / sqrt(d)), so the weights are 2^(s - m):
     an integer part and a degree-6 polynomial, no reduction by ln 2 (avx512_util.h, exp2_512).
   - The sink is an extra key with logit `sink[h]` and value zero: it only adds 2^(sink - m) to the
     denominator, so the running sums start from it (m = sink, l = 1).
   - Heads are prepared GROUP at a time, one 16-token block of rows for all of them: the rows of a
     (B, T, H, d) view are H*d floats apart, and touching each page once per group rather than once
     per head halved the preparation's time.

   The summation order differs from torch's flash kernel: results agree to float rounding (the
   tests compare both with a float64 reference). On corrupt input: a key's exactly zero dimensions
   are skipped, so a NaN or inf in a query at a dimension where the key is 0 does not reach that
   score (torch computes 0 * NaN = NaN there); a NaN in a key reaches exactly the queries that see
   it; a NaN in a value also reaches the queries of its 32-query pass that do not (their weight 0
   times NaN, as torch's product of the weights and v gives it to every query). */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx512_util.h"

#define KT 128   /* keys per tile: S is 128 keys x 32 queries, 16 KB, in L1 beside the lists */
#define KB (KT / 16)
#define GROUP 4  /* heads prepared together */
#define LOG2E 1.44269504088896341f

typedef struct {         /* one head, prepared */
    float *QT;      /* per 32-query group, 544 floats: rows d = 0..15 of 32 queries (times log2(e)/sqrt(d)),
                       then a row of zeros */
    int32_t *kslot; /* per key, 4: its first nonzero dimensions as offsets 32 d in a group's QT, 512 past
                       its count ... */
    float *kslotv;  /* ... and their values (0 past its count) */
    float *out;     /* the output rows (16 floats each) until they are copied out */
    int32_t *kidx;  /* per dimension (at d * cap): the offset in S (32 x key index) of each nonzero of k
                       past its key's first 4 ... */
    float *kval;    /* ... and its value */
    int32_t *vidx;  /* likewise for every nonzero of v */
    float *vval;
    int32_t *kptr, *vptr; /* [d * (nblk + 1) + b]: the first entry of key block b in dimension d's list */
} Head;

static inline __m512i load_row(const float *x, int64_t xs, int64_t t, int64_t T, int D) {
    return t < T ? _mm512_castps_si512(_mm512_maskz_loadu_ps(first_lanes(D), x + t * xs)) : _mm512_setzero_si512();
}

#define LANES _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)

/* rows 16b .. 16b+15 (a[r], transposed here) appended to the per-dimension lists (count[d] entries
   so far): every nonzero, or where `only` is given, the dimensions it marks for each row */
static inline void append_rows(__m512i *a, const int32_t *only, int D, int64_t b, int64_t cap, int64_t nblk,
                               int32_t *idx, float *val, int32_t *ptr, int32_t *count) {
    transpose16(a); /* a[d]: dimension d of the 16 rows */
    const __m512i offset = _mm512_slli_epi32(_mm512_add_epi32(LANES, _mm512_set1_epi32((int)(16 * b))), 5);
    const __m512i marks = only ? _mm512_loadu_si512(only) : _mm512_setzero_si512();
    for (int d = 0; d < D; d++) {
        ptr[d * (nblk + 1) + b] = count[d];
        const __m512 c = _mm512_castsi512_ps(a[d]);
        const __mmask16 m = only ? _mm512_test_epi32_mask(marks, _mm512_set1_epi32(1 << d))
                                 : _mm512_cmp_ps_mask(c, _mm512_setzero_ps(), _CMP_NEQ_UQ); /* NaN counts */
        _mm512_storeu_ps(val + d * cap + count[d], _mm512_maskz_compress_ps(m, c));
        _mm512_storeu_si512(idx + d * cap + count[d], _mm512_maskz_compress_epi32(m, offset));
        count[d] += __builtin_popcount((unsigned)m);
    }
}

/* rows 16b .. 16b+15 of v, into its lists */
static inline void append_value_block(const float *x, int64_t xs, int64_t T, int D, int64_t b, int64_t cap,
                                      int64_t nblk, const Head *hd, int32_t *count) {
    __m512i a[16];
    for (int r = 0; r < 16; r++) a[r] = load_row(x, xs, 16 * b + r, T, D);
    append_rows(a, NULL, D, b, cap, nblk, hd->vidx, hd->vval, hd->vptr, count);
}

/* rows 16b .. 16b+15 of k: each key's first 4 nonzeros into its slots, the rest into the lists */
static inline void append_key_block(const float *x, int64_t xs, int64_t T, int D, int64_t b, int64_t cap,
                                    int64_t nblk, const Head *hd, int32_t *count) {
    __m512i a[16];
    int32_t rest[16];
    for (int r = 0; r < 16; r++) {
        a[r] = load_row(x, xs, 16 * b + r, T, D);
        const __m512 c = _mm512_castsi512_ps(a[r]);
        unsigned nz = _mm512_cmp_ps_mask(c, _mm512_setzero_ps(), _CMP_NEQ_UQ);
        const __m512 first = _mm512_maskz_compress_ps((__mmask16)nz, c); /* zeros past the count */
        const __m512i dims = /* 512: the zero row past the count */
            _mm512_mask_compress_epi32(_mm512_set1_epi32(512), (__mmask16)nz, _mm512_slli_epi32(LANES, 5));
        _mm_storeu_ps(hd->kslotv + 4 * (16 * b + r), _mm512_castps512_ps128(first));
        _mm_storeu_si128((__m128i *)(hd->kslot + 4 * (16 * b + r)), _mm512_castsi512_si128(dims));
        for (int s = 0; s < 4; s++) nz &= nz - 1; /* the nonzeros past the first 4 */
        rest[r] = (int32_t)nz;
    }
    append_rows(a, rest, D, b, cap, nblk, hd->kidx, hd->kval, hd->kptr, count);
}

/* which lanes of a query half see key j of the last two key blocks (from `jd` on): key 16(2g) + t
   is seen by half 0's lanes t.. and all of half 1; key 16(2g+1) + t by none of half 0 and by half
   1's lanes t.. (keys past T have no entries; the queries that could see them are past T too) */
static inline __mmask16 sees(int64_t j, int64_t jd, int half) {
    const int t = (int)(j - jd) & 15, second = j - jd >= 16;
    if (half == 0) return second ? 0 : (__mmask16)(0xFFFFu << t);
    return second ? (__mmask16)(0xFFFFu << t) : 0xFFFF;
}

static void one_head(const Head *hd, int64_t T, int D, int has_sink, float sink, float *S, float *acc) {
    const int64_t nblk = (T + 15) >> 4, cap = 16 * nblk + 16, np = nblk + 1;
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t g = 0; 2 * g < nblk; g++) { /* queries 32g .. 32g + 31 */
        const int64_t nkb = 2 * g + 2 < nblk ? 2 * g + 2 : nblk; /* the key blocks they see */
        const float *QG = hd->QT + 544 * g;
        __m512 m0 = has_sink ? _mm512_set1_ps(sink) : ninf, m1 = m0;
        __m512 l0 = has_sink ? _mm512_set1_ps(1.0f) : _mm512_setzero_ps(), l1 = l0;
        memset(acc, 0, 2 * 256 * sizeof(float)); /* [half][d][lane] */
        for (int64_t tb0 = 0; tb0 < nkb; tb0 += KB) {
            const int64_t tb1 = tb0 + KB < nkb ? tb0 + KB : nkb;
            const int64_t nk = 16 * (tb1 - tb0), jd = tb1 > 2 * g ? 16 * (2 * g - tb0) : nk;
            float *Sb = S - 512 * tb0; /* key j's scores: half 0 at Sb + 32j, half 1 at Sb + 32j + 16 */
            const int32_t *sd = hd->kslot + 64 * tb0;
            const float *sv = hd->kslotv + 64 * tb0;
            for (int64_t j = 0; j < nk; j++, sd += 4, sv += 4) { /* each key's first 4 nonzeros */
                __m512 w = _mm512_set1_ps(sv[0]);
                __m512 x0 = _mm512_mul_ps(_mm512_load_ps(QG + sd[0]), w);
                __m512 x1 = _mm512_mul_ps(_mm512_load_ps(QG + sd[0] + 16), w);
#pragma GCC unroll 3
                for (int u = 1; u < 4; u++) {
                    w = _mm512_set1_ps(sv[u]);
                    x0 = _mm512_fmadd_ps(_mm512_load_ps(QG + sd[u]), w, x0);
                    x1 = _mm512_fmadd_ps(_mm512_load_ps(QG + sd[u] + 16), w, x1);
                }
                _mm512_store_ps(S + 32 * j, x0);
                _mm512_store_ps(S + 32 * j + 16, x1);
            }
            for (int d = 0; d < D; d++) { /* the rest, dimension by dimension */
                const __m512 q0 = _mm512_load_ps(QG + 32 * d), q1 = _mm512_load_ps(QG + 32 * d + 16);
                const int32_t *ix = hd->kidx + d * cap;
                const float *kv = hd->kval + d * cap;
                const int32_t e1 = hd->kptr[d * np + tb1];
#pragma GCC unroll 4
                for (int32_t e = hd->kptr[d * np + tb0]; e < e1; e++) {
                    float *s = Sb + ix[e];
                    const __m512 w = _mm512_set1_ps(kv[e]);
                    _mm512_store_ps(s, _mm512_fmadd_ps(q0, w, _mm512_load_ps(s)));
                    _mm512_store_ps(s + 16, _mm512_fmadd_ps(q1, w, _mm512_load_ps(s + 16)));
                }
            }
            for (int64_t j = jd; j < nk; j++) { /* the causal mask: -inf where a lane does not see key j */
                float *s = S + 32 * j;
                _mm512_store_ps(s, _mm512_mask_mov_ps(ninf, sees(j, jd, 0), _mm512_load_ps(s)));
                _mm512_store_ps(s + 16, _mm512_mask_mov_ps(ninf, sees(j, jd, 1), _mm512_load_ps(s + 16)));
            }
            __m512 a0 = m0, a1 = ninf, b0 = m1, b1 = ninf;
            for (int64_t j = 0; j < nk; j += 2) {
                a0 = _mm512_max_ps(a0, _mm512_load_ps(S + 32 * j));
                b0 = _mm512_max_ps(b0, _mm512_load_ps(S + 32 * j + 16));
                a1 = _mm512_max_ps(a1, _mm512_load_ps(S + 32 * j + 32));
                b1 = _mm512_max_ps(b1, _mm512_load_ps(S + 32 * j + 48));
            }
            const __m512 mn0 = _mm512_max_ps(a0, a1), mn1 = _mm512_max_ps(b0, b1);
            /* what came before, rescaled to the new maximum (while m is -inf, nothing came before) */
            const __m512 c0 = exp2_512(_mm512_sub_ps(m0, mn0)), c1 = exp2_512(_mm512_sub_ps(m1, mn1));
            m0 = mn0;
            m1 = mn1;
            /* the weights, in place of the scores; summed per 16-key block, then per tile (one running
               sum per lane over the tile was the denominator's largest rounding error: rms error
               against float64 2.4e-7 of the output's scale; now 2.1e-7, the previous kernel 2.0e-7) */
            __m512 s[8];
            for (int u = 0; u < 8; u++) s[u] = _mm512_setzero_ps();
            for (int64_t jb = 0; jb < jd; jb += 16) {
                __m512 t[8];
                for (int u = 0; u < 8; u++) t[u] = _mm512_setzero_ps();
                for (int64_t j = jb; j < jb + 16; j += 4) {
#pragma GCC unroll 8
                    for (int u = 0; u < 8; u++) {
                        float *sj = S + 32 * j + 16 * u;
                        const __m512 p = exp2_512(_mm512_sub_ps(_mm512_load_ps(sj), u & 1 ? mn1 : mn0));
                        t[u] = _mm512_add_ps(t[u], p);
                        _mm512_store_ps(sj, p);
                    }
                }
                for (int u = 0; u < 8; u++) s[u] = _mm512_add_ps(s[u], t[u]);
            }
            for (int64_t j = jd; j < nk; j++) { /* masked lanes weigh 0 (2^-inf is clamped, not 0) */
                float *sj = S + 32 * j;
                const __m512 p0 =
                    _mm512_maskz_mov_ps(sees(j, jd, 0), exp2_512(_mm512_sub_ps(_mm512_load_ps(sj), mn0)));
                const __m512 p1 =
                    _mm512_maskz_mov_ps(sees(j, jd, 1), exp2_512(_mm512_sub_ps(_mm512_load_ps(sj + 16), mn1)));
                s[0] = _mm512_add_ps(s[0], p0);
                s[1] = _mm512_add_ps(s[1], p1);
                _mm512_store_ps(sj, p0);
                _mm512_store_ps(sj + 16, p1);
            }
            const __m512 t0 = _mm512_add_ps(_mm512_add_ps(s[0], s[2]), _mm512_add_ps(s[4], s[6]));
            const __m512 t1 = _mm512_add_ps(_mm512_add_ps(s[1], s[3]), _mm512_add_ps(s[5], s[7]));
            l0 = _mm512_fmadd_ps(l0, c0, t0);
            l1 = _mm512_fmadd_ps(l1, c1, t1);
            for (int d = 0; d < D; d++) { /* the weighted values, four keys at a time */
                const int32_t *ix = hd->vidx + d * cap;
                const float *vv = hd->vval + d * cap;
                const int32_t e1 = hd->vptr[d * np + tb1];
                __m512 x[4], y[4];
                for (int u = 0; u < 4; u++) x[u] = y[u] = _mm512_setzero_ps();
                int32_t e = hd->vptr[d * np + tb0];
                for (; e + 4 <= e1; e += 4) {
#pragma GCC unroll 4
                    for (int u = 0; u < 4; u++) {
                        const float *p = Sb + ix[e + u];
                        const __m512 w = _mm512_set1_ps(vv[e + u]);
                        x[u] = _mm512_fmadd_ps(_mm512_load_ps(p), w, x[u]);
                        y[u] = _mm512_fmadd_ps(_mm512_load_ps(p + 16), w, y[u]);
                    }
                }
                /* the last 0-3 entries without a loop: past the end, a valid address and a zero mask */
#pragma GCC unroll 3
                for (int u = 0; u < 3; u++) {
                    const int in = e + u < e1;
                    const float *p = in ? Sb + ix[e + u] : S;
                    const __m512 w = _mm512_set1_ps(vv[e + u]); /* (within the list's capacity) */
                    x[u] = _mm512_mask3_fmadd_ps(_mm512_load_ps(p), w, x[u], in ? 0xFFFF : 0);
                    y[u] = _mm512_mask3_fmadd_ps(_mm512_load_ps(p + 16), w, y[u], in ? 0xFFFF : 0);
                }
                const __m512 sx = _mm512_add_ps(_mm512_add_ps(x[0], x[1]), _mm512_add_ps(x[2], x[3]));
                const __m512 sy = _mm512_add_ps(_mm512_add_ps(y[0], y[1]), _mm512_add_ps(y[2], y[3]));
                _mm512_store_ps(acc + 16 * d, _mm512_fmadd_ps(_mm512_load_ps(acc + 16 * d), c0, sx));
                _mm512_store_ps(acc + 256 + 16 * d, _mm512_fmadd_ps(_mm512_load_ps(acc + 256 + 16 * d), c1, sy));
            }
        }
        for (int h = 0; h < 2 && 32 * g + 16 * h < T; h++) { /* normalised, back to one row per query */
            __m512i y[16];
            const __m512 l = h ? l1 : l0;
            for (int d = 0; d < 16; d++)
                y[d] = _mm512_castps_si512(_mm512_div_ps(_mm512_load_ps(acc + 256 * h + 16 * d), l));
            transpose16(y);
            for (int r = 0; r < 16; r++) _mm512_store_si512(hd->out + 16 * (32 * g + 16 * h + r), y[r]);
        }
    }
}

/* Heads bh0 .. bh1-1 of the B x H (sequence-major) heads of q, k, v (B, H, T, D): element
   (b, h, t, d) of x at x + b*xs[0] + h*xs[1] + t*xs[2] + d; the output `o` likewise. `sink`: H
   floats or NULL. Returns 0, or 1 for an unsupported D or T (> 2^26), 2 when memory ran out. */
int sink_attention_f32(const float *q, const int64_t *qstr, const float *k, const int64_t *kstr, const float *v,
                       const int64_t *vstr, float *o, const int64_t *ostr, const float *sink, int64_t H, int64_t T,
                       int D, float scale, int64_t bh0, int64_t bh1) {
    if (D < 1 || D > 16) return 1;
    if (T > ((int64_t)1 << 26)) return 1; /* the lists' offsets (32 x key index) are int32 */
    const int64_t nblk = (T + 15) >> 4, cap = 16 * nblk + 16, np = nblk + 1;
    const int64_t ngrp = (nblk + 1) >> 1; /* 32-query groups */
    /* per head: q transposed, the output rows, the k and v lists, their block pointers, the keys'
       slots (~450 bytes per token; a multiple of 16 floats, so each head's arrays stay 64-byte aligned) */
    const size_t head_floats = (size_t)(544 * ngrp + 512 * ngrp + 4 * 16 * cap + 2 * 16 * np + 2 * 64 * nblk);
    float *ws = scratch(0, sizeof(float) * (2 * 16 * KT + 512 + GROUP * head_floats));
    if (!ws) return 2;
    float *S = ws, *acc = S + 2 * 16 * KT;
    Head hd[GROUP];
    for (int i = 0; i < GROUP; i++) {
        float *p = acc + 512 + i * head_floats;
        hd[i].QT = p;
        hd[i].out = p + 544 * ngrp;
        hd[i].kval = hd[i].out + 512 * ngrp;
        hd[i].vval = hd[i].kval + 16 * cap;
        hd[i].kidx = (int32_t *)(hd[i].vval + 16 * cap);
        hd[i].vidx = hd[i].kidx + 16 * cap;
        hd[i].kptr = hd[i].vidx + 16 * cap;
        hd[i].vptr = hd[i].kptr + 16 * np;
        hd[i].kslot = hd[i].vptr + 16 * np;
        hd[i].kslotv = (float *)(hd[i].kslot + 64 * nblk);
    }
    const __m512 qscale = _mm512_set1_ps(scale * LOG2E);
    for (int64_t g0 = bh0; g0 < bh1;) {
        const int64_t b = g0 / H, h0 = g0 % H; /* heads h0 .. h0 + n - 1 of sequence b */
        int64_t n = bh1 - g0 < H - h0 ? bh1 - g0 : H - h0;
        if (n > GROUP) n = GROUP;
        const float *qb = q + b * qstr[0] + h0 * qstr[1], *kb = k + b * kstr[0] + h0 * kstr[1];
        const float *vb = v + b * vstr[0] + h0 * vstr[1];
        int32_t kcount[GROUP][16] = {{0}}, vcount[GROUP][16] = {{0}};
        for (int64_t blk = 0; blk < nblk; blk++)
            for (int64_t i = 0; i < n; i++) {
                append_key_block(kb + i * kstr[1], kstr[2], T, D, blk, cap, nblk, &hd[i], kcount[i]);
                append_value_block(vb + i * vstr[1], vstr[2], T, D, blk, cap, nblk, &hd[i], vcount[i]);
                __m512i a[16];
                for (int r = 0; r < 16; r++) a[r] = load_row(qb + i * qstr[1], qstr[2], 16 * blk + r, T, D);
                transpose16(a);
                for (int d = 0; d < 16; d++)
                    _mm512_store_ps(hd[i].QT + 544 * (blk >> 1) + 16 * (blk & 1) + 32 * d,
                                    _mm512_mul_ps(_mm512_castsi512_ps(a[d]), qscale));
            }
        for (int64_t i = 0; i < n; i++) {
            for (int d = 0; d < D; d++) {
                hd[i].kptr[d * np + nblk] = kcount[i][d];
                hd[i].vptr[d * np + nblk] = vcount[i][d];
            }
            /* the padding queries past T: their rows are never copied out, zeros keep what the
               scratch held (NaNs, denormals) out of the arithmetic */
            for (int64_t g = 0; g < ngrp; g++) memset(hd[i].QT + 544 * g + 512, 0, 32 * sizeof(float));
            if (nblk & 1)
                for (int d = 0; d < 16; d++)
                    memset(hd[i].QT + 544 * (ngrp - 1) + 32 * d + 16, 0, 16 * sizeof(float));
            one_head(&hd[i], T, D, sink != NULL, sink ? sink[h0 + i] * LOG2E : 0.0f, S, acc);
        }
        float *ob = o + b * ostr[0] + h0 * ostr[1];
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = 0; i < n; i++)
                _mm512_mask_storeu_ps(ob + i * ostr[1] + t * ostr[2], first_lanes(D),
                                      _mm512_load_ps(hd[i].out + 16 * t));
        g0 += n;
    }
    return 0;
}

/* 2^x of n floats by the kernel's exp2_512 (the tests check its accuracy against float64) */
void exp2_f32(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = first_lanes(n - i);
        _mm512_mask_storeu_ps(y + i, m, exp2_512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}
