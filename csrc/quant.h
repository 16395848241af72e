/* quant.h — ggml block-quantized weights: dequantization and products with activations.
 *
 * Weight rows are kept in ggml's block layout (32 weights per block, little-endian f16 scales):
 *   Q8_0  34 bytes: f16 d, int8 qs[32]              w[j] = d * qs[j]
 *   Q4_0  18 bytes: f16 d, uint8 qs[16]             w[j] = d * (q[j] - 8)
 *   Q4_1  20 bytes: f16 d, f16 m, uint8 qs[16]      w[j] = d * q[j] + m
 *         (4-bit q[j]: j < 16 is the low nibble of qs[j], j >= 16 the high nibble of qs[j-16])
 *   F16 / BF16: 2 bytes per weight, converted to f32 on the fly (no activation quantization).
 *
 * For the quantized types the activations are quantized once per call, per 32-block, like
 * llama.cpp's q8_0/q8_1 but with f32 scales:  d = amax/127, xq = round_half_even(x * 127/amax),
 * s = d * sum(xq).  A block product is then an exact integer dot product plus two scalings:
 *   Q8_0: dw*d * sum(qw*xq)    Q4_0: dw*d * sum(q*xq) - 8*dw*s    Q4_1: dw*d * sum(q*xq) + m*s
 *
 * SIMD is chosen at run time (no -march needed): AVX-512 (F/BW/VL/VNNI: vpdpbusd), AVX2 (+FMA,
 * F16C: vpmaddubsw), or portable scalar C. LLM_FAST_SIMD=scalar|avx2|avx512 caps the level.
 * For a fixed level every output is computed by one call in a fixed order, so results do not
 * depend on how rows are split between threads.
 */
#ifndef LLM_FAST_QUANT_H
#define LLM_FAST_QUANT_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define LFQ_X86 1
#include <immintrin.h>
#else
#define LFQ_X86 0
#endif

enum { LFQ_Q8_0 = 0, LFQ_Q4_0 = 1, LFQ_Q4_1 = 2, LFQ_F16 = 3, LFQ_BF16 = 4, LFQ_NTYPES = 5 };
enum { LFQ_SCALAR = 0, LFQ_AVX2 = 1, LFQ_AVX512 = 2 };

#define LFQ_QK 32
#define LFQ_MR 4      /* activation rows per micro-kernel pass (weight block reused MR times) */

#define LFQ_INLINE static inline __attribute__((always_inline))

/* Activations of one call. q/ds are used by the quantized types, xf by F16/BF16. */
typedef struct {
    const int8_t *q;     /* m rows of K int8, row stride q_stride bytes */
    const float *ds;     /* m rows of nb (d, s) float pairs, row stride ds_stride floats */
    const float *xf;     /* m rows of K float, row stride xf_stride floats */
    int64_t q_stride, ds_stride, xf_stride;
} lfq_act;

/* ---------------------------------------------------------------- threads (OpenMP shim) */

static void lfq_set_num_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n > 0 ? n : 1);
#else
    (void)n;
#endif
}

static int lfq_get_num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int lfq_have_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- SIMD level */

static int lfq_hw_level(void) {
#if LFQ_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return LFQ_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return LFQ_AVX2;
#endif
    return LFQ_SCALAR;
}

static int lfq_level = -1;

/* Set the level to min(requested, hardware); returns the level in force. Not thread-safe:
 * call it while no kernel runs (module import does). */
static int lfq_set_level(int requested) {
    int hw = lfq_hw_level();
    lfq_level = requested < hw ? requested : hw;
    if (lfq_level < 0) lfq_level = 0;
    return lfq_level;
}

static int lfq_get_level(void) {
    if (lfq_level < 0) lfq_set_level(LFQ_AVX512);
    return lfq_level;
}

/* ---------------------------------------------------------------- scalar conversions */

static inline float lfq_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    float f;
    if (exp == 0) {                      /* zero / subnormal: man * 2^-24 is exact in f32 */
        f = (float)man * 0x1p-24f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}

static inline float lfq_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t lfq_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t lfq_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* ---------------------------------------------------------------- dequantization (bit-exact
 * with ggml / gguf.quants: one f32 multiply, then for Q4_1 one f32 add; no FMA contraction) */

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

