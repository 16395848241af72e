"""Every public kernel of llm_fast.kernels against a float64 NumPy reference written here.

- the learning-lm-rs course vectors (shared/reference/course_vectors.md), exactly as given, with
  the course tolerance |x - y| <= 1e-3 * (|x| + |y|) / 2 and a tighter float32 check;
- random inputs with odd sizes, alpha / beta variants (beta = 0 must not read c), grouped-query
  attention with past > 0 and seq > 1, head_dim 12 / 16 / 64;
- thread invariance (1 vs 2 OpenMP threads, bit for bit);
- every SIMD level (LLM_FAST_SIMD=scalar|avx2|avx512, one subprocess each) is accurate;
- input validation names the argument at fault.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import llm_fast
from llm_fast import kernels as K
from llm_fast.config import ModelConfig
from llm_fast.rope import rope_tables

REPO = Path(__file__).resolve().parents[1]


# --- helpers ---------------------------------------------------------------------------------

def course_close(got, want, rel=1e-3):
    """The course's check: |x - y| <= rel * (|x| + |y|) / 2 for every element."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    bad = np.abs(got - want) > rel * (np.abs(got) + np.abs(want)) / 2
    assert not bad.any(), f"course tolerance {rel} violated:\n got {got[bad]}\nwant {want[bad]}"


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (normalized error, as llama.cpp's test-backend-ops)."""
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def rnd(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@contextmanager
def threads(n):
    old = llm_fast.get_num_threads()
    llm_fast.set_num_threads(n)
    try:
        yield
    finally:
        llm_fast.set_num_threads(old)


def ref_rms_norm(x, w, eps):
    x = x.astype(np.float64)
    return w.astype(np.float64) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def ref_silu(x):
    x = np.asarray(x, np.float64)
    return x / (1.0 + np.exp(-x))


def ref_rope(x, positions, theta, head_dim):
    """Rotate-half RoPE in float64 (angles from float32 inverse frequencies, as transformers)."""
    x = x.astype(np.float64).reshape(x.shape[0], -1, head_dim)
    inv = (1.0 / np.power(np.float32(theta), np.arange(0, head_dim, 2, dtype=np.float32) /
                          np.float32(head_dim), dtype=np.float32)).astype(np.float32)
    ang = (np.asarray(positions, np.float32)[:, None] * inv[None, :]).astype(np.float64)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    h = head_dim // 2
    a, b = x[..., :h], x[..., h:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape[0], -1)


def ref_softmax_causal(x, seq):
    x = np.asarray(x, np.float64)
    total = x.shape[-1]
    rows = x.reshape(-1, seq, total)
    out = np.zeros_like(rows)
    for i in range(seq):
        keep = total - seq + i + 1
        r = rows[:, i, :keep]
        e = np.exp(r - r.max(axis=-1, keepdims=True))
        out[:, i, :keep] = e / e.sum(axis=-1, keepdims=True)
    return out.reshape(x.shape)


def ref_attention(q, k_cache, v_cache, past, n_heads, n_kv, head_dim):
    """Causal grouped-query attention in float64: query head h reads kv head h // (n_heads / n_kv)."""
    seq = q.shape[0]
    total = past + seq
    group = n_heads // n_kv
    q = q.astype(np.float64).reshape(seq, n_heads, head_dim)
    k = k_cache[:total].astype(np.float64).reshape(total, n_kv, head_dim)
    v = v_cache[:total].astype(np.float64).reshape(total, n_kv, head_dim)
    out = np.zeros((seq, n_heads, head_dim))
    for h in range(n_heads):
        kvh = h // group
        s = q[:, h] @ k[:, kvh].T / np.sqrt(head_dim)             # (seq, total)
        for i in range(seq):
            keep = past + i + 1
            e = np.exp(s[i, :keep] - s[i, :keep].max())
            out[i, h] = (e / e.sum()) @ v[:keep, kvh]
    return out.reshape(seq, n_heads * head_dim)


def tiny_config(head_dim=4, heads=1, theta=10000.0, max_pos=16):
    return ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": heads * head_dim,
        "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": heads,
        "num_key_value_heads": heads, "max_position_embeddings": max_pos,
        "rope_theta": theta, "rms_norm_eps": 1e-6})


# --- course vectors --------------------------------------------------------------------------

