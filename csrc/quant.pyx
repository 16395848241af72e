# cython: language_level=3
"""Quantized-weight kernels: ggml Q8_0 / Q4_0 / Q4_1 (and F16 / BF16) rows times f32 activations.

Thin typed wrappers over csrc/quant.h. Weights stay in ggml block layout (uint8 rows); the
activations of a call are quantized to 8 bits once, into a `Workspace` the caller owns and that
grows on demand (allocation happens only when a call needs more room than any call before it).
Output rows are split between OpenMP threads with a static schedule, and every output element is
computed by one thread in a fixed order, so results do not depend on the thread count.

Type codes: 0 q8_0, 1 q4_0, 2 q4_1, 3 f16, 4 bf16 (see QTYPE_CODES).
"""
import os
import warnings

import numpy as np

from libc.stdint cimport uint8_t, int8_t, int32_t, int64_t
from cython.parallel cimport prange, threadid

cdef extern from "quant.h" nogil:
    ctypedef struct lfq_act:
        const int8_t *q
        const float *f
        const float *xf
        int64_t q_stride
        int64_t f_stride
        int64_t xf_stride
        int limbs
    ctypedef void (*lfq_rows_fn)(const uint8_t *w, int64_t rb, int64_t nrows, int64_t K,
                                 const lfq_act *x, int m, float *out, int64_t ldo,
                                 float beta) noexcept nogil
    ctypedef void (*lfq_quantize_fn)(const float *x, int64_t K, int8_t *q,
                                     float *f) noexcept nogil
    int64_t lfq_act_floats(int64_t K)
    int64_t lfq_npairs(int64_t K)
    int64_t lfq_nbpad(int64_t K)
    int LFQ_SCALAR, LFQ_AVX2, LFQ_AVX512, LFQ_NTYPES
    void lfq_set_num_threads(int n)
    int lfq_get_num_threads()
    int lfq_have_openmp()
    int lfq_hw_level()
    int lfq_set_level(int requested)
    int lfq_get_level()
    void lfq_dequant_row(int qtype, const uint8_t *w, int64_t K, float *y)
    lfq_rows_fn lfq_rows_kernel_ex(int qtype, int level, int exact_act)
    lfq_quantize_fn lfq_quantize_kernel(int level)
    void lfq_second_limb(const float *x, int64_t K, const int8_t *q1, float *f, int8_t *q2)
    void lfq_rows_deq_gemm(int qtype, int level, const uint8_t *w, int64_t rb, int64_t nrows,
                           int64_t K, const float *x, int64_t ldx, int m, float *out,
                           int64_t ldo, float beta, float *scratch)

QTYPE_CODES = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "f16": 3, "bf16": 4}
# (weights per block, bytes per block)
BLOCK = {0: (32, 34), 1: (32, 18), 2: (32, 20), 3: (1, 2), 4: (1, 2)}
SIMD_LEVELS = ("scalar", "avx2", "avx512")

cdef int ROW_TILE = 8      # weight rows per parallel work item (kept in L1 while x is swept)
cdef int PAR_QUANT_ROWS = 8  # quantize activation rows in parallel from this many rows on


# ------------------------------------------------------------------ threads and SIMD level

def set_num_threads(int n):
    """Set the OpenMP thread count of the kernels called from this Python thread
    (omp_set_num_threads: a per-thread setting; see runtime.set_num_threads)."""
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    lfq_set_num_threads(n)


def get_num_threads():
    """The OpenMP thread count a parallel kernel will use (omp_get_max_threads; 1 without OpenMP)."""
    return lfq_get_num_threads()


def have_openmp():
    return bool(lfq_have_openmp())


def simd_level():
    """The SIMD level in force: 'scalar', 'avx2' or 'avx512'."""
    return SIMD_LEVELS[lfq_get_level()]


def hardware_simd_level():
    """The best SIMD level this CPU supports."""
    return SIMD_LEVELS[lfq_hw_level()]


def set_simd_level(name):
    """Cap the SIMD level ('scalar' | 'avx2' | 'avx512'); returns the level in force, which is
    lower when the CPU lacks the instructions. Call it while no kernel is running."""
    if name not in SIMD_LEVELS:
        raise ValueError(f"SIMD level must be one of {SIMD_LEVELS}, got {name!r}")
    return SIMD_LEVELS[lfq_set_level(SIMD_LEVELS.index(name))]


_env = os.environ.get("LLM_FAST_SIMD", "").strip().lower()
if _env and _env not in SIMD_LEVELS:
    # A typo must not make the library unimportable: say so and use the best level.
    warnings.warn(f"LLM_FAST_SIMD={_env!r} is not one of {SIMD_LEVELS}; ignored", RuntimeWarning)
    _env = ""
lfq_set_level(SIMD_LEVELS.index(_env) if _env else 2)


