"""Causal softmax and multi-head attention over a KV cache (grouped-query aware)."""
from cython.parallel cimport prange
from libc.string cimport memset
from simd cimport lf_simd_level, lf_gemm_colblock, lf_softmax_row, lf_axpy, omp_get_thread_num


def softmax_causal(float[:, ::1] x, long seq):
    """In place over the last axis of x viewed as (..., seq, total): row i of each seq-block keeps
    columns 0 .. total - seq + i and the rest become 0 (the course's masked_softmax)."""
    cdef long rows = x.shape[0], total = x.shape[1], r
    with nogil:
        for r in range(rows):
            lf_softmax_row(&x[r, 0], total - seq + (r % seq) + 1, total)


cdef void _attend_one(const float *q, const float *k_cache, const float *v_cache, long kv_stride,
                      long total, long head_dim, float scale, float *scores, float *out,
                      int level) noexcept nogil:
    # scores[j] = scale * q . k_j for j < total, in blocks of 4 keys (same reduction order as
    # the matmul tiles, so a row's scores do not depend on how many rows are processed).
    cdef long j
    for j in range(0, total, 4):
        lf_gemm_colblock(level, q, head_dim, k_cache + j * kv_stride, kv_stride, head_dim,
                         scores + j, total, 1, <int>min(4, total - j), scale, 0.0)
    lf_softmax_row(scores, total, total)
    memset(out, 0, head_dim * sizeof(float))
    for j in range(total):
        lf_axpy(level, out, scores[j], v_cache + j * kv_stride, head_dim)


def attention(float[:, ::1] out, const float[:, ::1] q, const float[:, ::1] k_cache,
              const float[:, ::1] v_cache, long past, long n_heads, long n_kv_heads,
              long head_dim, float[:, ::1] scratch):
    """out (seq, n_heads*head_dim) = softmax(q k^T * scale, causal) v, per query head.

    q: (seq, n_heads * head_dim), the queries of positions past .. past + seq - 1.
    k_cache, v_cache: (max_len, n_kv_heads * head_dim) holding rows [0, past + seq).
    Query head h reads KV head h // (n_heads / n_kv_heads). scale = 1 / sqrt(head_dim).
    scratch: (threads, >= past + seq) float32, one score row per OpenMP thread.
    """
    cdef long seq = q.shape[0], item, s, h, kvh
    cdef long n_items = seq * n_heads, group = n_heads // n_kv_heads
    cdef long kv_stride = k_cache.shape[1]
    cdef float scale = 1.0 / (<double>head_dim) ** 0.5
    cdef int level = lf_simd_level()
    cdef int tid
    if seq == 0:
        return
    with nogil:
        if n_items * (past + seq) * head_dim < (1 << 14):
            for item in range(n_items):
                s = item // n_heads
                h = item % n_heads
                kvh = h // group
                _attend_one(&q[s, h * head_dim], &k_cache[0, kvh * head_dim],
                            &v_cache[0, kvh * head_dim], kv_stride, past + s + 1, head_dim,
                            scale, &scratch[0, 0], &out[s, h * head_dim], level)
        else:
            for item in prange(n_items, schedule="static"):
                s = item // n_heads
                h = item % n_heads
                kvh = h // group
                tid = omp_get_thread_num()
                _attend_one(&q[s, h * head_dim], &k_cache[0, kvh * head_dim],
                            &v_cache[0, kvh * head_dim], kv_stride, past + s + 1, head_dim,
                            scale, &scratch[tid, 0], &out[s, h * head_dim], level)