static void lfq_dequant_row(int qtype, const uint8_t *w, int64_t K, float *y) {
    int64_t nb = K / LFQ_QK, b;
    int j;
    switch (qtype) {
    case LFQ_Q8_0:
        for (b = 0; b < nb; b++) {
            const uint8_t *blk = w + b * 34;
            float d = lfq_f16_to_f32(lfq_u16(blk));
            const int8_t *qs = (const int8_t *)(blk + 2);
            for (j = 0; j < 32; j++) y[b * 32 + j] = d * (float)qs[j];
        }
        break;
    case LFQ_Q4_0:
        for (b = 0; b < nb; b++) {
            const uint8_t *blk = w + b * 18;
            float d = lfq_f16_to_f32(lfq_u16(blk));
            for (j = 0; j < 16; j++) {
                y[b * 32 + j] = d * (float)((int)(blk[2 + j] & 0x0F) - 8);
                y[b * 32 + j + 16] = d * (float)((int)(blk[2 + j] >> 4) - 8);
            }
        }
        break;
    case LFQ_Q4_1:
        for (b = 0; b < nb; b++) {
            const uint8_t *blk = w + b * 20;
            float d = lfq_f16_to_f32(lfq_u16(blk)), m = lfq_f16_to_f32(lfq_u16(blk + 2));
            for (j = 0; j < 16; j++) {
                float lo = d * (float)(blk[4 + j] & 0x0F), hi = d * (float)(blk[4 + j] >> 4);
                y[b * 32 + j] = lo + m;
                y[b * 32 + j + 16] = hi + m;
            }
        }
        break;
    case LFQ_F16:
        for (b = 0; b < K; b++) y[b] = lfq_f16_to_f32(lfq_u16(w + 2 * b));
        break;
    case LFQ_BF16:
        for (b = 0; b < K; b++) y[b] = lfq_bf16_to_f32(lfq_u16(w + 2 * b));
        break;
    default:
        break;
    }
}

#pragma GCC pop_options

/* ---------------------------------------------------------------- activation quantization
 * All three levels give bit-identical q and ds: the same f32 operations, round-half-even. */

static void lfq_quantize_x_scalar(const float *x, int64_t K, int8_t *q, float *ds) {
    int64_t nb = K / LFQ_QK;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * 32;
        float amax = 0.f;
        for (int j = 0; j < 32; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.f, id = amax != 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            int v = (int)nearbyintf(xb[j] * id);
            q[b * 32 + j] = (int8_t)v;
            sum += v;
        }
        ds[2 * b] = d;
        ds[2 * b + 1] = d * (float)sum;
    }
}

/* ---------------------------------------------------------------- scalar micro-kernels
 * One weight row against NR activation rows (starting at row i0 of x); results into res[NR]. */

LFQ_INLINE void lfq_q8_0_scalar(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                float *res, const int NR) {
    int64_t nb = K / LFQ_QK;
    for (int r = 0; r < NR; r++) {
        const int8_t *xq = x->q + (int64_t)(i0 + r) * x->q_stride;
        const float *ds = x->ds + (int64_t)(i0 + r) * x->ds_stride;
        float acc = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + b * 34;
            const int8_t *qs = (const int8_t *)(blk + 2);
            int sumi = 0;
            for (int j = 0; j < 32; j++) sumi += (int)qs[j] * (int)xq[b * 32 + j];
            acc += lfq_f16_to_f32(lfq_u16(blk)) * ds[2 * b] * (float)sumi;
        }
        res[r] = acc;
    }
}

LFQ_INLINE void lfq_q4_scalar(const uint8_t *w, int64_t K, const lfq_act *x, int i0, float *res,
                              const int NR, const int HAS_MIN) {
    const int BS = HAS_MIN ? 20 : 18, QO = HAS_MIN ? 4 : 2;
    int64_t nb = K / LFQ_QK;
    for (int r = 0; r < NR; r++) {
        const int8_t *xq = x->q + (int64_t)(i0 + r) * x->q_stride;
        const float *ds = x->ds + (int64_t)(i0 + r) * x->ds_stride;
        float acc = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + b * BS, *qs = blk + QO;
            const int8_t *xb = xq + b * 32;
            int sumi = 0;
            for (int j = 0; j < 16; j++)
                sumi += (int)(qs[j] & 0x0F) * xb[j] + (int)(qs[j] >> 4) * xb[j + 16];
            float d = lfq_f16_to_f32(lfq_u16(blk));
            float m = HAS_MIN ? lfq_f16_to_f32(lfq_u16(blk + 2)) : -8.f * d;
            acc += d * ds[2 * b] * (float)sumi + m * ds[2 * b + 1];
        }
        res[r] = acc;
    }
}

