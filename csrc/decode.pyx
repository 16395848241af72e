"""The fused decode step (csrc/decode.h): one token through all layers in one nogil call.

A DecodePlan captures the weight pointers and owns the scratch once, when the model is built;
`step` then costs one Python call per token. Matrices may be float32 ndarrays or quantized
matrices (llm_fast.quant.QTensor, duck-typed: .qtype, .shape, .data uint8 rows, .activations);
`refresh_activations` re-reads the latter's activation modes.
"""
from libc.stdlib cimport malloc, free
cimport numpy as cnp
import numpy as np

cnp.import_array()

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC

# DecodePlan.step: seconds between tries of the thread count not in use
cdef double GAP_MIN = 0.002
cdef double GAP_MAX = 1.0
cdef int TRIAL = 3
# ... and never sooner than TRIAL_SPACING mean steps after the last trial: a trial of one thread
# costs up to (threads - 1) x a step where the memory bus needs all cores (a large model), so
# trials stay below ~3% of the steps.
cdef double TRIAL_SPACING = 100.0
# The first steps fault in pages and wake threads: they run on all threads and are not timed.
cdef int WARM_STEPS = 3
# Leave all threads for one only when one is SWITCH_BAR times faster: the usual case is a
# stalled step of milliseconds, while timing noise on a quiet machine is tens of percent.
cdef double SWITCH_BAR = 2.0


cdef inline double _bar(int mode) noexcept nogil:
    return SWITCH_BAR if mode == 1 else 1.0


cdef inline double _now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + 1e-9 * t.tv_nsec

cdef extern from "decode.h" nogil:
    ctypedef struct lf_mat:
        const void *w
        int qtype
        int mode
        long row_bytes
    ctypedef struct lf_xq:
        signed char *q
        float *f
        float *deq
        long qstride, nf
        const float *src
        int limbs
    ctypedef struct lf_layer:
        const float *input_layernorm
        lf_mat qkv_proj
        lf_mat o_proj
        const float *post_attention_layernorm
        lf_mat gate_up_proj
        lf_mat down_proj
        float *k_cache
        float *v_cache
    ctypedef struct lf_counter:
        pass
    ctypedef struct lf_decode_plan:
        long hidden, inter, n_layers, n_heads, n_kv_heads, head_dim, vocab
        float eps
        lf_mat embed
        const float *norm
        lf_mat lm_head
        const float *cos
        const float *sin
        lf_layer *layers
        float *x
        float *h
        float *qkv
        float *att
        float *act
        float *scores
        long score_stride
        lf_xq *xq
        int max_threads
        lf_counter *counters
        long n_phases
    long lf_decode_phases(long n_layers)
    long lfq_act_floats(long K)
    int LF_DEQ_ROWS
    void lf_decode_step(const lf_decode_plan *p, long token, long pos, float *logits,
                        int nthreads)


def _aligned_zeros(shape):
    """float32 zeros starting on a 64-byte boundary (full-width vector loads stay in one line)."""
    n = int(np.prod(shape))
    raw = np.zeros(n + 16, np.float32)
    off = ((-raw.ctypes.data) % 64) // 4
    return raw[off:off + n].reshape(shape)


cdef const float *_ptr(object a, tuple shape, str name) except NULL:
    cdef cnp.ndarray arr
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a float32 ndarray, got {type(a).__name__}")
    if a.dtype != np.float32 or not a.flags.c_contiguous or tuple(a.shape) != shape:
        raise ValueError(f"{name}: expected a C-contiguous float32 array of shape {shape}, got "
                         f"{a.dtype} {tuple(a.shape)}")
    arr = <cnp.ndarray>a
    return <const float *>cnp.PyArray_DATA(arr)


# quant.h's type codes and QTensor's activation modes (decode runs one row: "auto" is q8x2)
_QTYPE = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "f16": 3, "bf16": 4}
_ACT_MODE = {"q8": 0, "q8x2": 1, "auto": 1, "f32": 2}


