cdef void matmul_transb_raw(float *C, long ldc, const float *A, long lda, const float *B,
                            long ldb, long m, long n, long k, float alpha,
                            float beta) noexcept nogil
