/* Exact AbsTopK selection of float32 rows (or columns) with AVX-512: the same output and the same
   "redo" flags as inference/topk_select.py's radix select, found by counting instead of a
   histogram. Compiled and loaded by inference/native.py; used by inference/topk_select.py and
   inference/topk_columns.py when it builds.

   A row's |x| as float bits order like unsigned integers. Neighbouring tokens' rows are alike, so
   the k-th largest is first looked for within a factor 2^(1/4) of the previous row's: one pass
   counts the entries above that bracket and compacts those in it. When the k-th is not there, a
   ladder: counting, 16 lanes at a time, how many |x| are >= each of 9 thresholds spaced by that
   factor around the previous row's k-th value, then compacting the bracket holding the k-th (~8%
   of the row, or everything beyond the ladder). The bracket is split the same way, 8
   sub-brackets at a time, until a few candidates are left, ranked directly. Then one pass keeps
   |x| >= kth. As in the radix select: -0.0 and dropped entries come out +0.0; a row with at most k
   nonzeros keeps them all; a row whose k-th value ties with a dropped entry (more than k kept), or
   that holds a NaN, is flagged for the caller to redo with torch.topk.

   linear_select_rows_f32 (at the end) runs a sparse linear, its activation and this selection in
   one pass over tiles of 16 rows, so the linear's output stays in cache between the two;
   rms_select_rows_f32 an RMSNorm, the position rows appended and the selection. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "avx512_util.h"

#define ABS_MASK 0x7FFFFFFFu
#define INF_BITS 0x7F800000u
#define LADDER 9         /* thresholds of the first pass, centred on the previous row's k-th value */
#define STEP (1u << 21) /* between them a factor 2^(1/4) in float bits: 2 mantissa bits */

/* the want-th largest (1 <= want <= m) of buf[0..m), all in [lo, hi): buf is reordered */
static uint32_t kth_largest(uint32_t *buf, int64_t m, int64_t want, uint64_t lo, uint64_t hi) {
    while (m > 32 && hi - lo > 1) {
        uint32_t t[8]; /* t[0] = lo; t[j] = lo + span * j / 8 */
        int64_t c[9];
        __m512i cnt[8], tv[8];
        for (int j = 0; j < 8; j++) {
            t[j] = (uint32_t)(lo + ((hi - lo) * (uint64_t)j) / 8);
            tv[j] = _mm512_set1_epi32((int)t[j]);
            cnt[j] = _mm512_setzero_si512();
        }
        for (int64_t i = 0; i < m; i += 16) {
            __mmask16 in = first_lanes(m - i);
            __m512i a = _mm512_maskz_loadu_epi32(in, buf + i);
            for (int j = 1; j < 8; j++)
                cnt[j] = _mm512_mask_sub_epi32(cnt[j], _mm512_mask_cmpge_epu32_mask(in, a, tv[j]), cnt[j],
                                               _mm512_set1_epi32(-1));
        }
        c[0] = m;
        for (int j = 1; j < 8; j++) c[j] = _mm512_reduce_add_epi32(cnt[j]);
        c[8] = 0;
        int j = 7;
        while (c[j] < want) j--; /* c[0] = m >= want: stops */
        uint64_t nlo = t[j], nhi = j < 7 ? t[j + 1] : hi;
        want -= c[j + 1];
        /* compact [nlo, nhi) in place (writes never pass the reads) */
        int64_t w = 0;
        __m512i vlo = _mm512_set1_epi32((int)(uint32_t)nlo), vhi = _mm512_set1_epi32((int)(uint32_t)(nhi - 1));
        for (int64_t i = 0; i < m; i += 16) {
            __mmask16 in = first_lanes(m - i);
            __m512i a = _mm512_maskz_loadu_epi32(in, buf + i);
            __mmask16 keep = _mm512_mask_cmpge_epu32_mask(in, a, vlo) & _mm512_mask_cmple_epu32_mask(in, a, vhi);
            _mm512_storeu_si512(buf + w, _mm512_maskz_compress_epi32(keep, a)); /* whole-register store: */
            /* faster than a compressing store; it writes at most up to lane i + 15, already read */
            w += __builtin_popcount((unsigned)keep);
        }
        m = w;
        lo = nlo;
        hi = nhi;
    }
    if (hi - lo <= 1) return (uint32_t)lo; /* every candidate equals lo */
    for (int64_t i = 0; i < m; i++) {      /* a few left: rank each directly */
        uint32_t v = buf[i];
        int64_t gt = 0, ge = 0;
        for (int64_t j = 0; j < m; j++) {
            gt += buf[j] > v;
            ge += buf[j] >= v;
        }
        if (gt < want && want <= ge) return v;
    }
    return (uint32_t)lo; /* not reached */
}

