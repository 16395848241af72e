/* SIMD inner loops for the float32 kernels, with runtime dispatch.
 *
 * The package is compiled without -march flags so the wheel runs on any x86-64 CPU. Each hot
 * loop exists three times: AVX-512F, AVX2+FMA and portable C. lf_simd_level() picks one per
 * process from __builtin_cpu_supports; LLM_FAST_SIMD=scalar|avx2|avx512 forces a lower level.
 *
 * Determinism: every output of the matmul tiles is one dot product accumulated in a single
 * vector register over k (chunks of the vector width, masked tail) and reduced in a fixed order.
 * So a value does not depend on the tile it was computed in, on the row count m (prefill ==
 * token-by-token decode, bit for bit), or on the number of threads.
 */
#ifndef LLM_FAST_SIMD_H
#define LLM_FAST_SIMD_H

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "omp_shim.h"

#if defined(__x86_64__) || defined(_M_X64)
#define LF_X86 1
#include <immintrin.h>
#else
#define LF_X86 0
#endif

#define LF_SCALAR 0
#define LF_AVX2 1
#define LF_AVX512 2

static int lf_level_cached = -1;

static int lf_simd_level(void) {
    if (lf_level_cached >= 0) return lf_level_cached;
    int lvl = LF_SCALAR;
#if LF_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) lvl = LF_AVX2;
    if (lvl == LF_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
        lvl = LF_AVX512;
#endif
    const char *env = getenv("LLM_FAST_SIMD");
    if (env) {
        if (strcmp(env, "scalar") == 0) lvl = LF_SCALAR;
        else if (strcmp(env, "avx2") == 0 && lvl > LF_AVX2) lvl = LF_AVX2;
    }
    lf_level_cached = lvl;
    return lvl;
}

/* ------------------------------------------------------------------------------------------ */
/* matmul tiles: C[i, j] = beta * C[i, j] + alpha * dot(A[i, :k], B[j, :k]), i < MR, j < NR     */

static inline float lf_finish(float beta, float c, float alpha, float d) {
    return beta == 0.0f ? alpha * d : beta * c + alpha * d;
}

#define LF_TILE_SCALAR(MR, NR)                                                                 \
    static void lf_tile_sc_##MR##x##NR(const float *A, long lda, const float *B, long ldb,   \
                                       long k, float *C, long ldc, float alpha, float beta) { \
        float acc[MR][NR];                                                                     \
        for (int i = 0; i < MR; i++)                                                           \
            for (int j = 0; j < NR; j++) acc[i][j] = 0.0f;                                     \
        for (long p = 0; p < k; p++)                                                           \
            for (int i = 0; i < MR; i++)                                                       \
                for (int j = 0; j < NR; j++) acc[i][j] += A[i * lda + p] * B[j * ldb + p];     \
        for (int i = 0; i < MR; i++)                                                           \
            for (int j = 0; j < NR; j++)                                                       \
                C[i * ldc + j] = lf_finish(beta, C[i * ldc + j], alpha, acc[i][j]);            \
    }

#if LF_X86
__attribute__((target("avx2,fma"))) static inline float lf_hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehl_ps(lo, lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_shuffle_ps(lo, lo, 0x55);
    return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

__attribute__((target("avx2,fma"))) static inline __m256i lf_tailmask256(long r) {
    const int idx[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    __m256i iv = _mm256_loadu_si256((const __m256i *)idx);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)r), iv);
}

#define LF_TILE_AVX2(MR, NR)                                                                   \
    __attribute__((target("avx2,fma"))) static void lf_tile_a2_##MR##x##NR(                  \
        const float *A, long lda, const float *B, long ldb, long k, float *C, long ldc,       \
        float alpha, float beta) {                                                             \
        __m256 acc[MR][NR];                                                                    \
        for (int i = 0; i < MR; i++)                                                           \
            for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();                      \
        long p = 0;                                                                            \
        for (; p + 8 <= k; p += 8) {                                                           \
            __m256 b[NR];                                                                      \
            for (int j = 0; j < NR; j++) b[j] = _mm256_loadu_ps(B + j * ldb + p);             \
            for (int i = 0; i < MR; i++) {                                                     \
                __m256 a = _mm256_loadu_ps(A + i * lda + p);                                   \
                for (int j = 0; j < NR; j++) acc[i][j] = _mm256_fmadd_ps(a, b[j], acc[i][j]);  \
            }                                                                                  \
        }                                                                                      \
        if (p < k) {                                                                           \
            __m256i m = lf_tailmask256(k - p);                                                 \
            __m256 b[NR];                                                                      \
            for (int j = 0; j < NR; j++) b[j] = _mm256_maskload_ps(B + j * ldb + p, m);       \
            for (int i = 0; i < MR; i++) {                                                     \
                __m256 a = _mm256_maskload_ps(A + i * lda + p, m);                             \
                for (int j = 0; j < NR; j++) acc[i][j] = _mm256_fmadd_ps(a, b[j], acc[i][j]);  \
            }                                                                                  \
        }                                                                                      \
        for (int i = 0; i < MR; i++)                                                           \
            for (int j = 0; j < NR; j++)                                                       \
                C[i * ldc + j] = lf_finish(beta, C[i * ldc + j], alpha, lf_hsum256(acc[i][j])); \
    }

