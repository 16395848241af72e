/* The fused decode step: one token (m = 1) through every layer and the classifier in a single
 * OpenMP parallel region, on weight pointers captured once when the model is built.
 *
 * It performs exactly the operations of the Python layer loop in llm_fast/model.py, with the
 * same kernels from simd.h in the same order for every output element, so its logits are
 * bit-identical to that loop's (tests/test_fused_decode.py checks it). What it saves is the
 * per-kernel cost: ~12 Python calls per layer (argument parsing, memoryview setup) and one
 * thread fork/join per kernel, replaced by one fork/join per token.
 *
 * Inside the region the token goes through a fixed sequence of phases (4 per layer and the
 * classifier). A phase is cut into chunks (blocks of output rows, or KV groups); thread t first
 * takes the chunks of its own static share, in order (each core keeps streaming the same weight
 * rows, which stay in its caches for small models), then takes whatever chunks of the other
 * shares are still unclaimed. A phase ends when all its chunks are done (a counter), not when
 * all threads arrive: a thread that the OS has descheduled (the machine is shared) holds up
 * nobody, its share is done by the others. Which thread computes a chunk never changes the
 * result: every output element is one dot product in a fixed order.
 */
#ifndef LLM_FAST_DECODE_H
#define LLM_FAST_DECODE_H

#include <sched.h>
#include <stdatomic.h>

#include "simd.h"
#include "omp_shim.h"
#include "quant.h"

/* A weight matrix: float32 rows (qtype < 0) or ggml rows of a quantized type (quant.h), with
 * the activation mode of QTensor ("q8" 0, two limbs "q8x2" 1, float "f32" 2). */
typedef struct {
    const void *w;
    int qtype;
    int mode;
    long row_bytes;
} lf_mat;

/* One thread's quantized copy of the input vector of the current phase (see lf_mv). */
typedef struct {
    int8_t *q;        /* 2 limbs x qstride int8 */
    float *f;         /* 2 limbs x nf floats */
    float *deq;       /* dequantized weight rows for "f32" mode (LF_DEQ_ROWS x K floats) */
    long qstride, nf;
    const float *src; /* the vector quantized now (NULL: none) */
    int limbs;
} lf_xq;

#define LF_DEQ_ROWS 8

typedef struct {
    const float *input_layernorm;          /* (hidden,) */
    lf_mat qkv_proj;                       /* (q_dim + 2 kv_dim, hidden) */
    lf_mat o_proj;                         /* (hidden, q_dim) */
    const float *post_attention_layernorm; /* (hidden,) */
    lf_mat gate_up_proj;                   /* (2 inter, hidden) */
    lf_mat down_proj;                      /* (hidden, inter) */
    float *k_cache, *v_cache;              /* (max_len, kv_dim) of the cache in use */
} lf_layer;

/* One counter per cache line (threads update them concurrently). */
typedef struct {
    atomic_long v;
    char pad[64 - sizeof(atomic_long)];
} lf_counter;

typedef struct {
    long hidden, inter, n_layers, n_heads, n_kv_heads, head_dim, vocab;
    float eps;
    lf_mat embed;          /* (vocab, hidden) */
    const float *norm;     /* (hidden,) */
    lf_mat lm_head;        /* (vocab, hidden) */
    const float *cos, *sin; /* (positions, head_dim / 2) */
    lf_layer *layers;
    /* scratch */
    float *x;       /* (hidden,) residual stream */
    float *h;       /* (threads, hidden) per-thread normed input */
    float *qkv;     /* (q_dim + 2 kv_dim,) */
    float *att;     /* (q_dim,) */
    float *act;     /* (inter,) */
    float *scores;  /* (threads, score_stride) */
    long score_stride;
    lf_xq *xq;      /* (threads,): quantized activations, when a matrix is block-quantized */
    int max_threads;
    /* (n_phases, max_threads + 1) counters: claimed chunks of each share, then chunks done */
    lf_counter *counters;
    long n_phases;
} lf_decode_plan;

/* Phases per layer: attention block (one phase when the KV groups are the chunks, else two:
 * q/k/v head blocks, then attention by query head), o_proj, gate_up + SwiGLU, down_proj. */
static inline long lf_decode_phases(long n_layers) { return 5 * n_layers + 1; }

