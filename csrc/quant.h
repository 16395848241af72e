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
 * s = d * sum(xq).  A block product is then an exact integer dot product plus scalings:
 *   Q4_1: dw*d * sum(q*xq) + m*s          Q4_0: dw*d * sum(q*xq) - 8*dw*s
 *   Q8_0: dw*d * sum(qw*xq)  (AVX-512: dw*d * sum((qw+128)*xq) - 128*dw*s, an unsigned dot)
 * The AVX-512 kernel takes a block pair (64 weights) per step and reuses the unpacked pair for
 * up to 8 activation rows (prefill); see lfq_blk_avx512.
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
#include "simd.h"

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
/* Activation rows per micro-kernel pass (each unpacked weight block is reused that often):
 * 8 with AVX-512's 32 vector registers, 4 otherwise. */
#define LFQ_MRMAX 8

#define LFQ_INLINE static inline __attribute__((always_inline))

/* Activations of one call. q/f are used by the quantized types, xf by F16/BF16.
 * Per row, the float area f (lfq_act_floats(K) floats) holds, with nb = K/32 blocks,
 * np = ceil(nb/2) block pairs and nbp = nb rounded up to 16:
 *   f[0, 16*np)            pair scale patterns [d_2p x8, d_2p+1 x8] (0 past the last block)
 *   f[16*np, +nbp)         d per block (0-padded)
 *   f[16*np + nbp, +nbp)   s = d * sum(q) per block (0-padded)                          */
typedef struct {
    const int8_t *q;     /* m rows of K int8, row stride q_stride bytes */
    const float *f;      /* m rows of lfq_act_floats(K) floats, row stride f_stride */
    const float *xf;     /* m rows of K float, row stride xf_stride floats */
    int64_t q_stride, f_stride, xf_stride;
    int limbs;           /* 1, or 2: rows 2i, 2i+1 of q/f are the two terms of x_i (see below) */
} lfq_act;

static inline int64_t lfq_npairs(int64_t K) { return (K / 32 + 1) / 2; }
static inline int64_t lfq_nbpad(int64_t K) { return (K / 32 + 15) / 16 * 16; }
static inline int64_t lfq_act_floats(int64_t K) { return 16 * lfq_npairs(K) + 2 * lfq_nbpad(K); }
static inline const float *lfq_act_d(const float *f, int64_t K) { return f + 16 * lfq_npairs(K); }
static inline const float *lfq_act_s(const float *f, int64_t K) {
    return f + 16 * lfq_npairs(K) + lfq_nbpad(K);
}

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
 * All three levels give bit-identical q and f: the same f32 operations, round-half-even. */

/* Writes the pair patterns and the zero padding from the d and s already in f. */
static void lfq_act_finish(float *f, int64_t K) {
    int64_t nb = K / 32, np = lfq_npairs(K), nbp = lfq_nbpad(K);
    float *d = f + 16 * np, *s = d + nbp;
    for (int64_t b = nb; b < nbp; b++) d[b] = s[b] = 0.f;
    for (int64_t b = 0; b < 2 * np; b++)
        for (int j = 0; j < 8; j++) f[8 * b + j] = d[b];   /* d[nb] = 0 pads an odd count */
}

static void lfq_quantize_x_scalar(const float *x, int64_t K, int8_t *q, float *f) {
    int64_t nb = K / LFQ_QK;
    float *dd = f + 16 * lfq_npairs(K), *ss = dd + lfq_nbpad(K);
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
        dd[b] = d;
        ss[b] = d * (float)sum;
    }
    lfq_act_finish(f, K);
}

/* Two-limb activations ("q8x2"): x ~= d1*q1 + (d1/256)*q2, q1 the 8-bit quantization above and
 * q2 = clamp(round(r * 256/d1), -127, 127) of the residual r = x - d1*q1 (|r| <= d1/2): a grid
 * 256x finer, ~16 bits per block. The kernels combine the limbs in the integer domain,
 * 256 * dot(w, q1) + dot(w, q2), then scale by d1/256 as for one limb. Layout: the two limbs are
 * activation rows 2i and 2i+1 of q; row 2i of f holds d = d1/256 (and its patterns) and
 * s = d * (256 * sum(q1) + sum(q2)); row 2i+1 of f is not read.
 * Given q1 and f from a quantize kernel (any level: they are bit-identical), this scalar pass
 * writes q2 and rewrites f, so the result is the same at every SIMD level. */
static void lfq_second_limb(const float *x, int64_t K, const int8_t *q1, float *f, int8_t *q2) {
    int64_t nb = K / LFQ_QK;
    float *dd = f + 16 * lfq_npairs(K), *ss = dd + lfq_nbpad(K);
    for (int64_t b = 0; b < nb; b++) {
        const float d1 = dd[b], inv = d1 != 0.f ? 256.f / d1 : 0.f;
        int sum1 = 0, sum2 = 0;
        for (int j = 0; j < 32; j++) {
            float r = x[b * 32 + j] - d1 * (float)q1[b * 32 + j];
            float v = nearbyintf(r * inv);
            int iv = v > 127.f ? 127 : (v < -127.f ? -127 : (int)v);
            q2[b * 32 + j] = (int8_t)iv;
            sum1 += q1[b * 32 + j];
            sum2 += iv;
        }
        dd[b] = d1 * (1.f / 256.f);
        ss[b] = dd[b] * (float)(256 * sum1 + sum2);
    }
    lfq_act_finish(f, K);
}