LFQ_INLINE void lfq_f16_scalar(const uint8_t *w, int64_t K, const lfq_act *x, int i0, float *res,
                               const int NR, const int BF) {
    for (int r = 0; r < NR; r++) {
        const float *xf = x->xf + (int64_t)(i0 + r) * x->xf_stride;
        float acc = 0.f;
        for (int64_t k = 0; k < K; k++) {
            uint16_t h = lfq_u16(w + 2 * k);
            acc += (BF ? lfq_bf16_to_f32(h) : lfq_f16_to_f32(h)) * xf[k];
        }
        res[r] = acc;
    }
}

#define LFQ_NOTARGET

/* Rows driver: weight rows [0, nrows) (row stride rb bytes) against all m activation rows.
 * out points at out[0][row0]; out row stride ldo. Activation rows are taken MR at a time and
 * every weight row of the tile is run against them, so the tile's weights stay in L1 while the
 * activations are swept once per tile. beta == 0: out is written, never read. */
#define LFQ_DEFINE_ROWS(NAME, TARGET, CALL)                                                    \
    TARGET static void NAME(const uint8_t *w, int64_t rb, int64_t nrows, int64_t K,            \
                            const lfq_act *x, int m, float *out, int64_t ldo, float beta) {    \
        for (int i0 = 0; i0 < m; i0 += LFQ_MR) {                                               \
            int nr = m - i0 < LFQ_MR ? m - i0 : LFQ_MR;                                        \
            for (int64_t r = 0; r < nrows; r++) {                                              \
                const uint8_t *wr = w + r * rb;                                                \
                float res[LFQ_MR];                                                             \
                switch (nr) {                                                                  \
                case 4: CALL(wr, K, x, i0, res, 4); break;                                     \
                case 3: CALL(wr, K, x, i0, res, 3); break;                                     \
                case 2: CALL(wr, K, x, i0, res, 2); break;                                     \
                default: CALL(wr, K, x, i0, res, 1); break;                                    \
                }                                                                              \
                for (int i = 0; i < nr; i++) {                                                 \
                    float *o = out + (int64_t)(i0 + i) * ldo + r;                              \
                    *o = beta == 0.f ? res[i] : beta * *o + res[i];                            \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

#define LFQ_CALL_Q8_0_S(wr, K, x, i0, res, NR) lfq_q8_0_scalar(wr, K, x, i0, res, NR)
#define LFQ_CALL_Q4_0_S(wr, K, x, i0, res, NR) lfq_q4_scalar(wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_Q4_1_S(wr, K, x, i0, res, NR) lfq_q4_scalar(wr, K, x, i0, res, NR, 1)
#define LFQ_CALL_F16_S(wr, K, x, i0, res, NR) lfq_f16_scalar(wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_BF16_S(wr, K, x, i0, res, NR) lfq_f16_scalar(wr, K, x, i0, res, NR, 1)

LFQ_DEFINE_ROWS(lfq_rows_q8_0_scalar, LFQ_NOTARGET, LFQ_CALL_Q8_0_S)
LFQ_DEFINE_ROWS(lfq_rows_q4_0_scalar, LFQ_NOTARGET, LFQ_CALL_Q4_0_S)
LFQ_DEFINE_ROWS(lfq_rows_q4_1_scalar, LFQ_NOTARGET, LFQ_CALL_Q4_1_S)
LFQ_DEFINE_ROWS(lfq_rows_f16_scalar, LFQ_NOTARGET, LFQ_CALL_F16_S)
LFQ_DEFINE_ROWS(lfq_rows_bf16_scalar, LFQ_NOTARGET, LFQ_CALL_BF16_S)

#if LFQ_X86

/* ================================================================ AVX2 (+FMA, F16C) */
#define LFQ_T256 __attribute__((target("avx2,fma,f16c")))

LFQ_T256 static inline float lfq_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

LFQ_T256 static void lfq_quantize_x_avx2(const float *x, int64_t K, int8_t *q, float *ds) {
    int64_t nb = K / LFQ_QK;
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * 32;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float d = amax / 127.f, id = amax != 0.f ? 127.f / amax : 0.f;
        __m256 vid = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
        int sum = _mm_cvtsi128_si32(s4);
        /* pack 32 int32 -> 32 int8 in order (packs works within 128-bit lanes: fix with permute) */
        __m256i p01 = _mm256_packs_epi32(i0, i1), p23 = _mm256_packs_epi32(i2, i3);
        __m256i p = _mm256_packs_epi16(p01, p23);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + b * 32), p);
        ds[2 * b] = d;
        ds[2 * b + 1] = d * (float)sum;
    }
}

LFQ_T256 LFQ_INLINE void lfq_q4_avx2(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                     float *res, const int NR, const int HAS_MIN) {
    const int BS = HAS_MIN ? 20 : 18, QO = HAS_MIN ? 4 : 2;
    const int64_t nb = K / LFQ_QK;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *xq[LFQ_MR];
    const float *ds[LFQ_MR];
    __m256 acc[LFQ_MR];
    float accm[LFQ_MR];
    for (int r = 0; r < NR; r++) {
        xq[r] = x->q + (int64_t)(i0 + r) * x->q_stride;
        ds[r] = x->ds + (int64_t)(i0 + r) * x->ds_stride;
        acc[r] = _mm256_setzero_ps();
        accm[r] = 0.f;
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * BS;
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + QO));
        __m256i wv = _mm256_and_si256(
            _mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1), m4);
        float d = _cvtsh_ss(lfq_u16(blk));
        float m = HAS_MIN ? _cvtsh_ss(lfq_u16(blk + 2)) : -8.f * d;
        for (int r = 0; r < NR; r++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[r] + b * 32));
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * ds[r][2 * b]), acc[r]);
            accm[r] += m * ds[r][2 * b + 1];
        }
    }
    for (int r = 0; r < NR; r++) res[r] = lfq_hsum256(acc[r]) + accm[r];
}