/* [sum(a), sum(b), sum(c), sum(d)] with the halving tree of _mm512_reduce_add_ps (lane i plus
 * lane i + 8, then + 4, + 2, + 1), four accumulators at once: bit-identical to reducing each
 * alone, at a quarter of the shuffles. */
__attribute__((target("avx512f,avx512vl"))) static inline __m128 lf_hsum4_512(__m512 a, __m512 b, __m512 c,
                                                                  __m512 d) {
    __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(t, v, 0x88), _mm512_shuffle_f32x4(t, v, 0xDD));
    w = _mm512_add_ps(w, _mm512_permute_ps(w, 0x4E));
    w = _mm512_add_ps(w, _mm512_permute_ps(w, 0xB1));
    return _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, w));
}

/* C[:nr] = beta * C[:nr] + alpha * d[:nr] (lf_finish on 4 lanes). */
__attribute__((target("avx512f,avx512vl"))) static inline void lf_finish4(float *C, __m128 d, int nr,
                                                               float alpha, float beta) {
    __mmask8 m = (__mmask8)((1u << nr) - 1u);
    __m128 r = _mm_mul_ps(_mm_set1_ps(alpha), d);
    if (beta != 0.0f)
        r = _mm_add_ps(_mm_mul_ps(_mm_set1_ps(beta), _mm_maskz_loadu_ps(m, C)), r);
    _mm_mask_storeu_ps(C, m, r);
}

#define LF_TILE_AVX512(MR, NR)                                                                 \
    __attribute__((target("avx512f,avx512vl,fma"))) static void lf_tile_a5_##MR##x##NR(        \
        const float *A, long lda, const float *B, long ldb, long k, float *C, long ldc,       \
        float alpha, float beta) {                                                             \
        __m512 acc[MR][4];                                                                     \
        for (int i = 0; i < MR; i++)                                                           \
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();                       \
        long p = 0;                                                                            \
        for (; p + 16 <= k; p += 16) {                                                         \
            __m512 b[NR];                                                                      \
            for (int j = 0; j < NR; j++) b[j] = _mm512_loadu_ps(B + j * ldb + p);             \
            for (int i = 0; i < MR; i++) {                                                     \
                __m512 a = _mm512_loadu_ps(A + i * lda + p);                                   \
                for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);  \
            }                                                                                  \
        }                                                                                      \
        if (p < k) {                                                                           \
            __mmask16 m = (__mmask16)((1u << (k - p)) - 1u);                                   \
            __m512 b[NR];                                                                      \
            for (int j = 0; j < NR; j++) b[j] = _mm512_maskz_loadu_ps(m, B + j * ldb + p);    \
            for (int i = 0; i < MR; i++) {                                                     \
                __m512 a = _mm512_maskz_loadu_ps(m, A + i * lda + p);                          \
                for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);  \
            }                                                                                  \
        }                                                                                      \
        for (int i = 0; i < MR; i++)                                                           \
            lf_finish4(C + i * ldc, lf_hsum4_512(acc[i][0], acc[i][1], acc[i][2], acc[i][3]),  \
                       NR, alpha, beta);                                                       \
    }
#endif

#define LF_TILES(GEN) \
    GEN(1, 1) GEN(1, 2) GEN(1, 3) GEN(1, 4) GEN(2, 1) GEN(2, 2) GEN(2, 3) GEN(2, 4) \
    GEN(3, 1) GEN(3, 2) GEN(3, 3) GEN(3, 4) GEN(4, 1) GEN(4, 2) GEN(4, 3) GEN(4, 4)

