/* AVX-512 helpers shared by the C kernels (included): the first n lanes as a mask, a 16 x 16
   transpose of 32-bit lanes in registers, e^x and 2^x, per-thread scratch memory.
   inference/native.py hashes the headers beside a source with it, so a change here rebuilds them. */

#ifndef CIRCUITS_AVX512_UTIL_H
#define CIRCUITS_AVX512_UTIL_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

/* the first n lanes of 16 (n >= 16: all) */
static inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

/* a[0..15] transposed in place: on return lane t of a[d] is lane d of a[t] on entry */
static inline void transpose16(__m512i *a) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) { /* per 128-bit lane: pairs of rows interleaved */
        t[2 * i] = _mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* a[4i + c], 128-bit lane L: rows 4i..4i+3 at column 4L + c */
        for (int j = 0; j < 2; j++) {
            a[4 * i + 2 * j] = _mm512_unpacklo_epi64(t[4 * i + j], t[4 * i + j + 2]);
            a[4 * i + 2 * j + 1] = _mm512_unpackhi_epi64(t[4 * i + j], t[4 * i + j + 2]);
        }
    }
    for (int i = 0; i < 2; i++) { /* the four row groups' 128-bit lanes brought together */
        for (int c = 0; c < 4; c++) {
            t[8 * i + c] = _mm512_shuffle_i32x4(a[8 * i + c], a[8 * i + 4 + c], 0x88);
            t[8 * i + 4 + c] = _mm512_shuffle_i32x4(a[8 * i + c], a[8 * i + 4 + c], 0xDD);
        }
    }
    for (int c = 0; c < 8; c++) {
        a[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
        a[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xDD);
    }
}

/* e^x in float32 to ~1 ulp (Cephes' scheme): x = n ln2 + r with n an integer and |r| <= ln2/2
   (ln2 in two parts, so r is exact to float rounding), e^r by a degree-6 polynomial fitted to
   relative error, then scaled by 2^n. x is first raised to -125 ln2 (-86.6): below that it returns
   ~2^-125 rather than a smaller or denormal number (denormal results are slow; such weights vanish
   beside the maximum's 1, and masked lanes are zeroed by the caller). NaN stays NaN (max returns
   its second operand when either is NaN). */
static inline __m512 exp512(__m512 x) {
    const __m512 shifter = _mm512_set1_ps(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    x = _mm512_max_ps(_mm512_set1_ps(-86.643397569993164f), x);
    __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), shifter), shifter);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.1219444005471377e-4f), r);
    __m512 y = _mm512_set1_ps(1.3748822966590524e-3f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.369628340005875e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.166964441537857e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666512191295624e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.9999988079071045e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

/* 2^x in float32 to ~1 ulp for x <= 0 (the attention's weights, its scores in units of log2): x =
   n + r with n the nearest integer (exact: |r| <= 1/2 needs no reduction by ln 2), 2^r by a degree-6
   polynomial fitted to relative error (9.9e-8 on [-1/2, 1/2]), then scaled by 2^n. x is first raised
   to -125: below, it returns 2^-125 (no denormals: slow, and such weights vanish beside the
   maximum's 1; masked lanes are zeroed by the caller). NaN stays NaN. Not for x > 0 beyond 127. */
static inline __m512 exp2_512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-125.0f), x);
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(x, n);
    __m512 y = _mm512_set1_ps(1.534581242594868e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3399930903688073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(9.618489071726799e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.550328642129898e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(2.4022646248340607e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(6.931471824645996e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

/* Scratch memory for one kernel call, kept per thread and reused by the thread's next call (grown
   when a call needs more, never returned: a few MB per thread at the release's widths). Why: the
   kernels run thousands of times per forward, and blocks this large (>= 128 KB) come from mmap,
   so each call could pay a page fault per 4 KB it touched (up to ~5% of a fast forward's time).
   `slot` tells one call's buffers apart; 64-byte aligned; NULL when memory ran out. */
#define SCRATCH_SLOTS 3
static inline void *scratch(int slot, size_t bytes) {
    static __thread void *ptr[SCRATCH_SLOTS];
    static __thread size_t size[SCRATCH_SLOTS];
    if (size[slot] < bytes) {
        free(ptr[slot]);
        size[slot] = (bytes + 63) / 64 * 64;
        ptr[slot] = aligned_alloc(64, size[slot]);
        if (!ptr[slot]) size[slot] = 0;
    }
    return ptr[slot];
}

#endif