LFQ_T256 LFQ_INLINE void lfq_q8_0_avx2(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                       float *res, const int NR) {
    const int64_t nb = K / LFQ_QK;
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *xq[LFQ_MR];
    const float *ds[LFQ_MR];
    __m256 acc[LFQ_MR];
    for (int r = 0; r < NR; r++) {
        xq[r] = x->q + (int64_t)(i0 + r) * x->q_stride;
        ds[r] = x->ds + (int64_t)(i0 + r) * x->ds_stride;
        acc[r] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * 34;
        __m256i wv = _mm256_loadu_si256((const __m256i *)(blk + 2));
        __m256i aw = _mm256_sign_epi8(wv, wv);    /* |w| as u8 (-128 -> 128) */
        float d = _cvtsh_ss(lfq_u16(blk));
        for (int r = 0; r < NR; r++) {
            __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq[r] + b * 32)), wv);
            /* |w| * (+-x): at most 2*128*127 < 2^15, no saturation (activations never -128) */
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), ones);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * ds[r][2 * b]), acc[r]);
        }
    }
    for (int r = 0; r < NR; r++) res[r] = lfq_hsum256(acc[r]);
}

LFQ_T256 LFQ_INLINE __m256 lfq_load8_half_avx2(const uint8_t *p, const int BF) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (BF) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

LFQ_T256 LFQ_INLINE void lfq_f16_avx2(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                      float *res, const int NR, const int BF) {
    const float *xf[LFQ_MR];
    __m256 acc[LFQ_MR];
    for (int r = 0; r < NR; r++) {
        xf[r] = x->xf + (int64_t)(i0 + r) * x->xf_stride;
        acc[r] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv = lfq_load8_half_avx2(w + 2 * k, BF);
        for (int r = 0; r < NR; r++) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xf[r] + k), acc[r]);
    }
    for (int r = 0; r < NR; r++) {
        float s = lfq_hsum256(acc[r]);
        for (int64_t t = k; t < K; t++) {
            uint16_t h = lfq_u16(w + 2 * t);
            s += (BF ? lfq_bf16_to_f32(h) : lfq_f16_to_f32(h)) * xf[r][t];
        }
        res[r] = s;
    }
}

