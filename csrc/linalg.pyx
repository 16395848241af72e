"""matmul_transb: C = beta * C + alpha * A @ B^T, the projection kernel of the model.

A (m, k) activations, B (n, k) weights stored out x in (the Hugging Face layout), C (m, n).
Parallel over blocks of 4 output columns (weight rows): each thread streams its own weight
rows once and reuses them for every activation row (4x4 register tiles from simd.h), which is
the matrix-vector path for decode (m = 1) and the tiled path for prefill (m > 1). For prefill
with long rows (k > 1024) the tiles walk k in ranges of 512 (carrying their unreduced
accumulators, so the results are unchanged) to keep the 4 weight rows in L1.
"""
from cython.parallel cimport prange
from simd cimport lf_simd_level, lf_gemm_colblock, lf_stream_sum, omp_get_max_threads

# Below this many multiply-adds a parallel region costs more than it saves.
cdef long PARALLEL_MIN_WORK = 1 << 16


cdef void matmul_transb_raw(float *C, long ldc, const float *A, long lda, const float *B,
                            long ldb, long m, long n, long k, float alpha,
                            float beta) noexcept nogil:
    cdef long nb = (n + 3) // 4
    cdef long jb
    cdef int level = lf_simd_level()
    cdef int nthreads = 1 if m * n * k < PARALLEL_MIN_WORK else 0
    if nthreads == 1:
        for jb in range(nb):
            lf_gemm_colblock(level, A, lda, B + jb * 4 * ldb, ldb, k, C + jb * 4, ldc, m,
                             <int>min(4, n - jb * 4), alpha, beta)
    else:
        for jb in prange(nb, schedule="static"):
            lf_gemm_colblock(level, A, lda, B + jb * 4 * ldb, ldb, k, C + jb * 4, ldc, m,
                             <int>min(4, n - jb * 4), alpha, beta)


def matmul_transb(float[:, ::1] c, float beta, const float[:, ::1] a, const float[:, ::1] b,
                  float alpha):
    """c = beta * c + alpha * a @ b.T in place. Shapes are checked by llm_fast.kernels."""
    cdef long m = a.shape[0], k = a.shape[1], n = b.shape[0]
    if m == 0 or n == 0:
        return
    with nogil:
        matmul_transb_raw(&c[0, 0], c.shape[1], &a[0, 0], k, &b[0, 0], k, m, n, k, alpha, beta)


def stream_read(const float[::1] x, int nthreads=0):
    """Sum of x read once, split into one contiguous range per thread (llm-fast bench uses it to
    measure the machine's memory read bandwidth). nthreads 0: the current OpenMP setting."""
    cdef long n = x.shape[0]
    cdef int nt = nthreads if nthreads > 0 else omp_get_max_threads()
    cdef double total = 0.0
    if n == 0:
        return 0.0
    with nogil:
        total = lf_stream_sum(&x[0], n, nt)
    return total
