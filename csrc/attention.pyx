"""Causal softmax and multi-head attention over a KV cache (grouped-query aware)."""
from cython.parallel cimport prange
from simd cimport lf_simd_level, lf_softmax_row, lf_attend_group, lf_attend_multi, omp_get_thread_num
from libc.string cimport memcpy


def softmax_causal(float[:, ::1] x, long seq):
    """In place over the last axis of x viewed as (..., seq, total): row i of each seq-block keeps
    columns 0 .. total - seq + i and the rest become 0 (the course's masked_softmax)."""
    cdef long rows = x.shape[0], total = x.shape[1], r
    with nogil:
        for r in range(rows):
            lf_softmax_row(&x[r, 0], total - seq + (r % seq) + 1, total)


def attention(float[:, ::1] out, const float[:, ::1] q, const float[:, ::1] k_cache,
              const float[:, ::1] v_cache, long past, long n_heads, long n_kv_heads,
              long head_dim, float[:, ::1] scratch):
    """out (seq, n_heads*head_dim) = softmax(q k^T * scale, causal) v, per query head.

    q: (seq, n_heads * head_dim), the queries of positions past .. past + seq - 1.
    k_cache, v_cache: (max_len, n_kv_heads * head_dim) holding rows [0, past + seq).
    Query head h reads KV head h // (n_heads / n_kv_heads). scale = 1 / sqrt(head_dim).
    scratch: (threads, >= past + seq) float32, per OpenMP thread. When its rows hold
    (n_heads / n_kv_heads) * (past + seq) floats, the query heads of a KV group are processed
    together (each key and value row loaded once for the group); the result is the same.
    """
    cdef long seq = q.shape[0], item, s, h0, b
    cdef long group = n_heads // n_kv_heads
    cdef long per = group if scratch.shape[1] >= group * (past + seq) else 1
    cdef long units = n_heads // per, n_items = seq * units
    cdef long kv_stride = k_cache.shape[1]
    cdef float scale = 1.0 / (<double>head_dim) ** 0.5
    cdef int level = lf_simd_level()
    cdef int tid
    cdef long npos = _positions_per_item(seq, per, past, head_dim, scratch.shape[1]), nblk
    if seq == 0:
        return
    if npos > 1:
        # prefill: blocks of npos positions x a KV group's query heads per work item, so each
        # key and value row is loaded once for npos * per query rows (same results)
        nblk = (seq + npos - 1) // npos
        with nogil:
            for item in prange(nblk * units, schedule="static", chunksize=1):
                b = item // units
                h0 = (item % units) * per
                _attend_block(level, q, out, k_cache, v_cache, b * npos,
                              min(npos, seq - b * npos), h0, per, group, past, head_dim, scale,
                              &scratch[omp_get_thread_num(), 0])
        return
    with nogil:
        if n_items * per * (past + seq) * head_dim < (1 << 14):
            for item in range(n_items):
                s = item // units
                h0 = (item % units) * per
                lf_attend_group(level, &q[s, h0 * head_dim], per,
                                &k_cache[0, (h0 // group) * head_dim],
                                &v_cache[0, (h0 // group) * head_dim], kv_stride, past + s + 1,
                                head_dim, scale, &scratch[0, 0], &out[s, h0 * head_dim])
        else:
            for item in prange(n_items, schedule="static"):
                s = item // units
                h0 = (item % units) * per
                tid = omp_get_thread_num()
                lf_attend_group(level, &q[s, h0 * head_dim], per,
                                &k_cache[0, (h0 // group) * head_dim],
                                &v_cache[0, (h0 // group) * head_dim], kv_stride, past + s + 1,
                                head_dim, scale, &scratch[tid, 0], &out[s, h0 * head_dim])


cdef long MAX_POSITIONS = 4   # query positions per prefill work item


cdef long _positions_per_item(long seq, long per, long past, long d, long room) noexcept nogil:
    """The most positions per work item (<= MAX_POSITIONS) whose scratch fits `room` floats:
    scores (n * (past + seq)) and the gathered query and output rows (2 * n * d), n = per * p."""
    cdef long p = MAX_POSITIONS if seq >= MAX_POSITIONS else seq
    while p > 1 and per * p * (past + seq + 2 * d) > room:
        p -= 1
    return p


cdef void _attend_block(int level, const float[:, ::1] q, float[:, ::1] out,
                        const float[:, ::1] k_cache, const float[:, ::1] v_cache, long s0,
                        long npos, long h0, long per, long group, long past, long d, float scale,
                        float *scratch) noexcept nogil:
    """Positions s0 .. s0 + npos - 1, query heads h0 .. h0 + per - 1 (one KV group)."""
    cdef long nq = npos * per, tmax = past + s0 + npos, p, h
    cdef float *scores = scratch
    cdef float *qbuf = scratch + nq * tmax
    cdef float *obuf = qbuf + nq * d
    for p in range(npos):
        memcpy(qbuf + p * per * d, &q[s0 + p, h0 * d], per * d * sizeof(float))
    lf_attend_multi(level, qbuf, per, npos, &k_cache[0, (h0 // group) * d],
                    &v_cache[0, (h0 // group) * d], k_cache.shape[1], past + s0 + 1, d, scale,
                    scores, obuf)
    for p in range(npos):
        memcpy(&out[s0 + p, h0 * d], obuf + p * per * d, per * d * sizeof(float))