def test_course_silu():
    y = np.array([[2, 3, 4]], np.float32)
    x = np.array([[1, 2, 3]], np.float32)
    want = [[1.4621172, 5.2847824, 11.43089]]
    K.silu_mul(y, x)
    course_close(y, want)
    np.testing.assert_allclose(y, ref_silu(x) * np.array([[2, 3, 4]]), rtol=1e-6)
    np.testing.assert_allclose(y, want, rtol=1e-6)


def test_course_rms_norm():
    x = np.array([[1, 2], [3, 4]], np.float32)
    w = np.array([1, 2], np.float32)
    y = np.empty_like(x)
    K.rms_norm(y, x, w, 1e-6)
    want = [[0.6324554, 2.5298216], [0.8485281, 2.2627416]]
    course_close(y, want)
    np.testing.assert_allclose(y, want, rtol=1e-6)
    np.testing.assert_allclose(y, ref_rms_norm(x, w, 1e-6), rtol=1e-6)


def test_course_matmul_transb():
    c = np.array([[1, 2], [3, 4]], np.float32)
    a = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    K.matmul_transb(c, 1.0, a, a.copy(), 1.0)
    course_close(c, [[15, 34], [35, 81]])
    np.testing.assert_array_equal(c, [[15, 34], [35, 81]])  # small integers: exact in float32


def _course_mlp_inputs():
    residual = np.ones((4, 2), np.float32)
    w_up = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], np.float32)
    w_gate = w_up.copy()
    w_down = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], np.float32)
    rms_w = np.ones(2, np.float32)
    return residual, w_up, w_gate, w_down, rms_w


def _ref_mlp(residual, w_up, w_gate, w_down, rms_w, eps):
    h = ref_rms_norm(residual, rms_w, eps)
    gate, up = h @ w_gate.T.astype(np.float64), h @ w_up.T.astype(np.float64)
    return residual + (ref_silu(gate) * up) @ w_down.T.astype(np.float64)


@pytest.mark.parametrize("variant", ["silu_mul", "swiglu"])
def test_course_mlp(variant):
    residual, w_up, w_gate, w_down, rms_w = _course_mlp_inputs()
    eps = 1e-6
    ref = _ref_mlp(residual, w_up, w_gate, w_down, rms_w, eps)
    h = np.empty_like(residual)
    K.rms_norm(h, residual, rms_w, eps)
    if variant == "silu_mul":
        gate = np.empty((4, 3), np.float32)
        up = np.full((4, 3), np.nan, np.float32)  # beta = 0: never read
        K.matmul_transb(gate, 0.0, h, w_gate, 1.0)
        K.linear(up, h, w_up)
        K.silu_mul(up, gate)                        # up = silu(gate) * up
        act = up
    else:
        gate_up = np.empty((4, 6), np.float32)
        K.linear(gate_up, h, np.concatenate([w_gate, w_up]))
        act = np.empty((4, 3), np.float32)
        K.swiglu(act, gate_up)
    K.matmul_transb(residual, 1.0, act, w_down, 1.0)
    course_close(residual, np.tile([1.3429964, 1.7290739], (4, 1)))
    np.testing.assert_allclose(residual, ref, rtol=1e-6)


@pytest.mark.parametrize("start, want", [
    (0, [[1, 2, 3, 4], [-3.1887856, 5.9197016, 7.989471, 8.059599]]),
    (3, [[-1.4133525, 1.8791181, -2.8288574, 4.0581913], [2.0293994, 5.6752858, -8.359518, 8.233537]]),
])
def test_course_rope(start, want):
    cfg = tiny_config(head_dim=4, heads=1, theta=10000.0)
    cos, sin = rope_tables(cfg, cfg.max_position_embeddings)
    assert cos.shape == (16, 2) and cos.dtype == np.float32
    x = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
    ref = ref_rope(x, [start, start + 1], 10000.0, 4)
    K.rope(x, start, cos, sin, 4)
    course_close(x, want)
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)


def test_course_softmax_causal():
    x = np.array([[1, 2, 3], [1, 2, 3]], np.float32)
    K.softmax_causal(x, 2)
    want = [[0.26894142, 0.7310586, 0], [0.09003057, 0.24472847, 0.66524094]]
    course_close(x, want)
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=0)
    assert x[0, 2] == 0.0


# --- random inputs, odd sizes ----------------------------------------------------------------

MATMUL_SIZES = [  # (m, n, k)
    (1, 1, 1), (1, 3, 97), (3, 1, 101), (1, 101, 4097), (3, 97, 101), (97, 3, 1),
    (101, 97, 3), (5, 7, 16), (4, 4, 17), (2, 9, 4097), (97, 101, 64),
]


