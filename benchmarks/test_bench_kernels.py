"""Kernel benchmarks at the real models' shapes, each next to its NumPy equivalent.

Run: python -m pytest benchmarks -q   (see benchmarks/README.md for the environment).
Shapes: weights are (out, in) as stored; 576/1536 are SmolLM2-135M, 768/2048/32000 the
llama2.c 110M shape. m=1 is a decode step (memory-bound: GB/s of weights), m=128 a prefill chunk
(compute-bound: GFLOP/s).
"""
from __future__ import annotations

import numpy as np
import pytest

from llm_fast import kernels
from llm_fast.memory import aligned_copy, aligned_zeros
from llm_fast.sampling import Sampler, SamplingParams

IMPLS = ["llm_fast", "numpy"]
MATMUL_SHAPES = [(576, 576), (1536, 576), (576, 1536), (768, 768), (2048, 768), (32000, 768)]


def _rand(shape, seed=0, scale=1.0):
    a = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    a *= np.float32(scale)
    return aligned_copy(a)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", [1, 128], ids=["decode_m1", "prefill_m128"])
@pytest.mark.parametrize("n,k", MATMUL_SHAPES, ids=[f"{n}x{k}" for n, k in MATMUL_SHAPES])
def test_matmul_transb(benchmark, record, impl, m, n, k):
    w = _rand((n, k), 1, 1 / np.sqrt(k))
    x = _rand((m, k), 2)
    out = aligned_zeros((m, n))
    if impl == "llm_fast":
        benchmark(kernels.raw.matmul_transb, out, 0.0, x, w, 1.0)
        np.testing.assert_allclose(out, x @ w.T, rtol=1e-4, atol=1e-4)
    else:
        wt = w.T
        benchmark(np.matmul, x, wt, out=out)
    record(f"matmul_transb m={m:<3d} W {n}x{k}", impl, flops=2.0 * m * n * k,
           nbytes=4.0 * n * k)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows,d", [(1, 576), (1, 768), (128, 576), (128, 768)])
def test_rms_norm(benchmark, record, impl, rows, d):
    x, w = _rand((rows, d), 3), _rand((d,), 4)
    out = aligned_zeros((rows, d))
    eps = 1e-5
    if impl == "llm_fast":
        benchmark(kernels.raw.rms_norm, out, x, w, eps)
    else:
        benchmark(lambda: np.multiply(w, x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps),
                                      out=out))
    record(f"rms_norm rows={rows} d={d}", impl, nbytes=2.0 * x.nbytes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows,d", [(1, 1536), (1, 2048), (128, 1536)])
def test_swiglu(benchmark, record, impl, rows, d):
    gu = _rand((rows, 2 * d), 5)
    out = aligned_zeros((rows, d))
    if impl == "llm_fast":
        benchmark(kernels.raw.swiglu, out, gu)
    else:
        def ref():
            g, u = gu[:, :d], gu[:, d:]
            np.multiply(g / (1 + np.exp(-g)), u, out=out)
        benchmark(ref)
    record(f"swiglu rows={rows} d={d}", impl, nbytes=3.0 * rows * d * 4)


ATTN_SHAPES = {"smollm2": (9, 3, 64), "110m": (12, 12, 64)}


def _numpy_attention(q, k, v, past, nh, nkv, hd):
    """The reference model's attention for seq query rows at positions past ... (float32)."""
    seq, total = q.shape[0], past + q.shape[0]
    qh = q.reshape(seq, nh, hd)
    keys = np.repeat(k[:total].reshape(total, nkv, hd), nh // nkv, axis=1)
    vals = np.repeat(v[:total].reshape(total, nkv, hd), nh // nkv, axis=1)
    scores = np.einsum("shd,thd->hst", qh, keys) / np.float32(np.sqrt(hd))
    mask = np.arange(total)[None, :] > (past + np.arange(seq))[:, None]
    scores = np.where(mask[None], -np.inf, scores)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return np.einsum("hst,thd->shd", probs, vals).reshape(seq, nh * hd)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ctx", [128, 512, 2048])
@pytest.mark.parametrize("model", list(ATTN_SHAPES))
def test_attention_decode(benchmark, record, impl, ctx, model):
    nh, nkv, hd = ATTN_SHAPES[model]
    past = ctx - 1
    q = _rand((1, nh * hd), 6)
    k, v = _rand((ctx, nkv * hd), 7), _rand((ctx, nkv * hd), 8)
    out = aligned_zeros((1, nh * hd))
    if impl == "llm_fast":
        scratch = aligned_zeros((kernels.get_num_threads(), (nh // nkv) * ctx))
        benchmark(kernels.raw.attention, out, q, k, v, past, nh, nkv, hd, scratch)
        np.testing.assert_allclose(out, _numpy_attention(q, k, v, past, nh, nkv, hd),
                                   rtol=1e-4, atol=1e-5)
    else:
        benchmark(_numpy_attention, q, k, v, past, nh, nkv, hd)
    record(f"attention decode {model} ({nh}/{nkv} heads, d {hd}) ctx={ctx}", impl,
           flops=4.0 * nh * ctx * hd, nbytes=2.0 * ctx * nkv * hd * 4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq", [128, 512])
def test_attention_prefill(benchmark, record, impl, seq):
    nh, nkv, hd = ATTN_SHAPES["smollm2"]
    q = _rand((seq, nh * hd), 9)
    k, v = _rand((seq, nkv * hd), 10), _rand((seq, nkv * hd), 11)
    out = aligned_zeros((seq, nh * hd))
    if impl == "llm_fast":
        scratch = aligned_zeros((kernels.get_num_threads(), (nh // nkv) * seq))
        benchmark(kernels.raw.attention, out, q, k, v, 0, nh, nkv, hd, scratch)
    else:
        benchmark(_numpy_attention, q, k, v, 0, nh, nkv, hd)
    # causal: about half of the seq x seq scores are computed
    record(f"attention prefill smollm2 seq={seq}", impl, flops=4.0 * nh * hd * seq * (seq + 1) / 2)


def _numpy_sample(logits, rng, temperature=0.8, top_k=40, top_p=0.95):
    """A plain NumPy top-k / top-p sampler: full sort of the vocabulary."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")[:top_k]
    p = np.exp(x[order] - x[order[0]])
    p /= p.sum()
    keep = max(1, int(np.searchsorted(np.cumsum(p), top_p)) + 1)
    p = p[:keep] / p[:keep].sum()
    return int(order[rng.choice(keep, p=p)])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["greedy", "topk40_topp0.95"])
@pytest.mark.parametrize("vocab", [32000, 49152])
def test_sampling(benchmark, record, impl, mode, vocab):
    logits = _rand((vocab,), 12, 3.0)
    if impl == "llm_fast":
        params = SamplingParams(temperature=0.0) if mode == "greedy" else \
            SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=0)
        benchmark(Sampler(params).sample, logits)
    else:
        rng = np.random.default_rng(0)
        if mode == "greedy":
            benchmark(lambda: int(np.argmax(logits)))
        else:
            benchmark(_numpy_sample, logits, rng)
    record(f"sampling {mode} vocab={vocab}", impl, nbytes=4.0 * vocab)