# ------------------------------------------------------------------ workspace

cdef inline int64_t _round_up(int64_t n, int64_t k) noexcept nogil:
    return (n + k - 1) // k * k


cdef class Workspace:
    """Scratch for the 8-bit activations of one matmul call: m rows of K int8 (row stride K
    rounded up to 64) followed by m rows of lfq_act_floats(K) floats (per-block scales, their
    AVX-512 broadcast patterns and d * sum(q); see quant.h). Grows on demand, never shrinks;
    one Workspace must not be used by two calls at the same time."""
    cdef object buf
    cdef uint8_t *ptr
    cdef readonly int64_t capacity

    def __cinit__(self):
        self.buf = None
        self.ptr = NULL
        self.capacity = 0

    cdef uint8_t *reserve(self, int64_t nbytes) except NULL:
        cdef uint8_t[::1] view
        cdef int64_t off
        if nbytes > self.capacity or self.ptr == NULL:
            nbytes = max(nbytes, 2 * self.capacity, 4096)
            self.buf = np.empty(nbytes + 64, dtype=np.uint8)
            view = self.buf
            off = (64 - (<size_t>&view[0]) % 64) % 64
            self.ptr = &view[0] + off
            self.capacity = nbytes
        return self.ptr


# ------------------------------------------------------------------ kernels

cdef inline int64_t _cols_from_row_bytes(int qtype, int64_t row_bytes) except -1:
    if qtype < 0 or qtype >= LFQ_NTYPES:
        raise ValueError(f"unknown quantization type code {qtype}")
    qk, bs = BLOCK[qtype]
    if row_bytes % bs:
        raise ValueError(f"row of {row_bytes} bytes is not a whole number of {bs}-byte blocks")
    return row_bytes // bs * qk


def matmul(int qtype, const uint8_t[:, ::1] w, int64_t cols, const float[:, ::1] x,
           float[:, ::1] out, float beta, Workspace ws not None, bint exact_act=False,
           int limbs=1):
    """out = beta * out + x @ W.T, W given as `w` (rows, row_bytes) in ggml layout with `cols`
    weights per row. x: (m, cols) float32; out: (m, rows) float32. beta == 0: out is not read.
    exact_act: float activations times the dequantized weights (no 8-bit activations).
    limbs: 1 = 8-bit activations; 2 = 8-bit activations plus the residual on a 256x finer grid
    (~16-bit accuracy, see quant.h). Ignored for F16/BF16 and with exact_act."""
    cdef int64_t rows = w.shape[0], m = x.shape[0], K = cols, nf = 0, qstride = 0, i, t, ntiles, r0, nr
    cdef int level = lfq_get_level()
    cdef lfq_rows_fn fn
    cdef lfq_quantize_fn qfn = lfq_quantize_kernel(level)
    cdef lfq_act act
    cdef uint8_t *scratch
    cdef int8_t *xq = NULL
    cdef float *xf = NULL
    cdef float *deq = NULL   # dequantized weight tiles of the f32 path, one per thread
    cdef int tile = ROW_TILE
    cdef int nthreads
    cdef bint quantized
    if _cols_from_row_bytes(qtype, w.shape[1]) != cols:
        raise ValueError(f"weight rows of {w.shape[1]} bytes do not hold {cols} columns")
    if x.shape[1] != cols:
        raise ValueError(f"x has {x.shape[1]} columns, the weight has {cols}")
    if out.shape[0] != m or out.shape[1] != rows:
        raise ValueError(f"out has shape {(out.shape[0], out.shape[1])}, expected {(m, rows)}")
    if limbs != 1 and limbs != 2:
        raise ValueError(f"limbs must be 1 or 2, got {limbs}")
    if m == 0 or rows == 0:
        return
    if m > 1073741823:
        raise ValueError("too many activation rows")
    quantized = qtype <= 2 and not exact_act
    if not quantized:
        limbs = 1
    fn = lfq_rows_kernel_ex(qtype, level, exact_act)
    act.xf = &x[0, 0]
    act.xf_stride = cols
    act.q = NULL
    act.f = NULL
    act.q_stride = 0
    act.f_stride = 0
    act.limbs = limbs
    if quantized:
        # limbs * m rows of int8, then limbs * m rows of floats (x row i: rows limbs * i, +1)
        nf = lfq_act_floats(cols)
        qstride = _round_up(cols, 64)
        scratch = ws.reserve(limbs * m * (qstride + nf * sizeof(float)))
        xq = <int8_t *>scratch
        xf = <float *>(scratch + limbs * m * qstride)
        act.q = xq
        act.f = xf
        act.q_stride = qstride
        act.f_stride = nf
    ntiles = (rows + tile - 1) // tile
    if qtype <= 2 and exact_act:
        # float activations: each thread dequantizes its weight tile into its own scratch
        nthreads = max(lfq_get_num_threads(), 1)
        deq = <float *>ws.reserve(nthreads * tile * cols * sizeof(float))
        with nogil:
            for t in prange(ntiles, schedule="static", num_threads=nthreads):
                r0 = t * tile
                nr = rows - r0
                if nr > tile:
                    nr = tile
                lfq_rows_deq_gemm(qtype, level, &w[r0, 0], w.shape[1], nr, K, &x[0, 0], cols,
                                  <int>m, &out[0, r0], rows, beta, deq + threadid() * tile * cols)
        return
    with nogil:
        if quantized and limbs == 1:
            if m >= PAR_QUANT_ROWS:
                for i in prange(m, schedule="static"):
                    qfn(&x[i, 0], K, xq + i * qstride, xf + i * nf)
            else:
                for i in range(m):
                    qfn(&x[i, 0], K, xq + i * qstride, xf + i * nf)
        elif quantized:
            if m >= PAR_QUANT_ROWS:
                for i in prange(m, schedule="static"):
                    _quantize_two_limbs(qfn, &x[i, 0], K, xq + 2 * i * qstride, qstride,
                                        xf + 2 * i * nf)
            else:
                for i in range(m):
                    _quantize_two_limbs(qfn, &x[i, 0], K, xq + 2 * i * qstride, qstride,
                                        xf + 2 * i * nf)
        for t in prange(ntiles, schedule="static"):
            r0 = t * tile
            nr = rows - r0
            if nr > tile:
                nr = tile
            fn(&w[r0, 0], w.shape[1], nr, K, &act, <int>m, &out[0, r0], rows, beta)