/* The ladder: pass 1 counts |x| >= each of LADDER thresholds around *guess, pass 2 compacts the
   bracket holding the k-th into buf. Sets lo, hi (the bracket [lo, hi)), above (entries >= hi),
   m (entries in buf) and nonzero_below (nonzero entries in buf; all of the row's below hi when
   lo == 0). Returns 1 for a NaN. */
static int ladder_bracket(const uint32_t *xb, int64_t n, int64_t k, uint32_t guess, uint32_t *buf, uint64_t *lo_,
                          uint64_t *hi_, int64_t *above_, int64_t *m_, int64_t *nonzero_below_) {
    const __m512i absm = _mm512_set1_epi32((int)ABS_MASK), infv = _mm512_set1_epi32((int)INF_BITS);
    __m512i tv[LADDER], cnt[LADDER];
    uint64_t th[LADDER];
    for (int j = 0; j < LADDER; j++) {
        int64_t b = (int64_t)guess + (int64_t)(j - LADDER / 2) * STEP;
        th[j] = b < 1 ? 1 : (b > (int64_t)INF_BITS + 1 ? (uint64_t)INF_BITS + 1 : (uint64_t)b);
        tv[j] = _mm512_set1_epi32((int)(uint32_t)th[j]);
        cnt[j] = _mm512_setzero_si512();
    }
    __mmask16 nan = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 in = first_lanes(n - i);
        __m512i a = _mm512_and_si512(_mm512_maskz_loadu_epi32(in, xb + i), absm);
        nan |= _mm512_mask_cmpgt_epu32_mask(in, a, infv);
        for (int j = 0; j < LADDER; j++)
            cnt[j] = _mm512_mask_sub_epi32(cnt[j], _mm512_mask_cmpge_epu32_mask(in, a, tv[j]), cnt[j],
                                           _mm512_set1_epi32(-1));
    }
    if (nan) return 1;
    int64_t c[LADDER];
    for (int j = 0; j < LADDER; j++) c[j] = _mm512_reduce_add_epi32(cnt[j]);
    /* c[0] counts the nonzeros when th[0] == 1; otherwise count them only if needed below */
    uint64_t lo, hi;
    int64_t above;
    if (c[0] < k) { /* the k-th is below the ladder (or the row has at most k nonzeros) */
        lo = 0;
        hi = th[0];
        above = c[0];
    } else {
        int j = LADDER - 1;
        while (c[j] < k) j--;
        lo = th[j];
        hi = j < LADDER - 1 ? th[j + 1] : (uint64_t)INF_BITS + 1;
        above = j < LADDER - 1 ? c[j + 1] : 0;
    }
    /* the bracket's members */
    int64_t m = 0, nonzero_below = 0;
    const __m512i vlo = _mm512_set1_epi32((int)(uint32_t)lo), vhi = _mm512_set1_epi32((int)(uint32_t)(hi - 1));
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 in = first_lanes(n - i);
        __m512i a = _mm512_and_si512(_mm512_maskz_loadu_epi32(in, xb + i), absm);
        __mmask16 keep = _mm512_mask_cmpge_epu32_mask(in, a, vlo) & _mm512_mask_cmple_epu32_mask(in, a, vhi);
        _mm512_storeu_si512(buf + m, _mm512_maskz_compress_epi32(keep, a)); /* buf has 16 spare */
        m += __builtin_popcount((unsigned)keep);
        nonzero_below += __builtin_popcount((unsigned)(keep & _mm512_mask_test_epi32_mask(in, a, a)));
    }
    *lo_ = lo, *hi_ = hi, *above_ = above, *m_ = m, *nonzero_below_ = nonzero_below;
    return 0;
}

/* One row: ob = AbsTopK(xb) with k of n kept (0 < k < n); buf holds n + 16 uint32. *guess: the
   previous row's k-th |x| bits (updated). Returns 1 to redo (tie at the k-th value, or NaN).

   First one pass counts the entries >= guess + STEP and compacts those within a STEP of the guess:
   when the k-th is among them (neighbouring tokens' rows are alike: most rows), that is the
   bracket, found in one cheap pass instead of the ladder's two (~2x faster per row); else the
   ladder. */
