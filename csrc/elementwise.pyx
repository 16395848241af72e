"""Row-wise kernels: rms_norm, fused SwiGLU, residual add."""
from cython.parallel cimport prange
from simd cimport lf_simd_level, lf_rms_norm_row, lf_swiglu_row

# Rows below which the kernels stay on one thread (a parallel region costs ~1-2 us).
cdef long PARALLEL_MIN_ELEMS = 1 << 15


def rms_norm(float[:, ::1] out, const float[:, ::1] x, const float[::1] w, float eps):
    """out[i] = w * x[i] / sqrt(mean(x[i]^2) + eps) for every row i."""
    cdef long rows = x.shape[0], n = x.shape[1], i
    cdef int level = lf_simd_level()
    if rows == 0 or n == 0:
        return
    with nogil:
        if rows * n < PARALLEL_MIN_ELEMS:
            for i in range(rows):
                lf_rms_norm_row(level, &out[i, 0], &x[i, 0], &w[0], n, eps)
        else:
            for i in prange(rows, schedule="static"):
                lf_rms_norm_row(level, &out[i, 0], &x[i, 0], &w[0], n, eps)


def swiglu(float[:, ::1] out, const float[:, ::1] gate_up):
    """out[i, j] = silu(gate_up[i, j]) * gate_up[i, d + j] with d = out.shape[1].

    gate_up is the output of the fused [gate_proj; up_proj] projection, shape (rows, 2 d).
    """
    cdef long rows = out.shape[0], d = out.shape[1], i
    cdef int level = lf_simd_level()
    if rows == 0 or d == 0:
        return
    with nogil:
        if rows * d < PARALLEL_MIN_ELEMS:
            for i in range(rows):
                lf_swiglu_row(level, &out[i, 0], &gate_up[i, 0], &gate_up[i, d], d)
        else:
            for i in prange(rows, schedule="static"):
                lf_swiglu_row(level, &out[i, 0], &gate_up[i, 0], &gate_up[i, d], d)


def silu_mul(float[:, ::1] y, const float[:, ::1] x):
    """The course's silu(y, x): y = silu(x) * y in place."""
    cdef long rows = y.shape[0], d = y.shape[1], i
    cdef int level = lf_simd_level()
    if rows == 0 or d == 0:
        return
    with nogil:
        for i in range(rows):
            lf_swiglu_row(level, &y[i, 0], &x[i, 0], &y[i, 0], d)


def add(float[:, ::1] y, const float[:, ::1] x):
    """y += x (residual add)."""
    cdef long rows = y.shape[0], d = y.shape[1], i, j
    with nogil:
        for i in range(rows):
            for j in range(d):
                y[i, j] += x[i, j]