/* ---------------------------------------------------------------- scalar micro-kernels
 * One weight row against NR activation rows (starting at row i0 of x); results into res[NR]. */

LFQ_INLINE void lfq_q8_0_scalar(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                float *res, const int NR, const int LIMBS) {
    int64_t nb = K / LFQ_QK;
    for (int r = 0; r < NR; r++) {
        const int64_t ri = (int64_t)LIMBS * (i0 + r);
        const int8_t *xq = x->q + ri * x->q_stride, *xq2 = xq + x->q_stride;
        const float *xd = lfq_act_d(x->f + ri * x->f_stride, K);
        float acc = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + b * 34;
            const int8_t *qs = (const int8_t *)(blk + 2);
            int sumi = 0, sum2 = 0;
            for (int j = 0; j < 32; j++) sumi += (int)qs[j] * (int)xq[b * 32 + j];
            if (LIMBS == 2) {
                for (int j = 0; j < 32; j++) sum2 += (int)qs[j] * (int)xq2[b * 32 + j];
                sumi = 256 * sumi + sum2;
            }
            acc += lfq_f16_to_f32(lfq_u16(blk)) * xd[b] * (float)sumi;
        }
        res[r] = acc;
    }
}

LFQ_INLINE void lfq_q4_scalar(const uint8_t *w, int64_t K, const lfq_act *x, int i0, float *res,
                              const int NR, const int HAS_MIN, const int LIMBS) {
    const int BS = HAS_MIN ? 20 : 18, QO = HAS_MIN ? 4 : 2;
    int64_t nb = K / LFQ_QK;
    for (int r = 0; r < NR; r++) {
        const int64_t ri = (int64_t)LIMBS * (i0 + r);
        const int8_t *xq = x->q + ri * x->q_stride;
        const float *xf = x->f + ri * x->f_stride;
        const float *xd = lfq_act_d(xf, K), *xs = lfq_act_s(xf, K);
        float acc = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + b * BS, *qs = blk + QO;
            const int8_t *xb = xq + b * 32, *xb2 = xb + x->q_stride;
            int sumi = 0, sum2 = 0;
            for (int j = 0; j < 16; j++)
                sumi += (int)(qs[j] & 0x0F) * xb[j] + (int)(qs[j] >> 4) * xb[j + 16];
            if (LIMBS == 2) {
                for (int j = 0; j < 16; j++)
                    sum2 += (int)(qs[j] & 0x0F) * xb2[j] + (int)(qs[j] >> 4) * xb2[j + 16];
                sumi = 256 * sumi + sum2;
            }
            float d = lfq_f16_to_f32(lfq_u16(blk));
            float m = HAS_MIN ? lfq_f16_to_f32(lfq_u16(blk + 2)) : -8.f * d;
            acc += d * xd[b] * (float)sumi + m * xs[b];
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

/* Rows driver: weight rows [0, nrows) (row stride rb bytes) against all m activation rows
 * (x rows: with two limbs, rows 2i and 2i+1 of q are x row i).
 * out points at out[0][row0]; out row stride ldo. Activation rows are taken MR at a time and
 * every weight row of the tile is run against them, so the tile's weights stay in L1 while the
 * activations are swept once per tile. beta == 0: out is written, never read. */
#define LFQ_DEFINE_ROWS(NAME, TARGET, CALL, MR)                                                \
    TARGET static void NAME(const uint8_t *w, int64_t rb, int64_t nrows, int64_t K,            \
                            const lfq_act *x, int m, float *out, int64_t ldo, float beta) {    \
        for (int i0 = 0; i0 < m; i0 += MR) {                                                   \
            int nr = m - i0 < MR ? m - i0 : MR;                                                \
            for (int64_t r = 0; r < nrows; r++) {                                              \
                const uint8_t *wr = w + r * rb;                                                \
                float res[LFQ_MRMAX];                                                          \
                switch (nr) {                                                                  \
                case 8: if (MR >= 8) { CALL(wr, K, x, i0, res, MR >= 8 ? 8 : 1); break; }     \
                /* fall through */                                                             \
                case 7: if (MR >= 7) { CALL(wr, K, x, i0, res, MR >= 7 ? 7 : 1); break; }     \
                /* fall through */                                                             \
                case 6: if (MR >= 6) { CALL(wr, K, x, i0, res, MR >= 6 ? 6 : 1); break; }     \
                /* fall through */                                                             \
                case 5: if (MR >= 5) { CALL(wr, K, x, i0, res, MR >= 5 ? 5 : 1); break; }     \
                /* fall through */                                                             \
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

/* Block types: one instantiation per limb count (the last argument), chosen once per call of
 * the micro-kernel. */
#define LFQ_BY_LIMBS(x, KERNEL, ...) ((x)->limbs == 2 ? KERNEL(__VA_ARGS__, 2) : KERNEL(__VA_ARGS__, 1))
#define LFQ_CALL_Q8_0_S(wr, K, x, i0, res, NR) LFQ_BY_LIMBS(x, lfq_q8_0_scalar, wr, K, x, i0, res, NR)
#define LFQ_CALL_Q4_0_S(wr, K, x, i0, res, NR) LFQ_BY_LIMBS(x, lfq_q4_scalar, wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_Q4_1_S(wr, K, x, i0, res, NR) LFQ_BY_LIMBS(x, lfq_q4_scalar, wr, K, x, i0, res, NR, 1)
#define LFQ_CALL_F16_S(wr, K, x, i0, res, NR) lfq_f16_scalar(wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_BF16_S(wr, K, x, i0, res, NR) lfq_f16_scalar(wr, K, x, i0, res, NR, 1)

LFQ_DEFINE_ROWS(lfq_rows_q8_0_scalar, LFQ_NOTARGET, LFQ_CALL_Q8_0_S, 4)
LFQ_DEFINE_ROWS(lfq_rows_q4_0_scalar, LFQ_NOTARGET, LFQ_CALL_Q4_0_S, 4)
LFQ_DEFINE_ROWS(lfq_rows_q4_1_scalar, LFQ_NOTARGET, LFQ_CALL_Q4_1_S, 4)
LFQ_DEFINE_ROWS(lfq_rows_f16_scalar, LFQ_NOTARGET, LFQ_CALL_F16_S, 4)
LFQ_DEFINE_ROWS(lfq_rows_bf16_scalar, LFQ_NOTARGET, LFQ_CALL_BF16_S, 4)

/* F32 activations with block-quantized weights ("exact" mode): each block is dequantized
 * exactly as lfq_dequant_row does (so the weights equal QTensor.dequantize() bit for bit) and
 * multiplied with the float activations; no activation rounding. */
LFQ_INLINE void lfq_blkf_scalar(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                float *res, const int NR, const int TYPE) {
    const int BS = TYPE == 0 ? 34 : (TYPE == 1 ? 18 : 20);
    float wb[32];
    float acc[LFQ_MRMAX];
    for (int r = 0; r < NR; r++) acc[r] = 0.f;
    for (int64_t b = 0; b < K / 32; b++) {
        lfq_dequant_row(TYPE, w + b * BS, 32, wb);
        for (int r = 0; r < NR; r++) {
            const float *xr = x->xf + (int64_t)(i0 + r) * x->xf_stride + b * 32;
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += wb[j] * xr[j];
            acc[r] += s;
        }
    }
    for (int r = 0; r < NR; r++) res[r] = acc[r];
}

#define LFQ_CALL_Q8_0F_S(wr, K, x, i0, res, NR) lfq_blkf_scalar(wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_Q4_0F_S(wr, K, x, i0, res, NR) lfq_blkf_scalar(wr, K, x, i0, res, NR, 1)
#define LFQ_CALL_Q4_1F_S(wr, K, x, i0, res, NR) lfq_blkf_scalar(wr, K, x, i0, res, NR, 2)
LFQ_DEFINE_ROWS(lfq_rows_q8_0f_scalar, LFQ_NOTARGET, LFQ_CALL_Q8_0F_S, 4)
LFQ_DEFINE_ROWS(lfq_rows_q4_0f_scalar, LFQ_NOTARGET, LFQ_CALL_Q4_0F_S, 4)
LFQ_DEFINE_ROWS(lfq_rows_q4_1f_scalar, LFQ_NOTARGET, LFQ_CALL_Q4_1F_S, 4)

#if LFQ_X86

/* ================================================================ AVX2 (+FMA, F16C) */
#define LFQ_T256 __attribute__((target("avx2,fma,f16c")))

LFQ_T256 static inline float lfq_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

LFQ_T256 static void lfq_quantize_x_avx2(const float *x, int64_t K, int8_t *q, float *f) {
    int64_t nb = K / LFQ_QK;
    float *dd = f + 16 * lfq_npairs(K), *ss = dd + lfq_nbpad(K);
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
        dd[b] = d;
        ss[b] = d * (float)sum;
    }
    lfq_act_finish(f, K);
}

LFQ_T256 LFQ_INLINE void lfq_q4_avx2(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                     float *res, const int NR, const int HAS_MIN, const int LIMBS) {
    const int BS = HAS_MIN ? 20 : 18, QO = HAS_MIN ? 4 : 2;
    const int64_t nb = K / LFQ_QK;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *xq[LFQ_MRMAX];
    const float *xd[LFQ_MRMAX], *xs[LFQ_MRMAX];
    __m256 acc[LFQ_MRMAX];
    float accm[LFQ_MRMAX];
    for (int r = 0; r < NR; r++) {
        const int64_t ri = (int64_t)LIMBS * (i0 + r);
        xq[r] = x->q + ri * x->q_stride;
        xd[r] = lfq_act_d(x->f + ri * x->f_stride, K);
        xs[r] = lfq_act_s(x->f + ri * x->f_stride, K);
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
            if (LIMBS == 2) {
                __m256i x2 = _mm256_loadu_si256((const __m256i *)(xq[r] + x->q_stride + b * 32));
                p = _mm256_add_epi32(_mm256_slli_epi32(p, 8),
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(wv, x2), ones));
            }
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xd[r][b]), acc[r]);
            accm[r] += m * xs[r][b];
        }
    }
    for (int r = 0; r < NR; r++) res[r] = lfq_hsum256(acc[r]) + accm[r];
}

LFQ_T256 LFQ_INLINE void lfq_q8_0_avx2(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                       float *res, const int NR, const int LIMBS) {
    const int64_t nb = K / LFQ_QK;
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *xq[LFQ_MRMAX];
    const float *xd[LFQ_MRMAX];
    __m256 acc[LFQ_MRMAX];
    for (int r = 0; r < NR; r++) {
        const int64_t ri = (int64_t)LIMBS * (i0 + r);
        xq[r] = x->q + ri * x->q_stride;
        xd[r] = lfq_act_d(x->f + ri * x->f_stride, K);
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
            if (LIMBS == 2) {
                __m256i x2 = _mm256_sign_epi8(
                    _mm256_loadu_si256((const __m256i *)(xq[r] + x->q_stride + b * 32)), wv);
                p = _mm256_add_epi32(_mm256_slli_epi32(p, 8),
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(aw, x2), ones));
            }
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xd[r][b]), acc[r]);
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
    const float *xf[LFQ_MRMAX];
    __m256 acc[LFQ_MRMAX];
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