static int select_row(const uint32_t *xb, uint32_t *ob, int64_t n, int64_t k, uint32_t *buf, uint32_t *guess) {
    const __m512i absm = _mm512_set1_epi32((int)ABS_MASK), infv = _mm512_set1_epi32((int)INF_BITS);
    uint64_t lo = *guess > STEP ? *guess - STEP : 1;
    uint64_t hi = (uint64_t)*guess + STEP < (uint64_t)INF_BITS + 1 ? (uint64_t)*guess + STEP : (uint64_t)INF_BITS + 1;
    int64_t above, m = 0, nonzero_below = 0;
    {
        const __m512i vlo = _mm512_set1_epi32((int)(uint32_t)lo), vhi = _mm512_set1_epi32((int)(uint32_t)(hi - 1));
        __m512i cnt = _mm512_setzero_si512();
        __mmask16 nan = 0;
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 in = first_lanes(n - i);
            __m512i a = _mm512_and_si512(_mm512_maskz_loadu_epi32(in, xb + i), absm);
            nan |= _mm512_mask_cmpgt_epu32_mask(in, a, infv);
            __mmask16 le = _mm512_mask_cmple_epu32_mask(in, a, vhi);
            cnt = _mm512_mask_sub_epi32(cnt, in & ~le, cnt, _mm512_set1_epi32(-1)); /* a >= hi */
            __mmask16 keep = _mm512_mask_cmpge_epu32_mask(le, a, vlo);
            _mm512_storeu_si512(buf + m, _mm512_maskz_compress_epi32(keep, a)); /* buf has 16 spare */
            m += __builtin_popcount((unsigned)keep);
        }
        if (nan) return 1;
        above = _mm512_reduce_add_epi32(cnt);
    }
    if (!(above < k && above + m >= k) &&
        ladder_bracket(xb, n, k, *guess, buf, &lo, &hi, &above, &m, &nonzero_below))
        return 1;
    uint32_t kth;
    if (lo == 0 && above + nonzero_below <= k) {
        kth = 0; /* at most k nonzeros: all of them kept, as topk keeps them */
    } else {
        kth = kth_largest(buf, m, k - above, lo, hi);
        *guess = kth;
    }
    /* keep |x| >= kth; -0.0 and dropped entries -> +0.0 */
    const __m512i kv = _mm512_set1_epi32((int)(kth ? kth : 1u));
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 in = first_lanes(n - i);
        __m512i x = _mm512_maskz_loadu_epi32(in, xb + i);
        __mmask16 keep = _mm512_mask_cmpge_epu32_mask(in, _mm512_and_si512(x, absm), kv);
        _mm512_mask_storeu_epi32(ob + i, in, _mm512_maskz_mov_epi32(keep, x));
        kept += __builtin_popcount((unsigned)keep);
    }
    return kth > 0 && kept != k;
}

/* One part of a row, w wide, k kept: none (k <= 0), all (k >= w, no select) or select_row's
   AbsTopK. Returns select_row's redo flag (0 for none or all). */
static int select_part(const uint32_t *src, uint32_t *dst, int64_t w, int64_t k, uint32_t *buf, uint32_t *guess) {
    if (k <= 0) {
        memset(dst, 0, (size_t)w * sizeof(uint32_t));
        return 0;
    }
    if (k >= w) {
        memcpy(dst, src, (size_t)w * sizeof(uint32_t));
        return 0;
    }
    return select_row(src, dst, w, k, buf, guess);
}

/* AbsTopK of the r rows of x (r, n) into out (r, n), k of n kept (0 < k < n); redo[i] set for
   the rows to redo. Returns 0, or 2 when memory ran out. */
int select_rows_f32(const float *x, float *out, int64_t r, int64_t n, int64_t k, uint8_t *redo) {
    uint32_t *buf = scratch(0, (size_t)(n + 16) * sizeof(uint32_t));
    if (!buf) return 2;
    uint32_t guess = 0x3F800000u; /* 1.0 */
    for (int64_t i = 0; i < r; i++)
        redo[i] = (uint8_t)select_row((const uint32_t *)x + i * n, (uint32_t *)out + i * n, n, k, buf, &guess);
    return 0;
}

