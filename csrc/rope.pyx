"""Rotary position embedding, the Hugging Face Llama "rotate half" form.

cos/sin tables have shape (max_positions, head_dim / 2) and are precomputed once per model
(llm_fast.rope_tables); position p of the sequence uses row p.
"""
from cython.parallel cimport prange
from libc.string cimport memcpy
from simd cimport lf_rope_head


def rope(float[:, ::1] x, long start_pos, const float[:, ::1] cos, const float[:, ::1] sin,
         long head_dim):
    """In place on x (seq, n_heads * head_dim); row s is at position start_pos + s."""
    cdef long seq = x.shape[0], width = x.shape[1], s, h
    cdef long nh = width // head_dim
    with nogil:
        for s in range(seq):
            for h in range(nh):
                lf_rope_head(&x[s, h * head_dim], &cos[start_pos + s, 0], &sin[start_pos + s, 0],
                             head_dim)


def qkv_split_rope(const float[:, ::1] qkv, float[:, ::1] q, float[:, ::1] k_cache,
                   float[:, ::1] v_cache, long start_pos, const float[:, ::1] cos,
                   const float[:, ::1] sin, long n_heads, long n_kv_heads, long head_dim):
    """Split the fused projection qkv (seq, (n_heads + 2 n_kv) * head_dim) into q (seq, n_heads *
    head_dim) and cache rows [start_pos, start_pos + seq) of k_cache / v_cache, applying RoPE to
    q and k. The cache stores K after RoPE."""
    cdef long seq = qkv.shape[0], s, h, pos
    cdef long qd = n_heads * head_dim, kvd = n_kv_heads * head_dim
    cdef long nthreads = 1 if seq < 4 else 0
    with nogil:
        if nthreads == 1:
            for s in range(seq):
                _split_row(qkv, q, k_cache, v_cache, s, start_pos + s, cos, sin, n_heads,
                           n_kv_heads, head_dim, qd, kvd)
        else:
            for s in prange(seq, schedule="static"):
                _split_row(qkv, q, k_cache, v_cache, s, start_pos + s, cos, sin, n_heads,
                           n_kv_heads, head_dim, qd, kvd)


cdef inline void _split_row(const float[:, ::1] qkv, float[:, ::1] q, float[:, ::1] k_cache,
                            float[:, ::1] v_cache, long s, long pos, const float[:, ::1] cos,
                            const float[:, ::1] sin, long n_heads, long n_kv_heads,
                            long head_dim, long qd, long kvd) noexcept nogil:
    cdef long h
    memcpy(&q[s, 0], &qkv[s, 0], qd * sizeof(float))
    memcpy(&k_cache[pos, 0], &qkv[s, qd], kvd * sizeof(float))
    memcpy(&v_cache[pos, 0], &qkv[s, qd + kvd], kvd * sizeof(float))
    for h in range(n_heads):
        lf_rope_head(&q[s, h * head_dim], &cos[pos, 0], &sin[pos, 0], head_dim)
    for h in range(n_kv_heads):
        lf_rope_head(&k_cache[pos, h * head_dim], &cos[pos, 0], &sin[pos, 0], head_dim)