#define LFQ_CALL_Q8_0_2(wr, K, x, i0, res, NR) LFQ_BY_LIMBS(x, lfq_q8_0_avx2, wr, K, x, i0, res, NR)
#define LFQ_CALL_Q4_0_2(wr, K, x, i0, res, NR) LFQ_BY_LIMBS(x, lfq_q4_avx2, wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_Q4_1_2(wr, K, x, i0, res, NR) LFQ_BY_LIMBS(x, lfq_q4_avx2, wr, K, x, i0, res, NR, 1)
#define LFQ_CALL_F16_2(wr, K, x, i0, res, NR) lfq_f16_avx2(wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_BF16_2(wr, K, x, i0, res, NR) lfq_f16_avx2(wr, K, x, i0, res, NR, 1)

LFQ_DEFINE_ROWS(lfq_rows_q8_0_avx2, LFQ_T256, LFQ_CALL_Q8_0_2, 4)
LFQ_DEFINE_ROWS(lfq_rows_q4_0_avx2, LFQ_T256, LFQ_CALL_Q4_0_2, 4)
LFQ_DEFINE_ROWS(lfq_rows_q4_1_avx2, LFQ_T256, LFQ_CALL_Q4_1_2, 4)
LFQ_DEFINE_ROWS(lfq_rows_f16_avx2, LFQ_T256, LFQ_CALL_F16_2, 4)
LFQ_DEFINE_ROWS(lfq_rows_bf16_avx2, LFQ_T256, LFQ_CALL_BF16_2, 4)