cdef int _fill_mat(lf_mat *m, object a, tuple shape, str name) except -1:
    """Point m at a float32 ndarray or a quantized matrix of the given (rows, cols) shape."""
    cdef cnp.ndarray arr
    if isinstance(a, np.ndarray):
        m.w = _ptr(a, shape, name)
        m.qtype = -1
        m.mode = 0
        m.row_bytes = shape[1] * 4
        return 0
    qtype, data = getattr(a, "qtype", None), getattr(a, "data", None)
    if qtype not in _QTYPE or not isinstance(data, np.ndarray):
        raise TypeError(f"{name}: expected a float32 ndarray or a quantized matrix, got "
                        f"{type(a).__name__}")
    if tuple(a.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(a.shape)}")
    if data.dtype != np.uint8 or data.ndim != 2 or not data.flags.c_contiguous or data.shape[0] != shape[0]:
        raise ValueError(f"{name}: quantized data must be C-contiguous uint8 rows")
    arr = <cnp.ndarray>data
    m.w = cnp.PyArray_DATA(arr)
    m.qtype = _QTYPE[qtype]
    m.mode = _ACT_MODE[a.activations]
    m.row_bytes = data.shape[1]
    return 0


cdef inline void _refresh(lf_mat *m, object a):
    if m.qtype >= 0:
        m.mode = _ACT_MODE[a.activations]