/* dst[c * ds + r] = src[r * ss + c] for r < R, c < C: 16 x 16 tiles through registers (one
   64-byte line per row of a tile on both sides), the ragged edges one by one */
static void transpose_block(const uint32_t *src, int64_t ss, int64_t R, int64_t C, uint32_t *dst, int64_t ds) {
    int64_t r0 = 0;
    for (; r0 + 16 <= R; r0 += 16) {
        int64_t c0 = 0;
        for (; c0 + 16 <= C; c0 += 16) {
            __m512i a[16];
            for (int u = 0; u < 16; u++) a[u] = _mm512_loadu_si512(src + (r0 + u) * ss + c0);
            transpose16(a);
            for (int u = 0; u < 16; u++) _mm512_storeu_si512(dst + (c0 + u) * ds + r0, a[u]);
        }
        for (int64_t c = c0; c < C; c++)
            for (int64_t r = r0; r < r0 + 16; r++) dst[c * ds + r] = src[r * ss + c];
    }
    for (int64_t r = r0; r < R; r++)
        for (int64_t c = 0; c < C; c++) dst[c * ds + r] = src[r * ss + c];
}

/* inference/topk_select.py's _select_columns: columns lo..hi of hc (d, n): AbsTopK of each of its
   S equal parts (ks[s] kept; k <= 0: none; k >= the part's width: all, no select), into rows
   out[s, row0 + i] of out (S, n_out, d / S), or, cols_out, into columns out (d, n). redo[i]: the
   row's k-th |value| ties with a dropped one, or NaNs. Returns 0, 1 for more than 64 parts, or 2
   when memory ran out. */
int select_columns_f32(const float *hc, int64_t d, int64_t n, int64_t lo, int64_t hi, const int64_t *ks, int64_t S,
                       int cols_out, float *out, int64_t n_out, int64_t row0, uint8_t *redo) {
    const int64_t w = d / S, ld = d + 16; /* rows padded by a cache line: no 4 KB strides */
    uint32_t guess[64];                     /* the previous row's k-th value, per part */
    if (S > 64) return 1;
    uint32_t *tile = scratch(0, (size_t)(2 * 16 * ld + w + 16) * sizeof(uint32_t));
    if (!tile) return 2;
    uint32_t *sel = tile + 16 * ld, *buf = sel + 16 * ld;
    for (int64_t s = 0; s < S; s++) guess[s] = 0x3F800000u;
    const uint32_t *src = (const uint32_t *)hc;
    uint32_t *ob = (uint32_t *)out;
    for (int64_t i0 = lo; i0 < hi; i0 += 16) {
        const int nt = (int)(hi - i0 < 16 ? hi - i0 : 16);
        transpose_block(src + i0, n, d, nt, tile, ld); /* columns i0.. of hc as rows of the tile */
        for (int t = 0; t < nt; t++) {
            int bad = 0;
            for (int64_t s = 0; s < S; s++) {
                const uint32_t *x = tile + t * ld + s * w;
                uint32_t *dst = cols_out ? sel + t * ld + s * w : ob + (s * n_out + row0 + i0 + t) * w;
                bad |= select_part(x, dst, w, ks[s], buf, &guess[s]);
            }
            redo[i0 + t] = (uint8_t)bad;
        }
        if (cols_out) transpose_block(sel, ld, nt, d, ob + i0, n);
    }
    return 0;
}

/* ---- a sparse linear, its activation and its AbsTopK in one pass -------------------------------- */

/* GELU(x) = x Phi(x) = x erfc(-x / sqrt 2) / 2, with erfc(z) for z >= 0 as Numerical Recipes'
   erfcc: t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), fractional error < 1.2e-7 everywhere (so GELU of
   a negative x keeps its relative accuracy where 1 + erf(x) would cancel): within 5 ulp of float64
   for x >= 0, 2e-6 relative for -5 < x < 0, growing to 2e-5 at -13 (the rounding of z^2 in the
   exponent); torch's own GELU is 1e-6 off in absolute terms and 0 below about -10. Below x = -14,
   Phi(x) underflows float32: -0.0. NaN stays NaN, and +-inf gives NaN, as torch's. */