/* One block as 4 x 8 floats, bit-identical to lfq_dequant_row (mul, then add for Q4_1). */
LFQ_T256 LFQ_INLINE void lfq_deq_block_avx2(const uint8_t *blk, __m256 *wv, const int TYPE) {
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(lfq_u16(blk)));
    __m256i i32[4];
    if (TYPE == 0) {
        __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
        __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
        i32[0] = _mm256_cvtepi8_epi32(lo);
        i32[1] = _mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8));
        i32[2] = _mm256_cvtepi8_epi32(hi);
        i32[3] = _mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8));
    } else {
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + (TYPE == 2 ? 4 : 2)));
        __m128i lo = _mm_and_si128(q, _mm_set1_epi8(0x0F));
        __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0F));
        i32[0] = _mm256_cvtepu8_epi32(lo);
        i32[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
        i32[2] = _mm256_cvtepu8_epi32(hi);
        i32[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
        if (TYPE == 1)
            for (int k = 0; k < 4; k++) i32[k] = _mm256_sub_epi32(i32[k], _mm256_set1_epi32(8));
    }
    for (int k = 0; k < 4; k++) {
        wv[k] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(i32[k]));
        if (TYPE == 2) wv[k] = _mm256_add_ps(wv[k], _mm256_set1_ps(_cvtsh_ss(lfq_u16(blk + 2))));
    }
}

LFQ_T256 LFQ_INLINE void lfq_blkf_avx2(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                       float *res, const int NR, const int TYPE) {
    const int BS = TYPE == 0 ? 34 : (TYPE == 1 ? 18 : 20);
    const float *xf[LFQ_MRMAX];
    __m256 acc[LFQ_MRMAX];
    for (int r = 0; r < NR; r++) {
        xf[r] = x->xf + (int64_t)(i0 + r) * x->xf_stride;
        acc[r] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < K / 32; b++) {
        __m256 wv[4];
        lfq_deq_block_avx2(w + b * BS, wv, TYPE);
        for (int r = 0; r < NR; r++)
            for (int k = 0; k < 4; k++)
                acc[r] = _mm256_fmadd_ps(wv[k], _mm256_loadu_ps(xf[r] + b * 32 + 8 * k), acc[r]);
    }
    for (int r = 0; r < NR; r++) res[r] = lfq_hsum256(acc[r]);
}

