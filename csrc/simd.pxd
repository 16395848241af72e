# Declarations of the C helpers in simd.h and omp_shim.h, shared by the kernel modules.
cdef extern from "simd.h" nogil:
    int LF_SCALAR, LF_AVX2, LF_AVX512
    int lf_simd_level()
    void lf_gemm_colblock(int level, const float *A, long lda, const float *B, long ldb,
                          long k, float *C, long ldc, long m, int nr, float alpha, float beta)
    float lf_dot(int level, const float *a, const float *b, long k)
    void lf_axpy(int level, float *y, float a, const float *x, long n)
    void lf_rms_norm_row(int level, float *out, const float *x, const float *w, long n, float eps)
    void lf_softmax_row(float *x, long n, long total)
    void lf_rope_head(float *x, const float *cs, const float *sn, long d)
    float lf_silu(float g)
    double lf_stream_sum(const float *x, long n, int nthreads)
    void lf_swiglu_row(int level, float *out, const float *gate, const float *up, long n)
    void lf_attend_group(int level, const float *q, long nq, const float *k_cache,
                         const float *v_cache, long kv_stride, long total, long d, float scale,
                         float *scores, float *out)
    void lf_attend_multi(int level, const float *qbuf, long nh, long npos, const float *k_cache,
                         const float *v_cache, long kv_stride, long total0, long d, float scale,
                         float *scores, float *obuf)

cdef extern from "omp_shim.h" nogil:
    int omp_get_max_threads()
    void omp_set_num_threads(int n)
    int omp_get_thread_num()
    int lf_have_openmp()