LF_TILES(LF_TILE_SCALAR)
#if LF_X86
LF_TILES(LF_TILE_AVX2)
LF_TILES(LF_TILE_AVX512)
#endif

typedef void (*lf_tile_fn)(const float *, long, const float *, long, long, float *, long, float,
                           float);

#define LF_TABLE(PFX)                                                                          \
    {{lf_tile_##PFX##_1x1, lf_tile_##PFX##_1x2, lf_tile_##PFX##_1x3, lf_tile_##PFX##_1x4},     \
     {lf_tile_##PFX##_2x1, lf_tile_##PFX##_2x2, lf_tile_##PFX##_2x3, lf_tile_##PFX##_2x4},     \
     {lf_tile_##PFX##_3x1, lf_tile_##PFX##_3x2, lf_tile_##PFX##_3x3, lf_tile_##PFX##_3x4},     \
     {lf_tile_##PFX##_4x1, lf_tile_##PFX##_4x2, lf_tile_##PFX##_4x3, lf_tile_##PFX##_4x4}}

static const lf_tile_fn lf_tiles_sc[4][4] = LF_TABLE(sc);
#if LF_X86
static const lf_tile_fn lf_tiles_a2[4][4] = LF_TABLE(a2);
static const lf_tile_fn lf_tiles_a5[4][4] = LF_TABLE(a5);
#endif

static inline lf_tile_fn lf_tile(int level, int mr, int nr) {
#if LF_X86
    if (level == LF_AVX512) return lf_tiles_a5[mr - 1][nr - 1];
    if (level == LF_AVX2) return lf_tiles_a2[mr - 1][nr - 1];
#endif
    return lf_tiles_sc[mr - 1][nr - 1];
}

/* One column block of C: rows [0, m) x columns [0, nr) (nr <= 4), B points at row j0. */
static void lf_gemm_colblock(int level, const float *A, long lda, const float *B, long ldb,
                             long k, float *C, long ldc, long m, int nr, float alpha,
                             float beta) {
    lf_tile_fn full = lf_tile(level, 4, nr);
    long i = 0;
    for (; i + 4 <= m; i += 4) full(A + i * lda, lda, B, ldb, k, C + i * ldc, ldc, alpha, beta);
    if (i < m) lf_tile(level, (int)(m - i), nr)(A + i * lda, lda, B, ldb, k, C + i * ldc, ldc, alpha, beta);
}

/* Single dot product with the same reduction order as the tiles. */
static inline float lf_dot(int level, const float *a, const float *b, long k) {
    float c = 0.0f;
    lf_tile(level, 1, 1)(a, 0, b, 0, k, &c, 0, 1.0f, 0.0f);
    return c;
}

/* ------------------------------------------------------------------------------------------ */
/* y[:n] += a * x[:n]                                                                           */
#if LF_X86
__attribute__((target("avx512f,fma"))) static void lf_axpy_a5(float *y, float a, const float *x,
                                                              long n) {
    __m512 va = _mm512_set1_ps(a);
    long i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i),
                                                        _mm512_maskz_loadu_ps(m, y + i)));
    }
}
__attribute__((target("avx2,fma"))) static void lf_axpy_a2(float *y, float a, const float *x,
                                                           long n) {
    __m256 va = _mm256_set1_ps(a);
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}
#endif
static inline void lf_axpy(int level, float *y, float a, const float *x, long n) {
#if LF_X86
    if (level == LF_AVX512) { lf_axpy_a5(y, a, x, n); return; }
    if (level == LF_AVX2) { lf_axpy_a2(y, a, x, n); return; }
#endif
    for (long i = 0; i < n; i++) y[i] += a * x[i];
}

/* ------------------------------------------------------------------------------------------ */
/* Row-wise helpers used by several kernels.                                                    */

static inline float lf_sumsq(int level, const float *x, long n) { return lf_dot(level, x, x, n); }

/* out = w * x / sqrt(mean(x^2) + eps) */
static inline void lf_rms_norm_row(int level, float *out, const float *x, const float *w, long n,
                                   float eps) {
    float ss = lf_sumsq(level, x, n);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (long i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

/* ------------------------------------------------------------------------------------------ */
/* exp for softmax and SiLU. The AVX-512 path is a vectorised Cephes expf (range reduction by
 * ln 2, degree-6 polynomial, scalef for 2^n; max error ~2 ulp); every element of a row, tail
 * included (masked), goes through the same instructions, so a value does not depend on its
 * position or on how a row is split. Other levels use libm's expf. */
#if LF_X86
__attribute__((target("avx512f"))) static inline __m512 lf_exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f"))) static void lf_softmax_row_a5(float *x, long n, long total) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    long i = 0;
    for (; i + 16 <= n; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(x + i));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, x + i));
    }
    __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));  /* max is exact in any order */
    __m512 acc = _mm512_setzero_ps();
    for (i = 0; i + 16 <= n; i += 16) {
        __m512 e = lf_exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), mx));
        _mm512_storeu_ps(x + i, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        __m512 e = lf_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), mx));
        _mm512_mask_storeu_ps(x + i, m, e);
        acc = _mm512_mask_add_ps(acc, m, acc, e);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(acc));
    for (i = 0; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), inv));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv));
    }
    for (i = n; i < total; i++) x[i] = 0.0f;
}