cdef inline void _quantize_two_limbs(lfq_quantize_fn qfn, const float *x, int64_t K, int8_t *q,
                                     int64_t qstride, float *f) noexcept nogil:
    qfn(x, K, q, f)
    lfq_second_limb(x, K, q, f, q + qstride)


def activation_layout(int64_t K):
    """Offsets in a row's float area (see quant.h): (patterns, d, s, total floats)."""
    return 0, 16 * lfq_npairs(K), 16 * lfq_npairs(K) + lfq_nbpad(K), lfq_act_floats(K)


def quantize_activations(const float[:, ::1] x):
    """Test hook: the 8-bit activation quantization the matmul uses: (q int8 (m, K),
    f float32 (m, activation_layout(K)[3])), f holding the per-block d, s = d * sum(q) and the
    AVX-512 scale patterns at the offsets activation_layout(K) gives."""
    cdef int64_t m = x.shape[0], K = x.shape[1], i
    if K % 32:
        raise ValueError(f"activation row length {K} is not a multiple of 32")
    q = np.empty((m, K), dtype=np.int8)
    f = np.full((m, lfq_act_floats(K)), np.nan, dtype=np.float32)  # every float must be written
    cdef int8_t[:, ::1] qv = q
    cdef float[:, ::1] fv = f
    cdef lfq_quantize_fn qfn = lfq_quantize_kernel(lfq_get_level())
    if m and K:
        with nogil:
            for i in range(m):
                qfn(&x[i, 0], K, &qv[i, 0], &fv[i, 0])
    return q, f


def dequantize(int qtype, const uint8_t[:, ::1] w, float[:, ::1] out):
    """out[r] = dequantized row r of w (bit-exact with ggml's dequantization)."""
    cdef int64_t rows = w.shape[0], K = _cols_from_row_bytes(qtype, w.shape[1]), r
    if out.shape[0] != rows or out.shape[1] != K:
        raise ValueError(f"out has shape {(out.shape[0], out.shape[1])}, expected {(rows, K)}")
    if rows == 0 or K == 0:
        return
    with nogil:
        for r in prange(rows, schedule="static"):
            lfq_dequant_row(qtype, &w[r, 0], K, &out[r, 0])


def dequantize_rows(int qtype, const uint8_t[:, ::1] w, const int64_t[::1] ids, float[:, ::1] out):
    """out[i] = dequantized row ids[i] of w (embedding lookup)."""
    cdef int64_t rows = w.shape[0], K = _cols_from_row_bytes(qtype, w.shape[1]), n = ids.shape[0]
    cdef int64_t i
    if out.shape[0] != n or out.shape[1] != K:
        raise ValueError(f"out has shape {(out.shape[0], out.shape[1])}, expected {(n, K)}")
    for i in range(n):
        if ids[i] < 0 or ids[i] >= rows:
            raise IndexError(f"row id {ids[i]} out of range for {rows} rows")
    if n == 0 or K == 0:
        return
    with nogil:
        if n >= 16:
            for i in prange(n, schedule="static"):
                lfq_dequant_row(qtype, &w[ids[i], 0], K, &out[i, 0])
        else:
            for i in range(n):
                lfq_dequant_row(qtype, &w[ids[i], 0], K, &out[i, 0])