#define LFQ_CALL_Q8_0F_2(wr, K, x, i0, res, NR) lfq_blkf_avx2(wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_Q4_0F_2(wr, K, x, i0, res, NR) lfq_blkf_avx2(wr, K, x, i0, res, NR, 1)
#define LFQ_CALL_Q4_1F_2(wr, K, x, i0, res, NR) lfq_blkf_avx2(wr, K, x, i0, res, NR, 2)
LFQ_DEFINE_ROWS(lfq_rows_q8_0f_avx2, LFQ_T256, LFQ_CALL_Q8_0F_2, 4)
LFQ_DEFINE_ROWS(lfq_rows_q4_0f_avx2, LFQ_T256, LFQ_CALL_Q4_0F_2, 4)
LFQ_DEFINE_ROWS(lfq_rows_q4_1f_avx2, LFQ_T256, LFQ_CALL_Q4_1F_2, 4)

/* ================================================================ AVX-512 (F/BW/VL/VNNI) */
#define LFQ_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

LFQ_T512 static void lfq_quantize_x_avx512(const float *x, int64_t K, int8_t *q, float *f) {
    int64_t nb = K / LFQ_QK, np = lfq_npairs(K), nbp = lfq_nbpad(K);
    float *dd = f + 16 * np, *ss = dd + nbp;
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
        dd[b] = d;
        ss[b] = d * (float)sum;
        _mm256_storeu_ps(f + 8 * b, _mm256_set1_ps(d));
    }
    if (nb & 1) _mm256_storeu_ps(f + 8 * nb, _mm256_setzero_ps());
    for (int64_t b = nb; b < nbp; b++) dd[b] = ss[b] = 0.f;
}

/* Q8_0 / Q4_0 / Q4_1 (TYPE 0 / 1 / 2) weight row times NR activation rows, a block pair
 * (64 weights) per step: the pair's two scales and offset coefficients are converted once
 * (one vcvtph2ps), its weights unpacked once to 64 unsigned bytes, then per activation row
 * one vpdpbusd + cvt + mul + fma against the row's scale pattern, and one 2-lane FMA for the
 * offset terms. (Gathering the scales of 16 blocks instead is slower on Zen 5.) */
LFQ_T512 LFQ_INLINE void lfq_blk_avx512(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                      float *res, const int NR, const int TYPE, const int LIMBS) {
    const int BS = TYPE == 0 ? 34 : (TYPE == 1 ? 18 : 20);
    const int QO = TYPE == 2 ? 4 : 2;
    const int64_t nb = K / LFQ_QK, np = lfq_npairs(K), nbp = lfq_nbpad(K);
    const __m512i m4 = _mm512_set1_epi8(0x0F), x80 = _mm512_set1_epi8((char)0x80);
    const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const int8_t *xq[LFQ_MRMAX];
    const float *xp[LFQ_MRMAX], *xs[LFQ_MRMAX];
    __m512 acc[LFQ_MRMAX];
    __m128 acco[LFQ_MRMAX];
    for (int r = 0; r < NR; r++) {
        const int64_t ri = (int64_t)LIMBS * (i0 + r);
        const float *f = x->f + ri * x->f_stride;
        xq[r] = x->q + ri * x->q_stride;
        xp[r] = f;
        xs[r] = f + 16 * np + nbp;
        acc[r] = _mm512_setzero_ps();
        acco[r] = _mm_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b += 2) {
        const uint8_t *w0 = w + b * BS, *w1 = b + 1 < nb ? w0 + BS : w0;
        __m512i t;
        __m128 dm;   /* [d0, o0, d1, o1]: scales and offset coefficients (m, -8d or -128d) */
        if (TYPE == 2) {
            dm = _mm_cvtph_ps(_mm_set_epi32(0, 0, (int)lfq_u32(w1), (int)lfq_u32(w0)));
        } else {
            uint32_t h0 = lfq_u16(w0), h1 = lfq_u16(w1);
            dm = _mm_cvtph_ps(_mm_set_epi32(0, 0, (int)(h1 | h1 << 16), (int)(h0 | h0 << 16)));
            dm = _mm_mul_ps(dm, TYPE == 1 ? _mm_set_ps(-8.f, 1.f, -8.f, 1.f) : _mm_set_ps(-128.f, 1.f, -128.f, 1.f));
        }
        if (b + 1 < nb) {
            if (TYPE == 0) {
                t = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w0 + 2))),
                                       _mm256_loadu_si256((const __m256i *)(w1 + 2)), 1);
                t = _mm512_xor_si512(t, x80);                       /* q + 128, unsigned */
            } else {
                __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(w0 + QO))),
                                                    _mm_loadu_si128((const __m128i *)(w1 + QO)), 1);
                t = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
                t = _mm512_shuffle_i64x2(t, t, _MM_SHUFFLE(3, 1, 2, 0)); /* q0 q0>>4 q1 q1>>4 */
                t = _mm512_and_si512(t, m4);                        /* 64 nibbles in order */
            }
        } else {
            __m256i v;
            if (TYPE == 0) {
                v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w0 + 2)), _mm512_castsi512_si256(x80));
            } else {
                __m128i q = _mm_loadu_si128((const __m128i *)(w0 + QO));
                v = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1),
                                     _mm512_castsi512_si256(m4));
            }
            t = _mm512_zextsi256_si512(v);                          /* odd last block alone */
            dm = _mm_blend_ps(dm, _mm_setzero_ps(), 0xC);           /* no block b+1 */
        }
        const __m512 dwp = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(dm));
        const __m128 off = _mm_shuffle_ps(dm, dm, _MM_SHUFFLE(3, 1, 3, 1));     /* [o0, o1, .. ] */
        for (int r = 0; r < NR; r++) {
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), t, _mm512_loadu_si512((const void *)(xq[r] + b * 32)));
            if (LIMBS == 2)   /* 256 * dot(w, q1) + dot(w, q2), exact in int32 */
                s = _mm512_dpbusd_epi32(_mm512_slli_epi32(s, 8), t,
                                        _mm512_loadu_si512((const void *)(xq[r] + x->q_stride + b * 32)));
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), dwp), _mm512_loadu_ps(xp[r] + 8 * b), acc[r]);
            acco[r] = _mm_fmadd_ps(off, _mm_castpd_ps(_mm_load_sd((const double *)(xs[r] + b))), acco[r]);
        }
    }
    for (int r = 0; r < NR; r++) {
        __m128 o = _mm_add_ps(acco[r], _mm_movehdup_ps(acco[r]));
        res[r] = _mm512_reduce_add_ps(acc[r]) + _mm_cvtss_f32(o);
    }
}