/* out[j] = silu(gate[j]) * up[j] = gate / (1 + exp(-gate)) * up */
__attribute__((target("avx512f"))) static void lf_swiglu_row_a5(float *out, const float *gate,
                                                                const float *up, long n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 g = _mm512_maskz_loadu_ps(m, gate + i), u = _mm512_maskz_loadu_ps(m, up + i);
        __m512 e = lf_exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u));
    }
}
#endif

/* In-place softmax of x[:n]; x[n:total] (masked part) set to 0. */
static inline void lf_softmax_row(float *x, long n, long total) {
    if (n <= 0) { for (long i = 0; i < total; i++) x[i] = 0.0f; return; }
#if LF_X86
    if (lf_simd_level() == LF_AVX512) { lf_softmax_row_a5(x, n, total); return; }
#endif
    float mx = x[0];
    for (long i = 1; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    float s = 0.0f;
    for (long i = 0; i < n; i++) { float e = expf(x[i] - mx); x[i] = e; s += e; }
    float inv = 1.0f / s;
    for (long i = 0; i < n; i++) x[i] *= inv;
    for (long i = n; i < total; i++) x[i] = 0.0f;
}

static inline float lf_silu(float g) { return g / (1.0f + expf(-g)); }

/* out[:n] = silu(gate[:n]) * up[:n] (out may alias up or gate). */
static inline void lf_swiglu_row(int level, float *out, const float *gate, const float *up, long n) {
#if LF_X86
    if (level == LF_AVX512) { lf_swiglu_row_a5(out, gate, up, n); return; }
#endif
    for (long i = 0; i < n; i++) out[i] = lf_silu(gate[i]) * up[i];
}

/* Rotate-half RoPE of one head vector x[:d] with cos/sin rows of length d/2. */
static inline void lf_rope_head(float *x, const float *cs, const float *sn, long d) {
    long h = d / 2;
    for (long i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        x[i] = a * cs[i] - b * sn[i];
        x[i + h] = b * cs[i] + a * sn[i];
    }
}

/* out[h, :d] = sum_j p[h, j] * V[j, :d] for the nh (<= 4) heads of one KV group, j in order,
 * one fused multiply-add per term (the same value as lf_axpy over j into zeros). */
#if LF_X86
__attribute__((target("avx512f"))) static void lf_attend_pv_a5(const float *p, long ldp, int nh,
                                                               const float *v, long kv_stride,
                                                               long total, long d, float *out,
                                                               long ldo) {
    for (long c = 0; c < d; c += 16) {
        __mmask16 m = d - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - c)) - 1u);
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                         _mm512_setzero_ps()};
        for (long j = 0; j < total; j++) {
            __m512 vj = _mm512_maskz_loadu_ps(m, v + j * kv_stride + c);
            for (int h = 0; h < nh; h++)
                acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * ldp + j]), vj, acc[h]);
        }
        for (int h = 0; h < nh; h++) _mm512_mask_storeu_ps(out + h * ldo + c, m, acc[h]);
    }
}
#endif

/* nq query heads that read the same KV head, over `total` cached positions:
 * out[h, :d] = softmax(scale * q[h] . K^T) V for h < nq. q rows and out rows are d floats
 * apart (the heads of one position are contiguous); K and V rows are kv_stride floats apart;
 * scores is scratch of nq x total floats. Each head's scores are dot products through the
 * matmul tiles (4 keys at a time, all heads of the group against the same keys), so a value
 * does not depend on how many heads or positions are processed together. */