static inline __m512 gelu512(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
    const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));
    const __m512 d = _mm512_fmadd_ps(half, z, one), r = _mm512_rcp14_ps(d);
    const __m512 t = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r); /* 1 / d: rcp14 and a Newton step */
    static const float P[10] = {0.17087277f,  -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                                -0.18628806f, 0.09678418f,  0.37409196f, 1.00002368f,  -1.26551223f};
    __m512 p = _mm512_set1_ps(P[0]);
    for (int i = 1; i < 10; i++) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(P[i]));
    const __m512 erfc = _mm512_mul_ps(t, exp512(_mm512_fnmadd_ps(z, z, p))); /* erfc(|x| / sqrt 2) */
    const __m512 h = _mm512_mul_ps(half, erfc);                              /* Phi(-|x|) */
    const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-14.0f), _CMP_LT_OQ);
    /* x >= 0: x - x Phi(-x) (one rounding of a small correction), x < 0: x Phi(x) */
    const __m512 y = _mm512_mask_blend_ps(neg, _mm512_fnmadd_ps(x, h, x), _mm512_mul_ps(x, h));
    return _mm512_mask_mov_ps(y, under, _mm512_mul_ps(x, _mm512_setzero_ps()));
}

enum { ACT_NONE = 0, ACT_GELU = 1, ACT_RELU = 2 };

/* y = act(x W^T + b), then AbsTopK of each of S equal parts of y's features, into rows: part s of
   row r goes to out + s * out_part + r * out_row. x: n rows of in_f floats, row stride xs. W (out_f x
   in_f): its nnz nonzeros val[p] at (row[p], col[p]), in row order; bias or NULL. ks[s]
   kept of each part of w = out_f / S (k >= w: all, k <= 0: none). redo[r]: the row's k-th |value|
   ties with a dropped one, or NaNs (the caller recomputes it).

   16 rows at a time: x's tile transposed (a register = one input feature of the 16 rows), then per
   output feature one multiply-add per weight nonzero on 16 rows at once (bias first, then the
   nonzeros in column order: the nonzeros must come in row order), 16 features at a time, the
   activation in registers, the 16 x 16 block transposed back into rows; the 16 rows (at most
   ~0.5 MB) are then selected while still in cache. Returns 0, 1 for more than 64 parts, 2 when memory ran out. */
int linear_select_rows_f32(const float *x, int64_t n, int64_t in_f, int64_t xs, const int32_t *row,
                           const int32_t *col, const float *val, int64_t nnz, const float *bias, int64_t out_f, int act,
                           const int64_t *ks, int64_t S, float *out, int64_t out_part, int64_t out_row,
                           uint8_t *redo) {
    const int64_t w = out_f / S, ly = out_f + 16; /* rows of the y tile padded by a cache line */
    uint32_t guess[64];
    if (S > 64) return 1;
    float *xt = scratch(0, (size_t)((in_f * 16 + 15) / 16 * 16) * sizeof(float) + 64);
    float *y = scratch(1, (size_t)(16 * ly) * sizeof(float));
    uint32_t *buf = scratch(2, (size_t)(w + 16) * sizeof(uint32_t));
    if (!xt || !y || !buf) return 2;
    float yb[256] __attribute__((aligned(64))); /* 16 output features of the 16 rows, a register per feature */
    for (int64_t s = 0; s < S; s++) guess[s] = 0x3F800000u;
    for (int64_t r0 = 0; r0 < n; r0 += 16) {
        const int nt = (int)(n - r0 < 16 ? n - r0 : 16);
        if (nt < 16) memset(xt, 0, (size_t)(in_f * 16) * sizeof(float));
        transpose_block((const uint32_t *)(x + r0 * xs), xs, nt, in_f, (uint32_t *)xt, 16);
        /* 16 output features at a time, summed in yb (1 KB, in L1): the bias, then the block's weight
           nonzeros, consecutive in row order, in one flat loop (a loop per feature would mispredict
           its exit at every feature); then the activation, and the block transposed into y's rows.
           (Summing all of a tile's features first, in a 16 x out_f array, made the tile's working
           set outgrow L2 at 8,192 features: c_fc 1.1x slower, bench/README.md.) */
        int64_t p = 0;
        for (int64_t o0 = 0; o0 < out_f; o0 += 16) {
            const int no = (int)(out_f - o0 < 16 ? out_f - o0 : 16);
            for (int u = 0; u < 16; u++)
                _mm512_store_ps(yb + 16 * u, bias && u < no ? _mm512_set1_ps(bias[o0 + u]) : _mm512_setzero_ps());
            for (; p < nnz && row[p] < o0 + no; p++) {
                float *yi = yb + (int64_t)(row[p] - o0) * 16;
                _mm512_store_ps(yi, _mm512_fmadd_ps(_mm512_set1_ps(val[p]), _mm512_load_ps(xt + (int64_t)col[p] * 16),
                                                    _mm512_load_ps(yi)));
            }
            __m512 acc[16];
            for (int u = 0; u < 16; u++) {
                __m512 a = _mm512_load_ps(yb + 16 * u); /* zero past the last feature */
                if (act == ACT_GELU)
                    a = gelu512(a);
                else if (act == ACT_RELU)
                    a = _mm512_max_ps(_mm512_setzero_ps(), a); /* NaN stays NaN: max returns its second operand */
                acc[u] = a;
            }
            transpose16((__m512i *)acc); /* acc[t]: row t's features o0 .. o0 + 15 */
            for (int t = 0; t < nt; t++) _mm512_mask_storeu_ps(y + t * ly + o0, first_lanes(no), acc[t]);
        }
        for (int t = 0; t < nt; t++) {
            int bad = 0;
            for (int64_t s = 0; s < S; s++) {
                const uint32_t *src = (const uint32_t *)(y + t * ly + s * w);
                uint32_t *dst = (uint32_t *)(out + s * out_part + (r0 + t) * out_row);
                bad |= select_part(src, dst, w, ks[s], buf, &guess[s]);
            }
            redo[r0 + t] = (uint8_t)bad;
        }
    }
    return 0;
}