LFQ_T512 LFQ_INLINE __m512 lfq_load16_half_avx512(const uint8_t *p, __mmask16 k, const int BF) {
    __m256i h = _mm256_maskz_loadu_epi16(k, (const void *)p);
    if (BF) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

LFQ_T512 LFQ_INLINE void lfq_f16_avx512(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                        float *res, const int NR, const int BF) {
    const float *xf[LFQ_MRMAX];
    __m512 acc[LFQ_MRMAX];
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

#define LFQ_CALL_Q8_0_5(wr, K, x, i0, res, NR) LFQ_BY_LIMBS(x, lfq_blk_avx512, wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_Q4_0_5(wr, K, x, i0, res, NR) LFQ_BY_LIMBS(x, lfq_blk_avx512, wr, K, x, i0, res, NR, 1)
#define LFQ_CALL_Q4_1_5(wr, K, x, i0, res, NR) LFQ_BY_LIMBS(x, lfq_blk_avx512, wr, K, x, i0, res, NR, 2)
#define LFQ_CALL_F16_5(wr, K, x, i0, res, NR) lfq_f16_avx512(wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_BF16_5(wr, K, x, i0, res, NR) lfq_f16_avx512(wr, K, x, i0, res, NR, 1)

LFQ_DEFINE_ROWS(lfq_rows_q8_0_avx512, LFQ_T512, LFQ_CALL_Q8_0_5, 8)
LFQ_DEFINE_ROWS(lfq_rows_q4_0_avx512, LFQ_T512, LFQ_CALL_Q4_0_5, 8)
LFQ_DEFINE_ROWS(lfq_rows_q4_1_avx512, LFQ_T512, LFQ_CALL_Q4_1_5, 8)
LFQ_DEFINE_ROWS(lfq_rows_f16_avx512, LFQ_T512, LFQ_CALL_F16_5, 8)
LFQ_DEFINE_ROWS(lfq_rows_bf16_avx512, LFQ_T512, LFQ_CALL_BF16_5, 8)

/* One block as 2 x 16 floats, bit-identical to lfq_dequant_row (mul, then add for Q4_1). */
LFQ_T512 LFQ_INLINE void lfq_deq_block_avx512(const uint8_t *blk, __m512 *wv, const int TYPE) {
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(lfq_u16(blk)));
    __m512i i0, i1;
    if (TYPE == 0) {
        i0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)));
        i1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18)));
    } else {
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + (TYPE == 2 ? 4 : 2)));
        i0 = _mm512_cvtepu8_epi32(_mm_and_si128(q, _mm_set1_epi8(0x0F)));
        i1 = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0F)));
        if (TYPE == 1) {
            i0 = _mm512_sub_epi32(i0, _mm512_set1_epi32(8));
            i1 = _mm512_sub_epi32(i1, _mm512_set1_epi32(8));
        }
    }
    wv[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(i0));
    wv[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(i1));
    if (TYPE == 2) {
        const __m512 m = _mm512_set1_ps(_cvtsh_ss(lfq_u16(blk + 2)));
        wv[0] = _mm512_add_ps(wv[0], m);
        wv[1] = _mm512_add_ps(wv[1], m);
    }
}