/* Rows [r0, r1) of y = beta * y + W x, W (n, k) row-major. */
static inline void lf_matvec_rows(int level, const float *W, long k, const float *x, float *y,
                                  long r0, long r1, float beta) {
    for (long j = r0; j < r1; j += 4) {
        int nr = r1 - j < 4 ? (int)(r1 - j) : 4;
        lf_gemm_colblock(level, x, k, W + j * k, k, k, y + j, 4, 1, nr, 1.0f, beta);
    }
}

/* y[r] = beta * y[r] + dot(W row (row0 + r), x) for r in [r0, r1), any matrix type. For the
 * block-quantized types the thread quantizes x once per phase (xq->src caches which vector it
 * holds; the phase loops reset it), exactly as quant.pyx's matmul does for one row, and runs
 * the same row kernels: the outputs are bit-identical to the Python layer loop's. */
static inline void lf_mv(int level, const lf_mat *M, long k, const float *x, lf_xq *xq,
                         float *y, long row0, long r0, long r1, float beta) {
    if (r1 <= r0) return;
    if (M->qtype < 0) {
        const float *W = (const float *)M->w;
        lf_matvec_rows(level, W + row0 * k, k, x, y, r0, r1, beta);
        return;
    }
    const int ql = lfq_get_level();
    const uint8_t *w = (const uint8_t *)M->w + (row0 + r0) * M->row_bytes;
    if (M->qtype <= LFQ_Q4_1 && M->mode == 2) {
        /* float activations: the tile walk of quant.pyx (its output values do not depend on it) */
        for (long t = r0; t < r1; t += LF_DEQ_ROWS) {
            long nr = r1 - t < LF_DEQ_ROWS ? r1 - t : LF_DEQ_ROWS;
            lfq_rows_deq_gemm(M->qtype, ql, w + (t - r0) * M->row_bytes, M->row_bytes, nr, k, x, k,
                              1, y + t, 0, beta, xq->deq);
        }
        return;
    }
    lfq_act act;
    act.xf = x;
    act.xf_stride = k;
    act.q = NULL;
    act.f = NULL;
    act.q_stride = 0;
    act.f_stride = 0;
    act.limbs = 1;
    if (M->qtype <= LFQ_Q4_1) {
        const int limbs = M->mode == 1 ? 2 : 1;
        if (xq->src != x || xq->limbs < limbs) {
            lfq_quantize_fn qfn = lfq_quantize_kernel(ql);
            qfn(x, k, xq->q, xq->f);
            if (limbs == 2) lfq_second_limb(x, k, xq->q, xq->f, xq->q + xq->qstride);
            xq->src = x;
            xq->limbs = limbs;
        }
        act.q = xq->q;
        act.f = xq->f;
        act.q_stride = xq->qstride;
        act.f_stride = xq->nf;
        act.limbs = limbs;
    }
    lfq_rows_kernel_ex(M->qtype, ql, 0)(w, M->row_bytes, r1 - r0, k, &act, 1, y + r0, 0, beta);
}

/* The next unclaimed chunk of a phase of n chunks split into `parts` static shares, this
 * thread's (`me`) share first; -1 when every chunk is claimed. */
static inline long lf_claim(lf_counter *c, long n, int parts, int me) {
    for (int k = 0; k < parts; k++) {
        int u = (me + k) % parts;
        long lo = n * u / parts, len = n * (u + 1) / parts - lo;
        if (atomic_load_explicit(&c[u].v, memory_order_relaxed) >= len) continue;
        long off = atomic_fetch_add_explicit(&c[u].v, 1, memory_order_relaxed);
        if (off < len) return lo + off;
    }
    return -1;
}

static inline void lf_chunk_done(lf_counter *done) {
    atomic_fetch_add_explicit(&done->v, 1, memory_order_release);
}

/* Wait until all n chunks of a phase are done (their results are then visible). */
static inline void lf_phase_wait(lf_counter *done, long n) {
    long spins = 0;
    while (atomic_load_explicit(&done->v, memory_order_acquire) < n) {
#if LF_X86
        _mm_pause();
#endif
        if (++spins > 4000) { sched_yield(); spins = 0; }  /* let a descheduled peer run */
    }
}

/* Rows per chunk for a phase over n output rows: ~4 chunks per thread, a multiple of 4. */
static inline long lf_chunk_rows(long n, int parts) {
    long r = (n + 4 * parts - 1) / (4 * parts);
    r = (r + 3) / 4 * 4;
    return r < 16 ? 16 : r;
}