@pytest.mark.parametrize("m, n, k", MATMUL_SIZES)
def test_matmul_transb_random(m, n, k):
    rng = np.random.default_rng(m * 10007 + n * 101 + k)
    a, b = rnd(rng, m, k), rnd(rng, n, k)
    c = np.full((m, n), np.nan, np.float32)      # beta = 0 must not read c
    K.matmul_transb(c, 0.0, a, b, 1.0)
    ref = a.astype(np.float64) @ b.astype(np.float64).T
    assert np.isfinite(c).all()
    assert rel_err(c, ref) <= 1e-5, rel_err(c, ref)
    course_close(c[np.abs(ref) > 1e-2], ref[np.abs(ref) > 1e-2])


@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.5, 1.0), (-2.0, 0.25), (1.0, -1.0), (0.0, 3.0), (2.0, 0.0)])
@pytest.mark.parametrize("m, n, k", [(1, 101, 97), (7, 13, 4097), (97, 5, 3)])
def test_matmul_transb_alpha_beta(alpha, beta, m, n, k):
    rng = np.random.default_rng(1234 + m + n + k)
    a, b, c0 = rnd(rng, m, k), rnd(rng, n, k), rnd(rng, m, n)
    c = c0.copy() if beta != 0.0 else np.full((m, n), np.nan, np.float32)
    out = K.matmul_transb(c, beta, a, b, alpha)
    assert out is c
    ref = (beta * c0.astype(np.float64) if beta != 0.0 else 0.0) + \
        alpha * (a.astype(np.float64) @ b.astype(np.float64).T)
    assert np.isfinite(c).all()
    np.testing.assert_allclose(c, ref, rtol=1e-4, atol=1e-5 * max(np.abs(ref).max(), 1.0))