LFQ_T512 LFQ_INLINE void lfq_blkf_avx512(const uint8_t *w, int64_t K, const lfq_act *x, int i0,
                                         float *res, const int NR, const int TYPE) {
    const int BS = TYPE == 0 ? 34 : (TYPE == 1 ? 18 : 20);
    const float *xf[LFQ_MRMAX];
    __m512 acc[LFQ_MRMAX];
    for (int r = 0; r < NR; r++) {
        xf[r] = x->xf + (int64_t)(i0 + r) * x->xf_stride;
        acc[r] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < K / 32; b++) {
        __m512 wv[2];
        lfq_deq_block_avx512(w + b * BS, wv, TYPE);
        for (int r = 0; r < NR; r++) {
            acc[r] = _mm512_fmadd_ps(wv[0], _mm512_loadu_ps(xf[r] + b * 32), acc[r]);
            acc[r] = _mm512_fmadd_ps(wv[1], _mm512_loadu_ps(xf[r] + b * 32 + 16), acc[r]);
        }
    }
    for (int r = 0; r < NR; r++) res[r] = _mm512_reduce_add_ps(acc[r]);
}

#define LFQ_CALL_Q8_0F_5(wr, K, x, i0, res, NR) lfq_blkf_avx512(wr, K, x, i0, res, NR, 0)
#define LFQ_CALL_Q4_0F_5(wr, K, x, i0, res, NR) lfq_blkf_avx512(wr, K, x, i0, res, NR, 1)
#define LFQ_CALL_Q4_1F_5(wr, K, x, i0, res, NR) lfq_blkf_avx512(wr, K, x, i0, res, NR, 2)
LFQ_DEFINE_ROWS(lfq_rows_q8_0f_avx512, LFQ_T512, LFQ_CALL_Q8_0F_5, 8)
LFQ_DEFINE_ROWS(lfq_rows_q4_0f_avx512, LFQ_T512, LFQ_CALL_Q4_0F_5, 8)
LFQ_DEFINE_ROWS(lfq_rows_q4_1f_avx512, LFQ_T512, LFQ_CALL_Q4_1F_5, 8)

#endif /* LFQ_X86 */

/* ---------------------------------------------------------------- float activations, many rows
 * For Q8_0/Q4_0/Q4_1 with float activations ("f32" mode) a tile of weight rows is dequantized
 * once into float scratch (bit-identical to lfq_dequant_row) and multiplied with all m
 * activation rows by the register-blocked float32 GEMM tiles of simd.h: the dequantization is
 * paid once per tile instead of once per 8 activation rows. The tiles accumulate each output
 * in one vector register over k, so a value does not depend on m or on the thread split. */

static void lfq_dequant_rows_simd(int qtype, int level, const uint8_t *w, int64_t rb,
                                  int64_t nrows, int64_t K, float *y);

static void lfq_rows_deq_gemm(int qtype, int level, const uint8_t *w, int64_t rb, int64_t nrows,
                              int64_t K, const float *x, int64_t ldx, int m, float *out,
                              int64_t ldo, float beta, float *scratch) {
    int lv = level >= LFQ_AVX512 ? LF_AVX512 : (level >= LFQ_AVX2 ? LF_AVX2 : LF_SCALAR);
    if (lv > lf_simd_level()) lv = lf_simd_level();
    lfq_dequant_rows_simd(qtype, level, w, rb, nrows, K, scratch);
    for (int64_t j = 0; j < nrows; j += 4) {
        int nr = nrows - j < 4 ? (int)(nrows - j) : 4;
        lf_gemm_colblock(lv, x, (long)ldx, scratch + j * K, (long)K, (long)K, out + j, (long)ldo,
                         m, nr, 1.0f, beta);
    }
}

#if LFQ_X86
#define LFQ_DEFINE_DEQ_ROWS(NAME, TARGET, DEQ, VT, NV, STORE)                                    \
    TARGET static void NAME(const uint8_t *w, int64_t rb, int64_t nrows, int64_t K, float *y,   \
                            const int TYPE) {                                                   \
        const int BS = TYPE == 0 ? 34 : (TYPE == 1 ? 18 : 20);                                  \
        for (int64_t r = 0; r < nrows; r++)                                                     \
            for (int64_t b = 0; b < K / LFQ_QK; b++) {                                          \
                VT wv[NV];                                                                      \
                DEQ(w + r * rb + b * BS, wv, TYPE);                                             \
                for (int v = 0; v < NV; v++) STORE(y + r * K + b * 32 + v * (32 / NV), wv[v]);  \
            }                                                                                   \
    }
LFQ_DEFINE_DEQ_ROWS(lfq_deq_rows_avx512, LFQ_T512, lfq_deq_block_avx512, __m512, 2, _mm512_storeu_ps)
LFQ_DEFINE_DEQ_ROWS(lfq_deq_rows_avx2, LFQ_T256, lfq_deq_block_avx2, __m256, 4, _mm256_storeu_ps)
#endif