/* Run token `token` at position `pos` (cache rows [0, pos) filled) and write logits (vocab,)
 * if logits != NULL. The caches of p->layers must hold >= pos + 1 rows. */
static void lf_decode_step(const lf_decode_plan *p, long token, long pos, float *logits,
                           int nthreads) {
    const int level = lf_simd_level();
    const long D = p->hidden, inter = p->inter, hd = p->head_dim, half = hd / 2;
    const long nh = p->n_heads, nkv = p->n_kv_heads;
    const long qd = nh * hd, kvd = nkv * hd, group = nh / nkv;
    const float scale = (float)(1.0 / sqrt((double)hd));
    const long total = pos + 1;
    const float *cs = p->cos + pos * half, *sn = p->sin + pos * half;
    if (nthreads > p->max_threads) nthreads = p->max_threads;
    if (nthreads < 1) nthreads = 1;
    const int parts = nthreads;
    /* attention by KV group (q/k/v rows, RoPE, cache append and attention of a group in one
     * chunk, no synchronisation inside) when the groups split evenly over the threads */
    const int by_group = nkv % parts == 0;
    const long stride = p->max_threads + 1;
    const long rows_o = lf_chunk_rows(D, parts), rows_gu = lf_chunk_rows(inter, parts);
    const long rows_v = lf_chunk_rows(p->vocab, parts);
    const long n_o = (D + rows_o - 1) / rows_o, n_gu = (inter + rows_gu - 1) / rows_gu;
    const long n_v = (p->vocab + rows_v - 1) / rows_v;

    memset(p->counters, 0, (size_t)(p->n_phases * stride) * sizeof(lf_counter));
    if (p->embed.qtype < 0)
        memcpy(p->x, (const float *)p->embed.w + token * D, (size_t)D * sizeof(float));
    else
        lfq_dequant_row(p->embed.qtype, (const uint8_t *)p->embed.w + token * p->embed.row_bytes, D, p->x);

#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
        const int me = omp_get_thread_num();
        float *h = p->h + (long)me * D;
        lf_xq *xq = p->xq + me;
        float *scores = p->scores + (long)me * p->score_stride;
        lf_counter *ph = p->counters;
        long ch;
        int normed;
        for (long l = 0; l < p->n_layers; l++) {
            const lf_layer *w = &p->layers[l];
            float *kc = w->k_cache, *vc = w->v_cache;
            normed = 0;
            if (by_group) {
                /* chunk g: q heads of group g, its k and v rows, RoPE, cache append, attention */
                xq->src = NULL;   /* a new phase: a new input vector */
                while ((ch = lf_claim(ph, nkv, parts, me)) >= 0) {
                    if (!normed) { lf_rms_norm_row(level, h, p->x, w->input_layernorm, D, p->eps); normed = 1; }
                    long g = ch;
                    float *qg = p->qkv + g * group * hd;
                    float *krow = kc + pos * kvd + g * hd, *vrow = vc + pos * kvd + g * hd;
                    lf_mv(level, &w->qkv_proj, D, h, xq, p->qkv, 0, g * group * hd,
                          (g + 1) * group * hd, 0.0f);
                    lf_mv(level, &w->qkv_proj, D, h, xq, krow, qd + g * hd, 0, hd, 0.0f);
                    lf_mv(level, &w->qkv_proj, D, h, xq, vrow, qd + kvd + g * hd, 0, hd, 0.0f);
                    for (long i = 0; i < group; i++) lf_rope_head(qg + i * hd, cs, sn, hd);
                    lf_rope_head(krow, cs, sn, hd);
                    lf_attend_group(level, qg, group, kc + g * hd, vc + g * hd, kvd, total, hd,
                                    scale, scores, p->att + g * group * hd);
                    lf_chunk_done(&ph[stride - 1]);
                }
                lf_phase_wait(&ph[stride - 1], nkv);
                ph += 2 * stride;  /* the two-phase variant's slots stay unused */
            } else {
                /* chunk i: head block i of [q heads | k heads | v heads], RoPE, cache append */
                const long nblk = nh + 2 * nkv;
                xq->src = NULL;   /* a new phase: a new input vector */
                while ((ch = lf_claim(ph, nblk, parts, me)) >= 0) {
                    if (!normed) { lf_rms_norm_row(level, h, p->x, w->input_layernorm, D, p->eps); normed = 1; }
                    float *out = p->qkv + ch * hd;
                    lf_mv(level, &w->qkv_proj, D, h, xq, p->qkv, 0, ch * hd, (ch + 1) * hd, 0.0f);
                    if (ch < nh) {
                        lf_rope_head(out, cs, sn, hd);
                    } else if (ch < nh + nkv) {
                        float *krow = kc + pos * kvd + (ch - nh) * hd;
                        memcpy(krow, out, (size_t)hd * sizeof(float));
                        lf_rope_head(krow, cs, sn, hd);
                    } else {
                        memcpy(vc + pos * kvd + (ch - nh - nkv) * hd, out, (size_t)hd * sizeof(float));
                    }
                    lf_chunk_done(&ph[stride - 1]);
                }
                lf_phase_wait(&ph[stride - 1], nblk);
                ph += stride;
                /* chunk hh: attention of query head hh */
                xq->src = NULL;   /* a new phase: a new input vector */
                while ((ch = lf_claim(ph, nh, parts, me)) >= 0) {
                    lf_attend_group(level, p->qkv + ch * hd, 1, kc + (ch / group) * hd,
                                    vc + (ch / group) * hd, kvd, total, hd, scale, scores,
                                    p->att + ch * hd);
                    lf_chunk_done(&ph[stride - 1]);
                }
                lf_phase_wait(&ph[stride - 1], nh);
                ph += stride;
            }
            /* x += o_proj att */
            xq->src = NULL;   /* a new phase: a new input vector */
            while ((ch = lf_claim(ph, n_o, parts, me)) >= 0) {
                long r0 = ch * rows_o, r1 = r0 + rows_o < D ? r0 + rows_o : D;
                lf_mv(level, &w->o_proj, qd, p->att, xq, p->x, 0, r0, r1, 1.0f);
                lf_chunk_done(&ph[stride - 1]);
            }
            lf_phase_wait(&ph[stride - 1], n_o);
            ph += stride;
            /* act[j] = silu(gate_j . h) * (up_j . h), h = rms_norm(x); gate and up rows j in
             * the same chunk (up values go to this thread's scratch, >= inter floats) */
            normed = 0;
            xq->src = NULL;   /* a new phase: a new input vector */
            while ((ch = lf_claim(ph, n_gu, parts, me)) >= 0) {
                if (!normed) { lf_rms_norm_row(level, h, p->x, w->post_attention_layernorm, D, p->eps); normed = 1; }
                long r0 = ch * rows_gu, r1 = r0 + rows_gu < inter ? r0 + rows_gu : inter;
                lf_mv(level, &w->gate_up_proj, D, h, xq, p->act, 0, r0, r1, 0.0f);
                lf_mv(level, &w->gate_up_proj, D, h, xq, scores, inter, r0, r1, 0.0f);
                lf_swiglu_row(level, p->act + r0, p->act + r0, scores + r0, r1 - r0);
                lf_chunk_done(&ph[stride - 1]);
            }
            lf_phase_wait(&ph[stride - 1], n_gu);
            ph += stride;
            /* x += down_proj act */
            xq->src = NULL;   /* a new phase: a new input vector */
            while ((ch = lf_claim(ph, n_o, parts, me)) >= 0) {
                long r0 = ch * rows_o, r1 = r0 + rows_o < D ? r0 + rows_o : D;
                lf_mv(level, &w->down_proj, inter, p->act, xq, p->x, 0, r0, r1, 1.0f);
                lf_chunk_done(&ph[stride - 1]);
            }
            lf_phase_wait(&ph[stride - 1], n_o);
            ph += stride;
        }
        if (logits != NULL) {
            /* logits = lm_head rms_norm(x) */
            normed = 0;
            xq->src = NULL;   /* a new phase: a new input vector */
            while ((ch = lf_claim(ph, n_v, parts, me)) >= 0) {
                if (!normed) { lf_rms_norm_row(level, h, p->x, p->norm, D, p->eps); normed = 1; }
                long r0 = ch * rows_v, r1 = r0 + rows_v < p->vocab ? r0 + rows_v : p->vocab;
                lf_mv(level, &p->lm_head, D, h, xq, logits, 0, r0, r1, 0.0f);
                lf_chunk_done(&ph[stride - 1]);
            }
        }
    }
}

#endif /* LLM_FAST_DECODE_H */