#define LFQ_CALL_Q8_0_2(wr, K, x, i0, res, NR) lfq_q8_0_avx2(wr, K, x, i0, res, NR)
#define LFQ_CALL_Q4_0_2(wr, K, x, i0, res, NR) lfq_q4_avx2(wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_Q4_1_2(wr, K, x, i0, res, NR) lfq_q4_avx2(wr, K, x, i0, res, NR, 1)
#define LFQ_CALL_F16_2(wr, K, x, i0, res, NR) lfq_f16_avx2(wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_BF16_2(wr, K, x, i0, res, NR) lfq_f16_avx2(wr, K, x, i0, res, NR, 1)

LFQ_DEFINE_ROWS(lfq_rows_q8_0_avx2, LFQ_T256, LFQ_CALL_Q8_0_2)
LFQ_DEFINE_ROWS(lfq_rows_q4_0_avx2, LFQ_T256, LFQ_CALL_Q4_0_2)
LFQ_DEFINE_ROWS(lfq_rows_q4_1_avx2, LFQ_T256, LFQ_CALL_Q4_1_2)
LFQ_DEFINE_ROWS(lfq_rows_f16_avx2, LFQ_T256, LFQ_CALL_F16_2)
LFQ_DEFINE_ROWS(lfq_rows_bf16_avx2, LFQ_T256, LFQ_CALL_BF16_2)

/* ================================================================ AVX-512 (F/BW/VL/VNNI) */
#define LFQ_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

LFQ_T512 static void lfq_quantize_x_avx512(const float *x, int64_t K, int8_t *q, float *ds) {
    int64_t nb = K / LFQ_QK;
    for (int64_t b = 0; b < nb; b++) {
        __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float d = amax / 127.f, id = amax != 0.f ? 127.f / amax : 0.f;
        __m512 vid = _mm512_set1_ps(id);
        __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));
        __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
        _mm_storeu_si128((__m128i *)(q + b * 32), _mm512_cvtepi32_epi8(i0));
        _mm_storeu_si128((__m128i *)(q + b * 32 + 16), _mm512_cvtepi32_epi8(i1));
        int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        ds[2 * b] = d;
        ds[2 * b + 1] = d * (float)sum;
    }
}

/* Lanes of a block pair's 16 int32 partial sums: 0-7 block b, 8-15 block b+1. The per-block
 * scale vector comes from a 128-bit [s_b, ., s_b1, .] by a lane permutation. */
#define LFQ_PAIR_IDX _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0)

LFQ_T512 LFQ_INLINE float lfq_lanes13(__m128 v) {  /* v[1] + v[3] */
    __m128 h = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_shuffle_ps(h, h, 1));
}

LFQ_T512 LFQ_INLINE void lfq_q4_avx512(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                       float *res, const int NR, const int HAS_MIN) {
    const int BS = HAS_MIN ? 20 : 18, QO = HAS_MIN ? 4 : 2;
    const int64_t nb = K / LFQ_QK;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i sidx = LFQ_PAIR_IDX;
    const int8_t *xq[LFQ_MR];
    const float *ds[LFQ_MR];
    __m512 acc[LFQ_MR];
    __m128 accm[LFQ_MR];
    float tail[LFQ_MR];
    for (int r = 0; r < NR; r++) {
        xq[r] = x->q + (int64_t)(i0 + r) * x->q_stride;
        ds[r] = x->ds + (int64_t)(i0 + r) * x->ds_stride;
        acc[r] = _mm512_setzero_ps();
        accm[r] = _mm_setzero_ps();
        tail[r] = 0.f;
    }
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *w0 = w + b * BS, *w1 = w0 + BS;
        __m256i v = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(w0 + QO))),
            _mm_loadu_si128((const __m128i *)(w1 + QO)), 1);                /* [q0, q1] */
        __m512i t = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
        t = _mm512_shuffle_i64x2(t, t, _MM_SHUFFLE(3, 1, 2, 0));           /* [q0, q0>>4, q1, q1>>4] */
        t = _mm512_and_si512(t, m4);                                        /* 64 nibbles in order */
        __m128 dm;
        if (HAS_MIN) {
            dm = _mm_cvtph_ps(_mm_set_epi32(0, 0, (int)lfq_u32(w1), (int)lfq_u32(w0))); /* d0 m0 d1 m1 */
        } else {
            uint32_t h0 = lfq_u16(w0), h1 = lfq_u16(w1);
            dm = _mm_cvtph_ps(_mm_set_epi32(0, 0, (int)(h1 | h1 << 16), (int)(h0 | h0 << 16)));
            dm = _mm_mul_ps(dm, _mm_set_ps(-8.f, 1.f, -8.f, 1.f));         /* d0 -8d0 d1 -8d1 */
        }
        for (int r = 0; r < NR; r++) {
            __m128 p = _mm_mul_ps(dm, _mm_loadu_ps(ds[r] + 2 * b));   /* dw*dx, m*s (two blocks) */
            accm[r] = _mm_add_ps(accm[r], p);
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), t,
                                            _mm512_loadu_si512((const void *)(xq[r] + b * 32)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s),
                                     _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(p)), acc[r]);
        }
    }
    if (b < nb) {                                        /* odd block count: last block alone */
        const uint8_t *w0 = w + b * BS;
        __m128i q = _mm_loadu_si128((const __m128i *)(w0 + QO));
        __m256i t = _mm256_and_si256(
            _mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1),
            _mm256_set1_epi8(0x0F));
        float d = _cvtsh_ss(lfq_u16(w0));
        float m = HAS_MIN ? _cvtsh_ss(lfq_u16(w0 + 2)) : -8.f * d;
        for (int r = 0; r < NR; r++) {
            __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), t,
                                            _mm256_loadu_si256((const __m256i *)(xq[r] + b * 32)));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
            tail[r] = d * ds[r][2 * b] * (float)_mm_cvtsi128_si32(s4) + m * ds[r][2 * b + 1];
        }
    }
    for (int r = 0; r < NR; r++)
        res[r] = _mm512_reduce_add_ps(acc[r]) + lfq_lanes13(accm[r]) + tail[r];
}