static void lfq_dequant_rows_simd(int qtype, int level, const uint8_t *w, int64_t rb,
                                  int64_t nrows, int64_t K, float *y) {
#if LFQ_X86
    if (qtype <= LFQ_Q4_1 && level >= LFQ_AVX512) {
        if (qtype == 0) lfq_deq_rows_avx512(w, rb, nrows, K, y, 0);
        else if (qtype == 1) lfq_deq_rows_avx512(w, rb, nrows, K, y, 1);
        else lfq_deq_rows_avx512(w, rb, nrows, K, y, 2);
        return;
    }
    if (qtype <= LFQ_Q4_1 && level >= LFQ_AVX2) {
        if (qtype == 0) lfq_deq_rows_avx2(w, rb, nrows, K, y, 0);
        else if (qtype == 1) lfq_deq_rows_avx2(w, rb, nrows, K, y, 1);
        else lfq_deq_rows_avx2(w, rb, nrows, K, y, 2);
        return;
    }
#else
    (void)level;
#endif
    for (int64_t r = 0; r < nrows; r++) lfq_dequant_row(qtype, w + r * rb, K, y + r * K);
}

/* ---------------------------------------------------------------- dispatch
 *
 * C API (header-only, for quant.pyx and for a caller with its own parallel region, e.g. a
 * fused decode step):
 *   level = lfq_get_level();
 *   scratch: q = m rows of round_up(K, 64) int8, f = m rows of lfq_act_floats(K) floats;
 *   lfq_quantize_kernel(level)(x + i * K, K, q + i * q_stride, f + i * f_stride) per row i,
 *       once per input (any thread; the rows are independent);
 *   lfq_act act = {q, f, x, q_stride, f_stride, K, 1};   (xf = x is what F16/BF16 read)
 *   (two limbs: quantize x_i into rows 2i of q and f, then lfq_second_limb(x_i, K, q row 2i,
 *    f row 2i, q row 2i+1); limbs = 2; m stays the number of rows of x)
 *   lfq_rows_kernel(qtype, level)(w + r0 * row_bytes, row_bytes, r1 - r0, K, &act, m,
 *                                 out + r0, ldo, beta)   for a thread's weight rows [r0, r1).
 *   (lfq_rows_kernel_ex(qtype, level, 1): float activations, no scratch, only act.xf used.)
 * out[i][r] = beta * out[i][r] + dot(x_i, W_r) (beta == 0: not read); every output is the
 * same however the rows are split between threads or calls. */

typedef void (*lfq_rows_fn)(const uint8_t *w, int64_t rb, int64_t nrows, int64_t K,
                            const lfq_act *x, int m, float *out, int64_t ldo, float beta);
typedef void (*lfq_quantize_fn)(const float *x, int64_t K, int8_t *q, float *f);

/* exact_act: for Q8_0/Q4_0/Q4_1, multiply float activations with the dequantized weights
 * instead of quantizing the activations (F16/BF16 always use float activations). */
static lfq_rows_fn lfq_rows_kernel_ex(int qtype, int level, int exact_act) {
    static const lfq_rows_fn scalar[2][LFQ_NTYPES] = {
        {lfq_rows_q8_0_scalar, lfq_rows_q4_0_scalar, lfq_rows_q4_1_scalar,
         lfq_rows_f16_scalar, lfq_rows_bf16_scalar},
        {lfq_rows_q8_0f_scalar, lfq_rows_q4_0f_scalar, lfq_rows_q4_1f_scalar,
         lfq_rows_f16_scalar, lfq_rows_bf16_scalar}};
    if (qtype < 0 || qtype >= LFQ_NTYPES) return NULL;
    exact_act = exact_act ? 1 : 0;
#if LFQ_X86
    static const lfq_rows_fn avx2[2][LFQ_NTYPES] = {
        {lfq_rows_q8_0_avx2, lfq_rows_q4_0_avx2, lfq_rows_q4_1_avx2,
         lfq_rows_f16_avx2, lfq_rows_bf16_avx2},
        {lfq_rows_q8_0f_avx2, lfq_rows_q4_0f_avx2, lfq_rows_q4_1f_avx2,
         lfq_rows_f16_avx2, lfq_rows_bf16_avx2}};
    static const lfq_rows_fn avx512[2][LFQ_NTYPES] = {
        {lfq_rows_q8_0_avx512, lfq_rows_q4_0_avx512, lfq_rows_q4_1_avx512,
         lfq_rows_f16_avx512, lfq_rows_bf16_avx512},
        {lfq_rows_q8_0f_avx512, lfq_rows_q4_0f_avx512, lfq_rows_q4_1f_avx512,
         lfq_rows_f16_avx512, lfq_rows_bf16_avx512}};
    if (level >= LFQ_AVX512) return avx512[exact_act][qtype];
    if (level >= LFQ_AVX2) return avx2[exact_act][qtype];
#else
    (void)level;
#endif
    return scalar[exact_act][qtype];
}

static inline lfq_rows_fn lfq_rows_kernel(int qtype, int level) {
    return lfq_rows_kernel_ex(qtype, level, 0);
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