/* GELU of n floats by the kernel's gelu512 (the tests check its accuracy against float64) */
void gelu_f32(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = first_lanes(n - i);
        _mm512_mask_storeu_ps(y + i, m, gelu512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* RMSNorm, the position embedding's row appended, then AbsTopK, per row: out row i (d + dp) =
   AbsTopK([x_i * r_i * w, pos_i], k of d + dp), r_i = rstd[i] when given (a recorded or frozen
   inverse scale), else 1 / sqrt(mean(x_i^2) + eps). x: n rows of
   d, row stride xs; pos: n rows of dp, row stride ps (dp = 0: none). The products round as torch's
   x * rstd * w. redo[i]: ties or NaNs, as select_row. Returns 0, or 2 when memory ran out. */
int rms_select_rows_f32(const float *x, int64_t n, int64_t d, int64_t xs, const float *rstd, float eps,
                        const float *w, const float *pos, int64_t dp, int64_t ps, int64_t k, float *out,
                        uint8_t *redo) {
    const int64_t m = d + dp;
    float *row = scratch(0, (size_t)(m + 16) * sizeof(float));
    uint32_t *buf = scratch(1, (size_t)(m + 16) * sizeof(uint32_t));
    if (!row || !buf) return 2;
    uint32_t guess = 0x3F800000u;
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * xs;
        float r;
        if (rstd) {
            r = rstd[i];
        } else {
            __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
            int64_t j = 0;
            for (; j + 32 <= d; j += 32) {
                const __m512 a = _mm512_loadu_ps(xi + j), b = _mm512_loadu_ps(xi + j + 16);
                s0 = _mm512_fmadd_ps(a, a, s0);
                s1 = _mm512_fmadd_ps(b, b, s1);
            }
            for (; j < d; j += 16) {
                const __m512 a = _mm512_maskz_loadu_ps(first_lanes(d - j), xi + j);
                s0 = _mm512_fmadd_ps(a, a, s0);
            }
            const float v = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / (float)d + eps;
            r = 1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(v))); /* as torch.rsqrt: 1 / sqrt, each rounded */
        }
        const __m512 rv = _mm512_set1_ps(r);
        for (int64_t j = 0; j < d; j += 16) {
            const __mmask16 in = first_lanes(d - j);
            const __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, xi + j), rv), _mm512_maskz_loadu_ps(in, w + j));
            _mm512_mask_storeu_ps(row + j, in, y);
        }
        if (dp > 0) memcpy(row + d, pos + i * ps, (size_t)dp * sizeof(float));
        redo[i] = (uint8_t)select_part((const uint32_t *)row, (uint32_t *)(out + i * m), m, k, buf, &guess);
    }
    return 0;
}