LFQ_T512 LFQ_INLINE void lfq_q8_0_avx512(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                         float *res, const int NR) {
    const int64_t nb = K / LFQ_QK;
    const __m512i sidx = LFQ_PAIR_IDX;
    const int8_t *xq[LFQ_MR];
    const float *ds[LFQ_MR];
    __m512 acc[LFQ_MR];
    float tail[LFQ_MR];
    for (int r = 0; r < NR; r++) {
        xq[r] = x->q + (int64_t)(i0 + r) * x->q_stride;
        ds[r] = x->ds + (int64_t)(i0 + r) * x->ds_stride;
        acc[r] = _mm512_setzero_ps();
        tail[r] = 0.f;
    }
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *w0 = w + b * 34, *w1 = w0 + 34;
        __m512i v = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w0 + 2))),
            _mm256_loadu_si256((const __m256i *)(w1 + 2)), 1);
        __mmask64 neg = _mm512_movepi8_mask(v);
        __m512i aw = _mm512_abs_epi8(v);                 /* |w| as u8; x negated where w < 0 */
        __m128 dd = _mm_cvtph_ps(_mm_set_epi32(0, 0, (int)lfq_u16(w1), (int)lfq_u16(w0))); /* d0 0 d1 0 */
        for (int r = 0; r < NR; r++) {
            __m128 p = _mm_mul_ps(dd, _mm_loadu_ps(ds[r] + 2 * b));
            __m512i xv = _mm512_loadu_si512((const void *)(xq[r] + b * 32));
            xv = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, xv);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s),
                                     _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(p)), acc[r]);
        }
    }
    if (b < nb) {
        const uint8_t *w0 = w + b * 34;
        __m256i v = _mm256_loadu_si256((const __m256i *)(w0 + 2));
        __m256i aw = _mm256_sign_epi8(v, v);
        float d = _cvtsh_ss(lfq_u16(w0));
        for (int r = 0; r < NR; r++) {
            __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq[r] + b * 32)), v);
            __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, xv);
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
            tail[r] = d * ds[r][2 * b] * (float)_mm_cvtsi128_si32(s4);
        }
    }
    for (int r = 0; r < NR; r++) res[r] = _mm512_reduce_add_ps(acc[r]) + tail[r];
}