cdef class DecodePlan:
    """Pointers to one model's float32 weights and the scratch of a decode step.

    weights: llm_fast.weights.Weights (all matrices float32 ndarrays); cos/sin: RoPE tables;
    max_len: the longest cache it will be used with; max_threads: the largest thread count.
    """
    cdef lf_decode_plan plan
    cdef object keep          # the arrays the pointers point into
    cdef object scratch
    cdef readonly long max_len
    cdef readonly long kv_dim
    cdef object bound_k       # the cache arrays whose pointers are in plan.layers
    cdef object bound_v
    # thread-count choice (see step): mean step time with one thread [0] and with all [1],
    # the mode in use, when the other mode was last tried, the wait before trying it again (s)
    cdef double mean[2]
    cdef double tried, gap, trial_best
    cdef readonly int mode
    cdef int trial_left, warm_left
    cdef readonly long single_steps
    cdef public bint adaptive     # False: always `nthreads` threads (tests of the thread count)

    def __cinit__(self):
        self.plan.layers = NULL
        self.plan.xq = NULL

    def __dealloc__(self):
        free(self.plan.layers)
        free(self.plan.xq)

    def __init__(self, config, weights, cos, sin, long max_len, int max_threads):
        c = config
        cdef long D = c.hidden_size, I = c.intermediate_size, qd = c.q_dim, kvd = c.kv_dim
        cdef long L = c.num_hidden_layers, l
        cdef lf_decode_plan *p = &self.plan
        self.max_len, self.kv_dim = max_len, kvd
        if max_threads < 1:
            max_threads = 1
        p.hidden, p.inter, p.n_layers = D, I, L
        p.n_heads, p.n_kv_heads, p.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        p.vocab, p.eps = c.vocab_size, c.rms_norm_eps
        _fill_mat(&p.embed, weights.embed_tokens, (c.vocab_size, D), "embed_tokens")
        _fill_mat(&p.lm_head, weights.lm_head, (c.vocab_size, D), "lm_head")
        p.norm = _ptr(weights.norm, (D,), "norm")
        p.cos = _ptr(cos, (cos.shape[0], c.head_dim // 2), "cos")
        p.sin = _ptr(sin, (cos.shape[0], c.head_dim // 2), "sin")
        if cos.shape[0] < max_len:
            raise ValueError(f"RoPE tables have {cos.shape[0]} rows, fewer than max_len {max_len}")
        p.layers = <lf_layer *>malloc(L * sizeof(lf_layer))
        if p.layers == NULL:
            raise MemoryError()
        keep = [weights.embed_tokens, weights.lm_head, weights.norm, cos, sin]
        for l in range(L):
            w = weights.layers[l]
            p.layers[l].input_layernorm = _ptr(w.input_layernorm, (D,), f"layer {l} input_layernorm")
            _fill_mat(&p.layers[l].qkv_proj, w.qkv_proj, (qd + 2 * kvd, D), f"layer {l} qkv_proj")
            _fill_mat(&p.layers[l].o_proj, w.o_proj, (D, qd), f"layer {l} o_proj")
            p.layers[l].post_attention_layernorm = _ptr(w.post_attention_layernorm, (D,),
                                                        f"layer {l} post_attention_layernorm")
            _fill_mat(&p.layers[l].gate_up_proj, w.gate_up_proj, (2 * I, D), f"layer {l} gate_up_proj")
            _fill_mat(&p.layers[l].down_proj, w.down_proj, (D, I), f"layer {l} down_proj")
            p.layers[l].k_cache = NULL
            p.layers[l].v_cache = NULL
            keep += [w.input_layernorm, w.qkv_proj, w.o_proj, w.post_attention_layernorm,
                     w.gate_up_proj, w.down_proj]
        self.keep = keep
        stride = max(max_len * (c.num_attention_heads // c.num_key_value_heads), I)
        stride = (stride + 15) // 16 * 16
        x = _aligned_zeros(D)
        h = _aligned_zeros((max_threads, D))
        qkv = _aligned_zeros(qd + 2 * kvd)
        att = _aligned_zeros(qd)
        act = _aligned_zeros(I)
        scores = _aligned_zeros((max_threads, stride))
        n_phases = lf_decode_phases(L)
        counters = _aligned_zeros((n_phases * (max_threads + 1) * 16,))  # 64-byte counters
        # per-thread quantized activations (two limbs) and dequantized rows ("f32" mode)
        cdef long kmax = max(D, qd, I), qstride = (kmax + 63) // 64 * 64, nf = lfq_act_floats(kmax)
        cdef long t
        xq_q = np.zeros((max_threads, 2 * qstride + 64), np.int8)
        xq_f = _aligned_zeros((max_threads, 2 * nf))
        xq_deq = _aligned_zeros((max_threads, LF_DEQ_ROWS * kmax))
        p.xq = <lf_xq *>malloc(max_threads * sizeof(lf_xq))
        if p.xq == NULL:
            raise MemoryError()
        cdef long qrow = 2 * qstride + 64, frow = 2 * nf
        cdef signed char *qbase = <signed char *>cnp.PyArray_DATA(<cnp.ndarray>xq_q)
        cdef float *fbase = <float *>cnp.PyArray_DATA(<cnp.ndarray>xq_f)
        cdef float *dbase = <float *>cnp.PyArray_DATA(<cnp.ndarray>xq_deq)
        for t in range(max_threads):
            p.xq[t].q = qbase + t * qrow
            p.xq[t].f = fbase + t * frow
            p.xq[t].deq = dbase + t * LF_DEQ_ROWS * kmax
            p.xq[t].qstride = qstride
            p.xq[t].nf = nf
            p.xq[t].src = NULL
            p.xq[t].limbs = 0
        self.scratch = (x, h, qkv, att, act, scores, counters, xq_q, xq_f, xq_deq)
        p.counters = <lf_counter *>cnp.PyArray_DATA(counters)
        p.n_phases = n_phases
        p.x = <float *>cnp.PyArray_DATA(x)
        p.h = <float *>cnp.PyArray_DATA(h)
        p.qkv = <float *>cnp.PyArray_DATA(qkv)
        p.att = <float *>cnp.PyArray_DATA(att)
        p.act = <float *>cnp.PyArray_DATA(act)
        p.scores = <float *>cnp.PyArray_DATA(scores)
        p.score_stride = stride
        p.max_threads = max_threads
        self.bound_k = None
        self.bound_v = None
        self.mean[0] = self.mean[1] = 0.0
        self.mode, self.tried, self.gap = 1, 0.0, GAP_MIN
        self.trial_left, self.trial_best = 0, 1e30
        self.warm_left = WARM_STEPS
        self.single_steps = 0
        self.adaptive = True

    cdef int _bind(self, list ks, list vs) except -1:
        cdef long l
        cdef tuple shape
        if len(ks) != self.plan.n_layers or len(vs) != self.plan.n_layers:
            raise ValueError("the cache was made for a different model")
        for l in range(self.plan.n_layers):
            shape = (ks[l].shape[0], self.kv_dim)
            if shape[0] > self.max_len:
                raise ValueError(f"cache of {shape[0]} positions exceeds the plan's {self.max_len}")
            self.plan.layers[l].k_cache = <float *>_ptr(ks[l], shape, "k_cache")
            self.plan.layers[l].v_cache = <float *>_ptr(vs[l], shape, "v_cache")
        self.bound_k, self.bound_v = tuple(ks), tuple(vs)
        return 0

    cdef bint _bound(self, list ks, list vs):
        cdef long l
        if self.bound_k is None or len(ks) != self.plan.n_layers or len(vs) != self.plan.n_layers:
            return False
        for l in range(self.plan.n_layers):
            if ks[l] is not (<tuple>self.bound_k)[l] or vs[l] is not (<tuple>self.bound_v)[l]:
                return False
        return True

    def refresh_activations(self, weights):
        """Re-read the activation modes of the quantized matrices (after QTensor.activations
        changed); the weights must be the ones the plan was built on."""
        cdef lf_decode_plan *p = &self.plan
        cdef long l
        _refresh(&p.embed, weights.embed_tokens)
        _refresh(&p.lm_head, weights.lm_head)
        for l in range(p.n_layers):
            w = weights.layers[l]
            _refresh(&p.layers[l].qkv_proj, w.qkv_proj)
            _refresh(&p.layers[l].o_proj, w.o_proj)
            _refresh(&p.layers[l].gate_up_proj, w.gate_up_proj)
            _refresh(&p.layers[l].down_proj, w.down_proj)

    def step(self, long token, list k_cache, list v_cache, long pos, float[::1] logits,
             int nthreads):
        """Decode `token` at position pos: writes cache rows pos of every layer and, when
        logits is not None, the (vocab,) logits. The caller checks token and pos.

        Thread count: a step shared by several threads waits for all of them, so when the OS
        deschedules one (other work on a busy machine) a 20 us step can take milliseconds.
        Each step therefore runs on `nthreads` threads, or on one while that is clearly faster
        (SWITCH_BAR x the running mean step time); the other choice is tried again (TRIAL
        steps, the first ones pay for waking idle threads: the fastest counts) after GAP_MIN
        seconds (and at least TRIAL_SPACING mean steps), the wait doubling (up to GAP_MAX) each
        time it loses. The logits never
        depend on it."""
        cdef float *out = NULL
        cdef double t0, dt
        cdef int m, nt
        if not self._bound(k_cache, v_cache):
            self._bind(k_cache, v_cache)
        if logits is not None:
            if logits.shape[0] != self.plan.vocab:
                raise ValueError(f"logits must have {self.plan.vocab} entries")
            out = &logits[0]
        m = self.mode
        if not self.adaptive or self.warm_left > 0:
            m = 1
        elif (nthreads > 1 and self.trial_left == 0 and self.mean[self.mode] > 0.0
              and _now() - self.tried >= max(self.gap, TRIAL_SPACING * self.mean[self.mode])):
            self.trial_left, self.trial_best = TRIAL, 1e30   # try the other choice
        if self.adaptive and self.trial_left > 0:
            m = 1 - self.mode
        nt = nthreads if m == 1 else 1
        with nogil:
            t0 = _now()
            lf_decode_step(&self.plan, token, pos, out, nt)
            dt = _now() - t0
        if nthreads <= 1 or not self.adaptive:
            return
        if self.warm_left > 0:
            self.warm_left -= 1
            return
        if m == 0:
            self.single_steps += 1
        if m == self.mode:
            self.mean[m] = dt if self.mean[m] == 0.0 else 0.75 * self.mean[m] + 0.25 * dt
            if self.mean[1 - m] > 0.0 and self.mean[m] > _bar(m) * self.mean[1 - m]:
                self.mode, self.tried, self.gap = 1 - m, t0, GAP_MIN  # the other one was better
            return
        self.trial_left -= 1
        self.trial_best = min(self.trial_best, dt)
        if self.trial_left > 0:
            return
        self.tried = t0
        self.mean[m] = self.trial_best
        if self.mean[self.mode] > _bar(self.mode) * self.trial_best:
            self.mode, self.gap = m, GAP_MIN
        else:
            self.gap = min(2 * self.gap, GAP_MAX)