@pytest.mark.parametrize("m, n, k", [(130, 203, 1536), (300, 77, 3073), (41, 1030, 3200)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_matmul_transb_large_prefill_rows_equal_matrix_vector(m, n, k, beta):
    """Prefill-sized activations (more than an L2 share): every output is one dot product in a
    fixed order, so each row equals the m = 1 (matrix-vector) result bit for bit, and the
    whole matches float64."""
    rng = np.random.default_rng(m + n + k)
    a, b, c0 = rnd(rng, m, k), rnd(rng, n, k), rnd(rng, m, n)
    assert m * k * 4 > 512 * 1024
    c = c0.copy() if beta else np.full((m, n), np.nan, np.float32)
    K.matmul_transb(c, beta, a, b, 0.5)
    for i in (0, m // 2, m - 1):
        row = c0[i:i + 1].copy() if beta else np.empty((1, n), np.float32)
        K.matmul_transb(row, beta, a[i:i + 1], b, 0.5)
        np.testing.assert_array_equal(row[0], c[i])
    ref = beta * c0.astype(np.float64) + 0.5 * (a.astype(np.float64) @ b.astype(np.float64).T)
    np.testing.assert_allclose(c, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_matmul_transb_nan_c_beta0_large():
    """beta = 0 with NaN (and inf) in c through the parallel path: c is write-only."""
    rng = np.random.default_rng(7)
    a, b = rnd(rng, 33, 257), rnd(rng, 129, 257)
    c = np.full((33, 129), np.nan, np.float32)
    c[::2] = np.inf
    K.matmul_transb(c, 0.0, a, b, 1.5)
    assert rel_err(c, 1.5 * (a.astype(np.float64) @ b.astype(np.float64).T)) <= 1e-5


def test_matmul_transb_empty_dimensions():
    """k = 0: c = beta * c (the empty dot product is 0); m = 0 or n = 0: nothing to do."""
    a, b = np.zeros((3, 0), np.float32), np.zeros((4, 0), np.float32)
    c = np.full((3, 4), np.nan, np.float32)
    K.matmul_transb(c, 0.0, a, b, 1.0)
    np.testing.assert_array_equal(c, np.zeros((3, 4)))
    c = np.full((3, 4), 2.0, np.float32)
    K.matmul_transb(c, 0.5, a, b, 1.0)
    np.testing.assert_array_equal(c, np.ones((3, 4)))
    K.matmul_transb(np.zeros((0, 4), np.float32), 0.0, np.zeros((0, 5), np.float32), np.ones((4, 5), np.float32), 1.0)
    K.matmul_transb(np.zeros((3, 0), np.float32), 0.0, np.ones((3, 5), np.float32), np.zeros((0, 5), np.float32), 1.0)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_linear(beta):
    rng = np.random.default_rng(3)
    x, w, out0 = rnd(rng, 5, 97), rnd(rng, 101, 97), rnd(rng, 5, 101)
    out = out0.copy() if beta else np.full((5, 101), np.nan, np.float32)
    assert K.linear(out, x, w, beta) is out
    ref = beta * out0.astype(np.float64) + x.astype(np.float64) @ w.astype(np.float64).T
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("rows, n", [(1, 1), (1, 97), (3, 101), (101, 4097), (7, 16), (300, 257)])
def test_rms_norm_random(rows, n):
    rng = np.random.default_rng(rows * 7 + n)
    x, w = rnd(rng, rows, n, scale=3.0), rnd(rng, n)
    out = np.full_like(x, np.nan)
    for eps in (1e-6, 1e-5):
        K.rms_norm(out, x, w, eps)
        np.testing.assert_allclose(out, ref_rms_norm(x, w, eps), rtol=2e-5, atol=1e-6)


def test_rms_norm_in_place_and_eps_zero():
    rng = np.random.default_rng(1)
    x, w = rnd(rng, 3, 97), rnd(rng, 97)
    ref = ref_rms_norm(x, w, 0.0)
    K.rms_norm(x, x, w, 0.0)  # out aliases x
    np.testing.assert_allclose(x, ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("rows, d", [(1, 1), (1, 97), (3, 101), (101, 257), (2, 4097)])
def test_swiglu_and_silu_mul_random(rows, d):
    rng = np.random.default_rng(rows + d)
    gate_up = rnd(rng, rows, 2 * d, scale=4.0)
    out = np.full((rows, d), np.nan, np.float32)
    K.swiglu(out, gate_up)
    ref = ref_silu(gate_up[:, :d]) * gate_up[:, d:].astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    y = np.ascontiguousarray(gate_up[:, d:])
    K.silu_mul(y, np.ascontiguousarray(gate_up[:, :d]))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_silu_extremes():
    x = np.array([[-100.0, -20.0, 0.0, 20.0, 100.0, -1e-8]], np.float32)
    y = np.ones_like(x)
    K.silu_mul(y, x)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref_silu(x), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("rows, n", [(1, 1), (3, 97), (101, 4097)])
def test_add_random(rows, n):
    rng = np.random.default_rng(n)
    y, x = rnd(rng, rows, n), rnd(rng, rows, n)
    ref = y.astype(np.float64) + x
    assert K.add(y, x) is y
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("head_dim, heads, start, seq", [
    (12, 3, 0, 5), (16, 8, 7, 1), (64, 2, 100, 9), (2, 1, 0, 3), (128, 1, 4000, 3)])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_random(head_dim, heads, start, seq, theta):
    cfg = tiny_config(head_dim=head_dim, heads=heads, theta=theta, max_pos=4096)
    cos, sin = rope_tables(cfg, cfg.max_position_embeddings)
    rng = np.random.default_rng(head_dim + start)
    x = rnd(rng, seq, heads * head_dim)
    ref = ref_rope(x, np.arange(start, start + seq), theta, head_dim)
    K.rope(x, start, cos, sin, head_dim)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=2e-6)


def test_rope_tables_match_definition():
    """cos/sin rows of rope_tables are angle = pos / theta^(2i/d) (float32 inverse frequency)."""
    cfg = tiny_config(head_dim=16, heads=1, theta=10000.0, max_pos=64)
    cos, sin = rope_tables(cfg, 64)
    pos = np.arange(64)[:, None].astype(np.float64)
    ang = pos / 10000.0 ** (np.arange(0, 16, 2) / 16.0)
    np.testing.assert_allclose(cos, np.cos(ang), atol=2e-5)
    np.testing.assert_allclose(sin, np.sin(ang), atol=2e-5)


@pytest.mark.parametrize("shape, seq", [((1, 1), 1), ((3, 97), 3), ((5, 101), 5), ((2, 4, 7, 33), 7), ((1, 4097), 1), ((3, 2, 6), 2)])
def test_softmax_causal_random(shape, seq):
    rng = np.random.default_rng(sum(shape))
    x = rnd(rng, *shape, scale=5.0)
    ref = ref_softmax_causal(x, seq)
    out = K.softmax_causal(x, seq)
    assert out is x
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-7)
    assert (x[..., :, :][ref == 0] == 0).all()


def test_softmax_causal_large_logits():
    x = np.array([[1000.0, 999.0, -1000.0]], np.float32)
    K.softmax_causal(x, 1)
    np.testing.assert_allclose(x, ref_softmax_causal([[1000.0, 999.0, -1000.0]], 1), rtol=1e-6)


ATTENTION_CASES = [  # (n_heads, n_kv, head_dim, past, seq)
    (1, 1, 16, 0, 1),
    (4, 4, 16, 0, 5),       # MHA prefill
    (8, 2, 16, 13, 3),      # GQA 4, past > 0, seq > 1
    (6, 2, 12, 5, 7),       # GQA 3, head_dim 12
    (6, 3, 12, 0, 1),
    (4, 1, 64, 20, 4),      # MQA, head_dim 64
    (8, 4, 64, 31, 9),      # large enough for the parallel path
    (2, 1, 64, 100, 1),     # decode
]


@pytest.mark.parametrize("n_heads, n_kv, head_dim, past, seq", ATTENTION_CASES)
def test_attention_random(n_heads, n_kv, head_dim, past, seq):
    rng = np.random.default_rng(n_heads * 1000 + head_dim * 10 + past + seq)
    max_len = past + seq + 11
    q = rnd(rng, seq, n_heads * head_dim, scale=2.0)
    k_cache = rnd(rng, max_len, n_kv * head_dim, scale=2.0)
    v_cache = rnd(rng, max_len, n_kv * head_dim)
    k_cache[past + seq:] = np.nan                 # rows beyond past + seq must not be read
    v_cache[past + seq:] = np.nan
    out = np.full_like(q, np.nan)
    assert K.attention(out, q, k_cache, v_cache, past, n_heads, n_kv, head_dim) is out
    ref = ref_attention(q, k_cache, v_cache, past, n_heads, n_kv, head_dim)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)
    # with a caller-provided scratch buffer (bigger than needed): identical
    scratch = np.full((llm_fast.get_num_threads() + 1, max_len + 5), np.nan, np.float32)
    out2 = np.empty_like(q)
    K.attention(out2, q, k_cache, v_cache, past, n_heads, n_kv, head_dim, scratch=scratch)
    np.testing.assert_array_equal(out, out2)


def test_attention_head_mapping():
    """Query head h reads KV head h // (n_heads / n_kv): consecutive heads share, not interleave."""
    n_heads, n_kv, hd, seq = 4, 2, 16, 1
    rng = np.random.default_rng(0)
    q = rnd(rng, seq, n_heads * hd)
    k = rnd(rng, 3, n_kv * hd)
    v = np.zeros((3, n_kv * hd), np.float32)
    v[:, :hd] = 1.0      # kv head 0 -> every output component 1
    v[:, hd:] = -1.0     # kv head 1 -> -1
    out = np.empty_like(q)
    K.attention(out, q, k, v, 2, n_heads, n_kv, hd)
    np.testing.assert_allclose(out.reshape(n_heads, hd), [[1] * hd, [1] * hd, [-1] * hd, [-1] * hd], rtol=1e-6)


def test_attention_seq_gt1_equals_rows_one_by_one():
    """Row s of a multi-row call == a single-row call at past + s (bit for bit)."""
    n_heads, n_kv, hd, past, seq = 8, 2, 16, 6, 5
    rng = np.random.default_rng(5)
    q = rnd(rng, seq, n_heads * hd)
    k, v = rnd(rng, 20, n_kv * hd), rnd(rng, 20, n_kv * hd)
    out = np.empty_like(q)
    K.attention(out, q, k, v, past, n_heads, n_kv, hd)
    for s in range(seq):
        row = np.empty((1, n_heads * hd), np.float32)
        K.attention(row, np.ascontiguousarray(q[s:s + 1]), k, v, past + s, n_heads, n_kv, hd)
        np.testing.assert_array_equal(row[0], out[s])


# --- thread invariance -----------------------------------------------------------------------

def _twice(fn):
    with threads(1):
        one = fn()
    with threads(2):
        two = fn()
    return one, two


def test_threads_matmul_transb():
    rng = np.random.default_rng(11)
    a, b = rnd(rng, 64, 4097), rnd(rng, 257, 4097)

    def run():
        c = np.full((64, 257), np.nan, np.float32)
        return K.matmul_transb(c, 0.0, a, b, 1.0)
    one, two = _twice(run)
    np.testing.assert_array_equal(one, two)
    # m = 1 (decode, parallel over weight rows)
    a1 = np.ascontiguousarray(a[:1])
    one, two = _twice(lambda: K.matmul_transb(np.empty((1, 257), np.float32), 0.0, a1, b, 1.0))
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one[0], run()[0])  # a row does not depend on m


def test_threads_attention():
    n_heads, n_kv, hd, past, seq = 8, 2, 64, 40, 9
    rng = np.random.default_rng(12)
    q = rnd(rng, seq, n_heads * hd)
    k, v = rnd(rng, past + seq, n_kv * hd), rnd(rng, past + seq, n_kv * hd)
    one, two = _twice(lambda: K.attention(np.empty_like(q), q, k, v, past, n_heads, n_kv, hd))
    np.testing.assert_array_equal(one, two)


def test_threads_rms_norm_and_swiglu():
    rng = np.random.default_rng(13)
    x, w = rnd(rng, 301, 257), rnd(rng, 257)
    one, two = _twice(lambda: K.rms_norm(np.empty_like(x), x, w, 1e-5))
    np.testing.assert_array_equal(one, two)
    gu = rnd(rng, 301, 2 * 257)
    one, two = _twice(lambda: K.swiglu(np.empty((301, 257), np.float32), gu))
    np.testing.assert_array_equal(one, two)


def test_set_num_threads_rejects_zero():
    with pytest.raises(ValueError, match="threads"):
        llm_fast.set_num_threads(0)


# --- SIMD dispatch: every level in its own process ---------------------------------------------

_SIMD_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import llm_fast
    from llm_fast import kernels as K
    import hashlib
    rng = np.random.default_rng(2024)
    errs = {}
    digest = hashlib.sha256()
    for m, n, k in [(1, 37, 4097), (5, 33, 1001), (7, 9, 15), (4, 4, 16), (3, 17, 97)]:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((n, k)).astype(np.float32)
        c = np.full((m, n), np.nan, np.float32)
        K.matmul_transb(c, 0.0, a, b, 1.0)
        ref = a.astype(np.float64) @ b.astype(np.float64).T
        errs[f"matmul {m}x{n}x{k}"] = float(np.abs(c - ref).max() / np.abs(ref).max())
        digest.update(c.tobytes())
    for nh, nkv, hd, past, seq in [(8, 2, 64, 30, 5), (6, 2, 12, 3, 2), (4, 4, 16, 0, 1)]:
        total = past + seq
        q = rng.standard_normal((seq, nh * hd)).astype(np.float32)
        kc = rng.standard_normal((total, nkv * hd)).astype(np.float32)
        vc = rng.standard_normal((total, nkv * hd)).astype(np.float32)
        out = np.empty_like(q)
        K.attention(out, q, kc, vc, past, nh, nkv, hd)
        g = nh // nkv
        qq = q.astype(np.float64).reshape(seq, nh, hd)
        kk = kc.astype(np.float64).reshape(total, nkv, hd)
        vv = vc.astype(np.float64).reshape(total, nkv, hd)
        ref = np.zeros((seq, nh, hd))
        for h in range(nh):
            s = qq[:, h] @ kk[:, h // g].T / np.sqrt(hd)
            for i in range(seq):
                e = np.exp(s[i, :past + i + 1] - s[i, :past + i + 1].max())
                ref[i, h] = e / e.sum() @ vv[:past + i + 1, h // g]
        errs[f"attention {nh}/{nkv}x{hd} past {past} seq {seq}"] = float(
            np.abs(out.reshape(seq, nh, hd) - ref).max() / np.abs(ref).max())
    x = rng.standard_normal((3, 1001)).astype(np.float32)
    w = rng.standard_normal(1001).astype(np.float32)
    y = np.empty_like(x)
    K.rms_norm(y, x, w, 1e-6)
    x64 = x.astype(np.float64)
    ref = w * x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + 1e-6)
    errs["rms_norm 3x1001"] = float(np.abs(y - ref).max() / np.abs(ref).max())
    print(json.dumps({"level": llm_fast.simd_level(), "errors": errs, "digest": digest.hexdigest()}))
""")

_LEVELS = ["scalar", "avx2", "avx512"]


def _cpu_max_level() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "unknown"
    if "avx512f" in flags and "avx2" in flags and "fma" in flags:
        return "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return "scalar"


_SIMD_REPORTS: dict = {}


def _simd_report(level) -> dict:
    """Run _SIMD_SCRIPT in a fresh process with LLM_FAST_SIMD=level (memoized)."""
    if level not in _SIMD_REPORTS:
        env = dict(os.environ, LLM_FAST_SIMD=level)
        res = subprocess.run([sys.executable, "-c", _SIMD_SCRIPT], env=env, cwd=str(REPO),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        _SIMD_REPORTS[level] = json.loads(res.stdout.strip().splitlines()[-1])
    return _SIMD_REPORTS[level]


@pytest.mark.parametrize("level", _LEVELS)
def test_simd_level_accuracy(level):
    cpu = _cpu_max_level()
    if cpu == "unknown":
        pytest.skip("cannot read /proc/cpuinfo")
    if _LEVELS.index(level) > _LEVELS.index(cpu):
        pytest.skip(f"the CPU lacks {level} (best: {cpu})")
    report = _simd_report(level)
    got = report["level"]
    assert got in _LEVELS
    assert _LEVELS.index(got) <= _LEVELS.index(level), f"asked for {level}, got {got}"
    assert got == level, f"the CPU supports {level} but the kernels report {got}"
    bad = {k: v for k, v in report["errors"].items() if not v <= 1e-5}
    assert not bad, f"{level}: normalized errors above 1e-5: {bad}"


def test_simd_levels_really_dispatch():
    """The levels give (slightly) different float results: the compiled kernels, not only
    simd_level(), follow LLM_FAST_SIMD."""
    cpu = _cpu_max_level()
    if cpu in ("unknown", "scalar"):
        pytest.skip("only one SIMD level on this CPU")
    digests = {lvl: _simd_report(lvl)["digest"] for lvl in _LEVELS[:_LEVELS.index(cpu) + 1]}
    assert len(set(digests.values())) == len(digests), digests


def test_simd_default_is_best_available():
    env = {k: v for k, v in os.environ.items() if k != "LLM_FAST_SIMD"}
    res = subprocess.run([sys.executable, "-c", "import llm_fast; print(llm_fast.simd_level())"],
                         env=env, cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    cpu = _cpu_max_level()
    if cpu != "unknown":
        assert res.stdout.strip() == cpu


# --- input validation ------------------------------------------------------------------------

def _f32(*shape):
    return np.zeros(shape, np.float32)


def _raises(exc, name, fn, *args, **kw):
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    assert name in str(info.value), f"message {str(info.value)!r} does not name {name!r}"


def test_validation_matmul_transb():
    a, b, c = _f32(2, 3), _f32(4, 3), _f32(2, 4)
    _raises(TypeError, "a", K.matmul_transb, c, 0.0, a.astype(np.float64), b, 1.0)
    _raises(TypeError, "b", K.matmul_transb, c, 0.0, a, b.astype(np.float16), 1.0)
    _raises(TypeError, "c", K.matmul_transb, c.astype(np.float64), 0.0, a, b, 1.0)
    _raises(TypeError, "a", K.matmul_transb, c, 0.0, a.tolist(), b, 1.0)
    _raises(ValueError, "a", K.matmul_transb, c, 0.0, _f32(3, 2).T, b, 1.0)   # non-contiguous
    _raises(ValueError, "b", K.matmul_transb, c, 0.0, a, _f32(4, 6)[:, ::2], 1.0)
    _raises(ValueError, "c", K.matmul_transb, _f32(4, 2).T, 0.0, a, b, 1.0)
    _raises(ValueError, "b (4, 5)", K.matmul_transb, c, 0.0, a, _f32(4, 5), 1.0)  # k mismatch
    _raises(ValueError, "c (2, 5)", K.matmul_transb, _f32(2, 5), 0.0, a, b, 1.0)
    _raises(ValueError, "a", K.matmul_transb, c, 0.0, _f32(6), b, 1.0)            # 1-D
    ro = _f32(2, 4)
    ro.flags.writeable = False
    _raises(ValueError, "c", K.matmul_transb, ro, 0.0, a, b, 1.0)


def test_validation_rms_norm_swiglu_silu_add():
    x, w = _f32(2, 8), _f32(8)
    _raises(TypeError, "x", K.rms_norm, _f32(2, 8), x.astype(np.float64), w, 1e-6)
    _raises(TypeError, "w", K.rms_norm, _f32(2, 8), x, w.astype(np.float64), 1e-6)
    _raises(ValueError, "w", K.rms_norm, _f32(2, 8), x, _f32(7), 1e-6)
    _raises(ValueError, "out", K.rms_norm, _f32(3, 8), x, w, 1e-6)
    _raises(ValueError, "x", K.rms_norm, _f32(2, 8), _f32(8, 2).T, w, 1e-6)
    _raises(ValueError, "eps", K.rms_norm, _f32(2, 8), x, w, -1.0)
    _raises(ValueError, "eps", K.rms_norm, _f32(2, 8), x, w, float("nan"))
    _raises(ValueError, "gate_up", K.swiglu, _f32(2, 4), _f32(2, 7))
    _raises(TypeError, "gate_up", K.swiglu, _f32(2, 4), np.zeros((2, 8)))
    _raises(ValueError, "out", K.swiglu, _f32(8, 2).T, _f32(2, 16))
    _raises(ValueError, "x", K.silu_mul, _f32(2, 4), _f32(2, 5))
    _raises(TypeError, "y", K.silu_mul, np.zeros((2, 4), np.int32), _f32(2, 4))
    _raises(ValueError, "y", K.add, _f32(2, 4), _f32(4, 2))
    _raises(ValueError, "x", K.add, _f32(2, 4), _f32(4, 2).T)


def test_validation_rope_softmax():
    cos = sin = _f32(16, 2)
    _raises(ValueError, "head_dim", K.rope, _f32(2, 8), 0, cos, sin, 3)
    _raises(ValueError, "head_dim", K.rope, _f32(2, 6), 0, cos, sin, 4)
    _raises(ValueError, "cos", K.rope, _f32(2, 8), 0, _f32(16, 3), _f32(16, 3), 4)
    _raises(ValueError, "positions", K.rope, _f32(2, 8), 15, cos, sin, 4)
    _raises(ValueError, "positions", K.rope, _f32(2, 8), -1, cos, sin, 4)
    _raises(TypeError, "sin", K.rope, _f32(2, 8), 0, cos, np.zeros((16, 2)), 4)
    _raises(ValueError, "x", K.rope, _f32(8, 2).T, 0, cos, sin, 4)
    _raises(ValueError, "seq", K.softmax_causal, _f32(2, 3), 3)
    _raises(ValueError, "seq", K.softmax_causal, _f32(4, 3), 2)
    _raises(ValueError, "x", K.softmax_causal, _f32(3), 1)
    _raises(TypeError, "x", K.softmax_causal, np.zeros((2, 3)), 2)
    _raises(ValueError, "x", K.softmax_causal, _f32(3, 2).T, 2)


def test_validation_attention():
    nh, nkv, hd = 4, 2, 8
    q, out = _f32(3, nh * hd), _f32(3, nh * hd)
    kc = vc = _f32(10, nkv * hd)
    _raises(ValueError, "n_kv_heads", K.attention, out, q, kc, vc, 0, 3, 2, hd)
    _raises(ValueError, "q", K.attention, out, _f32(3, 30), kc, vc, 0, nh, nkv, hd)
    _raises(ValueError, "out", K.attention, _f32(2, nh * hd), q, kc, vc, 0, nh, nkv, hd)
    _raises(ValueError, "caches", K.attention, out, q, _f32(10, 8), vc, 0, nh, nkv, hd)
    _raises(ValueError, "past", K.attention, out, q, kc, vc, 8, nh, nkv, hd)
    _raises(ValueError, "past", K.attention, out, q, kc, vc, -1, nh, nkv, hd)
    _raises(TypeError, "k_cache", K.attention, out, q, kc.astype(np.float64), vc, 0, nh, nkv, hd)
    _raises(ValueError, "v_cache", K.attention, out, q, kc, np.asfortranarray(_f32(10, 16)), 0, nh, nkv, hd)
    _raises(ValueError, "scratch", K.attention, out, q, kc, vc, 0, nh, nkv, hd, scratch=_f32(1, 2))


@pytest.mark.parametrize("bad", ["float64", "strided"])
def test_validation_attention_scratch_dtype(bad):
    nh, nkv, hd = 4, 2, 8
    q, out = _f32(3, nh * hd), _f32(3, nh * hd)
    kc = vc = _f32(10, nkv * hd)
    n = llm_fast.get_num_threads()
    scratch = np.zeros((n, 16)) if bad == "float64" else _f32(n, 32)[:, ::2]
    with pytest.raises((TypeError, ValueError)) as info:
        K.attention(out, q, kc, vc, 0, nh, nkv, hd, scratch=scratch)
    assert "scratch" in str(info.value), str(info.value)
