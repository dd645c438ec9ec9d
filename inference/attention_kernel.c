/* Causal attention with the release's sink for heads of at most 16 dimensions, float32, AVX-512.

   Compiled and loaded by inference/attention_kernel.py (see there for why C and how it is built).
   One (sequence, head) at a time, as flash attention does it, with what 16-dimensional heads allow:

   - keys and values are copied into blocks of 16 keys x 16 dimensions, transposed, so that one
     512-bit register holds one dimension of 16 keys (a 16 x 16 in-register transpose per block);
   - a query's scores over a block are a multiply-add per nonzero dimension of the query (AbsTopK
     leaves ~1/4 of q nonzero), 8 blocks side by side so the chains do not wait on each other;
   - the softmax runs per tile of KT keys with flash's running maximum (a tile of keys and values,
     32 KB, stays in L1 while QB queries use it); e^x is Cephes' range reduction and a degree-6
     polynomial, ~1 ulp (avx512_util.h);
   - the sink is an extra key with logit `sink[h]` and value zero: it only adds exp(sink - m) to the
     denominator, so the running sums start from the sink (m = sink, l = 1);
   - the output of one tile is 16 accumulators (one per value dimension) reduced across lanes by a
     transposing tree of shuffles.

   The summation order differs from torch's flash kernel: results agree to float rounding (the
   tests compare both with a float64 reference). One difference on corrupt input: a query's exactly
   zero dimensions are skipped, so a NaN or inf in a key at a dimension where the query is 0 does not
   reach that query (torch computes 0 * NaN = NaN there); any other NaN propagates as in torch. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx512_util.h"

#define KT 256 /* keys per tile: a tile's keys and values are 2 x 16 KB */
#define QB 64  /* queries per block: each tile is reused by up to QB queries */

/* the 16 lane-sums of a[0..15], in the lane order `sum_order` gives (a tree of shuffles and adds) */
static inline __m512 sum16(const __m512 *a) {
    __m512 x[8], y[4], w[2];
    for (int d = 0; d < 8; d++)
        x[d] = _mm512_add_ps(_mm512_shuffle_f32x4(a[d], a[d + 8], 0x44), _mm512_shuffle_f32x4(a[d], a[d + 8], 0xEE));
    for (int d = 0; d < 4; d++)
        y[d] = _mm512_add_ps(_mm512_shuffle_f32x4(x[d], x[d + 4], 0x88), _mm512_shuffle_f32x4(x[d], x[d + 4], 0xDD));
    for (int d = 0; d < 2; d++)
        w[d] = _mm512_add_ps(_mm512_shuffle_ps(y[d], y[d + 2], 0x44), _mm512_shuffle_ps(y[d], y[d + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
}

/* the permutation that puts sum16's lanes in order (lane d = sum of a[d]), found by running it */
static __m512i sum_order(void) {
    __m512 a[16];
    float out[16];
    int32_t idx[16];
    for (int d = 0; d < 16; d++) a[d] = _mm512_set1_ps((float)d);
    _mm512_storeu_ps(out, sum16(a));
    for (int l = 0; l < 16; l++) idx[(int)(out[l] / 16.0f + 0.5f)] = l;
    return _mm512_loadu_si512(idx);
}

/* rows t0..t0+15 of x (row stride xs; D <= 16 floats each; rows at T and past it zero) as a block
   of 16 dimensions x 16 keys */
static inline void to_block(const float *x, int64_t xs, int64_t t0, int64_t T, int D, float *blk) {
    __m512i a[16];
    for (int r = 0; r < 16; r++)
        a[r] = t0 + r < T ? _mm512_castps_si512(_mm512_maskz_loadu_ps(first_lanes(D), x + (t0 + r) * xs))
                          : _mm512_setzero_si512();
    transpose16(a);
    for (int d = 0; d < 16; d++) _mm512_store_si512(blk + 16 * d, a[d]);
}

typedef struct {
    float m[QB], l[QB];          /* running maximum and denominator per query */
    float o[QB][16];             /* running (unnormalised) output */
    float qv[QB][16];            /* the query's nonzero entries (times the scale), compacted */
    int32_t qoff[QB][16];        /* ... and their offsets in a key block (16 x dimension) */
    int nz[QB];
} QueryBlock;

static void one_head(const float *q, int64_t qs, const float *k, int64_t ks, const float *v, int64_t vs, float *o,
                     int64_t os, int64_t T, int D, float scale, int has_sink, float sink, float *Kb, float *Vb,
                     QueryBlock *st, __m512i order) {
    const int64_t nblk = (T + 15) >> 4;
    for (int64_t b = 0; b < nblk; b++) {
        to_block(k, ks, 16 * b, T, D, Kb + 256 * b);
        to_block(v, vs, 16 * b, T, D, Vb + 256 * b);
    }
    const __m512i offsets = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(16));
    for (int64_t i0 = 0; i0 < T; i0 += QB) {
        const int64_t i1 = i0 + QB < T ? i0 + QB : T;
        for (int64_t i = i0; i < i1; i++) {
            const int64_t r = i - i0;
            st->m[r] = has_sink ? sink : -INFINITY;
            st->l[r] = has_sink ? 1.0f : 0.0f; /* exp(sink - m) with m = sink */
            _mm512_storeu_ps(st->o[r], _mm512_setzero_ps());
            __m512 qi = _mm512_maskz_loadu_ps(first_lanes(D), q + i * qs);
            __mmask16 nzm = _mm512_cmp_ps_mask(qi, _mm512_setzero_ps(), _CMP_NEQ_UQ);
            _mm512_storeu_ps(st->qv[r], _mm512_maskz_compress_ps(nzm, _mm512_mul_ps(qi, _mm512_set1_ps(scale))));
            _mm512_storeu_si512(st->qoff[r], _mm512_maskz_compress_epi32(nzm, offsets));
            st->nz[r] = __builtin_popcount((unsigned)nzm);
        }
        for (int64_t j0 = 0; j0 < i1; j0 += KT) {
            const float *Kt = Kb + 16 * j0, *Vt = Vb + 16 * j0;
            for (int64_t i = i0 > j0 ? i0 : j0; i < i1; i++) {
                const int64_t r = i - i0;
                const int64_t je = i + 1 < j0 + KT ? i + 1 : j0 + KT; /* this tile: keys j0 .. je - 1 */
                const int nb = (int)((je - j0 + 15) >> 4);
                const __mmask16 last = first_lanes(je - j0 - 16 * (nb - 1));
                const int nz = st->nz[r];
                const int32_t *qoff = st->qoff[r];
                const float *qv = st->qv[r];
                __m512 s[KT / 16];
                __m512 mx = _mm512_set1_ps(-INFINITY);
                for (int b0 = 0; b0 < nb; b0 += 8) {
                    /* 8 blocks side by side (past the tile they read the zeroed padding, unused) */
                    __m512 a[8];
                    for (int u = 0; u < 8; u++) a[u] = _mm512_setzero_ps();
                    for (int z = 0; z < nz; z++) {
                        const __m512 qz = _mm512_set1_ps(qv[z]);
                        const float *kr = Kt + 256 * b0 + qoff[z];
#pragma GCC unroll 8
                        for (int u = 0; u < 8; u++) a[u] = _mm512_fmadd_ps(qz, _mm512_load_ps(kr + 256 * u), a[u]);
                    }
                    const int nbb = nb - b0 < 8 ? nb - b0 : 8;
                    for (int u = 0; u < nbb; u++) {
                        __m512 x = a[u];
                        if (b0 + u == nb - 1) x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), last, x);
                        s[b0 + u] = x;
                        mx = _mm512_max_ps(mx, x);
                    }
                }
                const float mt = _mm512_reduce_max_ps(mx), mo = st->m[r];
                const float mn = mt > mo ? mt : mo;
                const __m512 mnv = _mm512_set1_ps(mn);
                __m512 lsum = _mm512_setzero_ps();
                for (int b = 0; b < nb; b++) { /* the exponentials first, then the values: more overlap */
                    __m512 p = exp512(_mm512_sub_ps(s[b], mnv));
                    if (b == nb - 1) p = _mm512_maskz_mov_ps(last, p);
                    lsum = _mm512_add_ps(lsum, p);
                    s[b] = p;
                }
                __m512 acc[16];
                for (int d = 0; d < 16; d++) acc[d] = _mm512_setzero_ps();
                for (int b = 0; b < nb; b++) {
                    const float *vb = Vt + 256 * b;
#pragma GCC unroll 16
                    for (int d = 0; d < 16; d++) acc[d] = _mm512_fmadd_ps(s[b], _mm512_load_ps(vb + 16 * d), acc[d]);
                }
                /* what came before, rescaled to the new maximum (it is zero while m is -inf) */
                const float c = _mm512_cvtss_f32(exp512(_mm512_set1_ps(mo - mn)));
                const __m512 ov = _mm512_permutexvar_ps(order, sum16(acc));
                _mm512_storeu_ps(st->o[r], _mm512_fmadd_ps(_mm512_loadu_ps(st->o[r]), _mm512_set1_ps(c), ov));
                st->l[r] = st->l[r] * c + _mm512_reduce_add_ps(lsum);
                st->m[r] = mn;
            }
        }
        for (int64_t i = i0; i < i1; i++) {
            const int64_t r = i - i0;
            __m512 y = _mm512_div_ps(_mm512_loadu_ps(st->o[r]), _mm512_set1_ps(st->l[r]));
            _mm512_mask_storeu_ps(o + i * os, first_lanes(D), y);
        }
    }
}