LFQ_T512 LFQ_INLINE __m512 lfq_load16_half_avx512(const uint8_t *p, __mmask16 k, const int BF) {
    __m256i h = _mm256_maskz_loadu_epi16(k, (const void *)p);
    if (BF) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

LFQ_T512 LFQ_INLINE void lfq_f16_avx512(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                        float *res, const int NR, const int BF) {
    const float *xf[LFQ_MR];
    __m512 acc[LFQ_MR];
    for (int r = 0; r < NR; r++) {
        xf[r] = x->xf + (int64_t)(i0 + r) * x->xf_stride;
        acc[r] = _mm512_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv = lfq_load16_half_avx512(w + 2 * k, (__mmask16)0xFFFF, BF);
        for (int r = 0; r < NR; r++) acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xf[r] + k), acc[r]);
    }
    if (k < K) {
        __mmask16 km = (__mmask16)((1u << (K - k)) - 1u);
        __m512 wv = lfq_load16_half_avx512(w + 2 * k, km, BF);
        for (int r = 0; r < NR; r++)
            acc[r] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(km, xf[r] + k), acc[r]);
    }
    for (int r = 0; r < NR; r++) res[r] = _mm512_reduce_add_ps(acc[r]);
}

#define LFQ_CALL_Q8_0_5(wr, K, x, i0, res, NR) lfq_q8_0_avx512(wr, K, x, i0, res, NR)
#define LFQ_CALL_Q4_0_5(wr, K, x, i0, res, NR) lfq_q4_avx512(wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_Q4_1_5(wr, K, x, i0, res, NR) lfq_q4_avx512(wr, K, x, i0, res, NR, 1)
#define LFQ_CALL_F16_5(wr, K, x, i0, res, NR) lfq_f16_avx512(wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_BF16_5(wr, K, x, i0, res, NR) lfq_f16_avx512(wr, K, x, i0, res, NR, 1)

LFQ_DEFINE_ROWS(lfq_rows_q8_0_avx512, LFQ_T512, LFQ_CALL_Q8_0_5)
LFQ_DEFINE_ROWS(lfq_rows_q4_0_avx512, LFQ_T512, LFQ_CALL_Q4_0_5)
LFQ_DEFINE_ROWS(lfq_rows_q4_1_avx512, LFQ_T512, LFQ_CALL_Q4_1_5)
LFQ_DEFINE_ROWS(lfq_rows_f16_avx512, LFQ_T512, LFQ_CALL_F16_5)
LFQ_DEFINE_ROWS(lfq_rows_bf16_avx512, LFQ_T512, LFQ_CALL_BF16_5)

#endif /* LFQ_X86 */

/* ---------------------------------------------------------------- dispatch */

typedef void (*lfq_rows_fn)(const uint8_t *w, int64_t rb, int64_t nrows, int64_t K,
                            const lfq_act *x, int m, float *out, int64_t ldo, float beta);
typedef void (*lfq_quantize_fn)(const float *x, int64_t K, int8_t *q, float *ds);

static lfq_rows_fn lfq_rows_kernel(int qtype, int level) {
    static const lfq_rows_fn scalar[LFQ_NTYPES] = {
        lfq_rows_q8_0_scalar, lfq_rows_q4_0_scalar, lfq_rows_q4_1_scalar,
        lfq_rows_f16_scalar, lfq_rows_bf16_scalar};
    if (qtype < 0 || qtype >= LFQ_NTYPES) return NULL;
#if LFQ_X86
    static const lfq_rows_fn avx2[LFQ_NTYPES] = {
        lfq_rows_q8_0_avx2, lfq_rows_q4_0_avx2, lfq_rows_q4_1_avx2,
        lfq_rows_f16_avx2, lfq_rows_bf16_avx2};
    static const lfq_rows_fn avx512[LFQ_NTYPES] = {
        lfq_rows_q8_0_avx512, lfq_rows_q4_0_avx512, lfq_rows_q4_1_avx512,
        lfq_rows_f16_avx512, lfq_rows_bf16_avx512};
    if (level >= LFQ_AVX512) return avx512[qtype];
    if (level >= LFQ_AVX2) return avx2[qtype];
#else
    (void)level;
#endif
    return scalar[qtype];
}

static lfq_quantize_fn lfq_quantize_kernel(int level) {
#if LFQ_X86
    if (level >= LFQ_AVX512) return lfq_quantize_x_avx512;
    if (level >= LFQ_AVX2) return lfq_quantize_x_avx2;
#else
    (void)level;
#endif
    return lfq_quantize_x_scalar;
}

#endif /* LLM_FAST_QUANT_H */