static inline void lf_attend_group(int level, const float *q, long nq, const float *k_cache,
                                   const float *v_cache, long kv_stride, long total, long d,
                                   float scale, float *scores, float *out) {
    for (long j = 0; j < total; j += 4) {
        long nr = total - j < 4 ? total - j : 4;
        lf_gemm_colblock(level, q, d, k_cache + j * kv_stride, kv_stride, d, scores + j, total,
                         nq, (int)nr, scale, 0.0f);
    }
    for (long h = 0; h < nq; h++) lf_softmax_row(scores + h * total, total, total);
#if LF_X86
    if (level == LF_AVX512) {
        for (long h = 0; h < nq; h += 4)
            lf_attend_pv_a5(scores + h * total, total, nq - h < 4 ? (int)(nq - h) : 4, v_cache,
                            kv_stride, total, d, out + h * d, d);
        return;
    }
#endif
    for (long h = 0; h < nq; h++) {
        memset(out + h * d, 0, (size_t)d * sizeof(float));
        for (long j = 0; j < total; j++)
            lf_axpy(level, out + h * d, scores[h * total + j], v_cache + j * kv_stride, d);
    }
}


/* Prefill: the queries of npos consecutive positions x nh query heads sharing one KV head, as
 * rows r = p * nh + h of qbuf (d floats each; position p sees keys [0, total0 + p)). Each key
 * and value row is loaded once for all npos * nh rows (register tiles of 4 rows x 4 keys).
 * Bit-identical to lf_attend_group per position: every score is the same dot product, softmax
 * runs over each row's own keys and zeroes the rest, and the zeros add exactly nothing to the
 * value sums. scores: nq * (total0 + npos - 1) floats; results into obuf (rows as qbuf). */
static inline void lf_attend_multi(int level, const float *qbuf, long nh, long npos,
                                   const float *k_cache, const float *v_cache, long kv_stride,
                                   long total0, long d, float scale, float *scores, float *obuf) {
    const long tmax = total0 + npos - 1, nq = nh * npos;
    for (long j = 0; j < tmax; j += 4) {
        long nr = tmax - j < 4 ? tmax - j : 4;
        lf_gemm_colblock(level, qbuf, d, k_cache + j * kv_stride, kv_stride, d, scores + j, tmax,
                         nq, (int)nr, scale, 0.0f);
    }
    for (long r = 0; r < nq; r++) lf_softmax_row(scores + r * tmax, total0 + r / nh, tmax);
#if LF_X86
    if (level == LF_AVX512) {
        for (long r = 0; r < nq; r += 4)
            lf_attend_pv_a5(scores + r * tmax, tmax, nq - r < 4 ? (int)(nq - r) : 4, v_cache,
                            kv_stride, total0 + (nq - 1 < r + 3 ? nq - 1 : r + 3) / nh, d,
                            obuf + r * d, d);
        return;
    }
#endif
    for (long r = 0; r < nq; r++) {
        long t = total0 + r / nh;
        memset(obuf + r * d, 0, (size_t)d * sizeof(float));
        for (long j = 0; j < t; j++)
            lf_axpy(level, obuf + r * d, scores[r * tmax + j], v_cache + j * kv_stride, d);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Memory read bandwidth probe: sum of x[:n], one contiguous range per thread, 4 independent
 * AVX-512 accumulators (enough loads in flight to saturate DRAM). */
#if LF_X86
__attribute__((target("avx512f"))) static float lf_stream_sum_a5(const float *x, long n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_add_ps(a0, _mm512_loadu_ps(x + i));
        a1 = _mm512_add_ps(a1, _mm512_loadu_ps(x + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_loadu_ps(x + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_loadu_ps(x + i + 48));
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; i < n; i++) s += x[i];
    return s;
}
#endif
static inline double lf_stream_sum(const float *x, long n, int nthreads) {
    double total = 0.0;
    int level = lf_simd_level();
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
#endif
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        long a = n * tid / nth, b = n * (tid + 1) / nth;
        float s = 0.0f;
#if LF_X86
        if (level == LF_AVX512) s = lf_stream_sum_a5(x + a, b - a);
        else
#endif
            for (long i = a; i < b; i++) s += x[i];
        total += s;
    }
    return total;
}

#endif /* LLM_FAST_SIMD_H */