/* Heads bh0 .. bh1-1 of the B x H (sequence-major) heads of q, k, v (B, H, T, D): element
   (b, h, t, d) of x at x + b*xs[0] + h*xs[1] + t*xs[2] + d; the output `o` likewise. `sink`: H
   floats or NULL. Returns 0, or 1 for an unsupported D, 2 when memory ran out. */
int sink_attention_f32(const float *q, const int64_t *qstr, const float *k, const int64_t *kstr, const float *v,
                       const int64_t *vstr, float *o, const int64_t *ostr, const float *sink, int64_t H, int64_t T,
                       int D, float scale, int64_t bh0, int64_t bh1) {
    if (D < 1 || D > 16) return 1;
    const int64_t nblk = (T + 15) >> 4, padded = nblk + KT / 16; /* room for the 8-block reads past the end */
    const size_t floats = (size_t)(2 * 256 * padded);
    float *buf = scratch(0, floats * sizeof(float) + sizeof(QueryBlock));
    if (!buf) return 2;
    memset(buf, 0, floats * sizeof(float));
    const __m512i order = sum_order();
    for (int64_t bh = bh0; bh < bh1; bh++) {
        const int64_t b = bh / H, h = bh % H;
        one_head(q + b * qstr[0] + h * qstr[1], qstr[2], k + b * kstr[0] + h * kstr[1], kstr[2],
                 v + b * vstr[0] + h * vstr[1], vstr[2], o + b * ostr[0] + h * ostr[1], ostr[2], T, D, scale,
                 sink != NULL, sink ? sink[h] : 0.0f, buf, buf + 256 * padded, (QueryBlock *)(buf + floats), order);
    }
    return 0;
}

/* e^x of n floats by the kernel's exp512 (the tests check its accuracy against float64) */
void exp_f32(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = first_lanes(n - i);
        _mm512_mask_storeu_ps(y + i, m, exp512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}
