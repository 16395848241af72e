"""Process-wide kernel settings: OpenMP thread count and the SIMD level in use."""
from simd cimport lf_simd_level, omp_get_max_threads, omp_set_num_threads, lf_have_openmp

_LEVELS = {0: "scalar", 1: "avx2", 2: "avx512"}


def set_num_threads(int n):
    """Threads used by every parallel kernel called from this Python thread from now on (all
    modules share one OpenMP runtime; the setting is OpenMP's per-thread nthreads-var, so a new
    thread starts with the default — all cores — until it calls this too)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    omp_set_num_threads(n)


def get_num_threads():
    return omp_get_max_threads()


def simd_level():
    """'avx512', 'avx2' or 'scalar': the code path the kernels dispatch to on this CPU."""
    return _LEVELS[lf_simd_level()]


def have_openmp():
    return bool(lf_have_openmp())
