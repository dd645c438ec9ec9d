/* AVX-512 helpers shared by the C kernels (included): the first n lanes as a mask, and a 16 x 16
   transpose of 32-bit lanes in registers. inference/native.py hashes the headers beside a source
   with it, so a change here rebuilds them. */

#ifndef CIRCUITS_AVX512_UTIL_H
#define CIRCUITS_AVX512_UTIL_H

#include <immintrin.h>
#include <stdint.h>

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

#endif
