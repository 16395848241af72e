"""The only importer of the compiled kernels (llm_fast._kernels.*).

The public functions check dtypes, contiguity and shapes and name the argument at fault; the
model's hot loop calls the unchecked `raw` functions on buffers it allocated itself.
"""
from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import numpy as np

from ._kernels import attention as _attention
from ._kernels import decode as _decode
from ._kernels import elementwise as _elementwise
from ._kernels import linalg as _linalg
from ._kernels import rope as _rope
from ._kernels import runtime as _runtime

raw = SimpleNamespace(
    matmul_transb=_linalg.matmul_transb,
    rms_norm=_elementwise.rms_norm,
    swiglu=_elementwise.swiglu,
    qkv_split_rope=_rope.qkv_split_rope,
    attention=_attention.attention,
)

# The fused one-token decode step over captured weight pointers (used by llm_fast.model).
DecodePlan = _decode.DecodePlan

_SIMD_ENV = os.environ.get("LLM_FAST_SIMD")
if _SIMD_ENV is not None and _SIMD_ENV not in ("scalar", "avx2", "avx512"):
    warnings.warn(f"LLM_FAST_SIMD={_SIMD_ENV!r} is not one of scalar, avx2, avx512; ignored "
                  f"(using {_runtime.simd_level()})", RuntimeWarning, stacklevel=2)

set_num_threads = _runtime.set_num_threads
get_num_threads = _runtime.get_num_threads
simd_level = _runtime.simd_level
have_openmp = _runtime.have_openmp


def _f32(name, a, ndim, writable=False):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return a


def matmul_transb(c, beta, a, b, alpha):
    """c = beta * c + alpha * a @ b.T in place; a (m, k), b (n, k), c (m, n)."""
    _f32("c", c, 2, writable=True), _f32("a", a, 2), _f32("b", b, 2)
    if a.shape[1] != b.shape[1] or c.shape != (a.shape[0], b.shape[0]):
        raise ValueError(f"matmul_transb: shapes a {a.shape}, b {b.shape}, c {c.shape} do not "
                         f"satisfy a (m, k), b (n, k), c (m, n)")
    _linalg.matmul_transb(c, float(beta), a, b, float(alpha))
    return c


def linear(out, x, w, beta=0.0):
    """out = beta * out + x @ w.T for a float32 weight matrix or a quantized QTensor."""
    if isinstance(w, np.ndarray):
        return matmul_transb(out, beta, x, w, 1.0)
    _f32("out", out, 2, writable=True), _f32("x", x, 2)
    w.matmul(out, x, beta)
    return out


def rms_norm(out, x, w, eps):
    """out[i] = w * x[i] / sqrt(mean(x[i] ** 2) + eps) over the last axis."""
    _f32("out", out, 2, writable=True), _f32("x", x, 2), _f32("w", w, 1)
    if out.shape != x.shape or w.shape[0] != x.shape[1]:
        raise ValueError(f"rms_norm: shapes out {out.shape}, x {x.shape}, w {w.shape} differ")
    if not eps >= 0:
        raise ValueError(f"rms_norm: eps must be >= 0, got {eps}")
    _elementwise.rms_norm(out, x, w, float(eps))
    return out


def swiglu(out, gate_up):
    """out = silu(gate) * up, where gate_up = [gate | up] along the last axis."""
    _f32("out", out, 2, writable=True), _f32("gate_up", gate_up, 2)
    if gate_up.shape != (out.shape[0], 2 * out.shape[1]):
        raise ValueError(f"swiglu: gate_up {gate_up.shape} must be (rows, 2 * {out.shape[1]})")
    _elementwise.swiglu(out, gate_up)
    return out


def silu_mul(y, x):
    """The course's silu(y, x): y = silu(x) * y in place."""
    _f32("y", y, 2, writable=True), _f32("x", x, 2)
    if x.shape != y.shape:
        raise ValueError(f"silu_mul: shapes y {y.shape} and x {x.shape} differ")
    _elementwise.silu_mul(y, x)
    return y


def add(y, x):
    """y += x in place."""
    _f32("y", y, 2, writable=True), _f32("x", x, 2)
    if x.shape != y.shape:
        raise ValueError(f"add: shapes y {y.shape} and x {x.shape} differ")
    _elementwise.add(y, x)
    return y


def rope(x, start_pos, cos, sin, head_dim):
    """Rotate-half RoPE in place on x (seq, heads * head_dim) at positions start_pos + row."""
    _f32("x", x, 2, writable=True), _f32("cos", cos, 2), _f32("sin", sin, 2)
    if head_dim <= 0 or head_dim % 2 or x.shape[1] % head_dim:
        raise ValueError(f"rope: head_dim {head_dim} must be even and divide {x.shape[1]}")
    if cos.shape != sin.shape or cos.shape[1] != head_dim // 2:
        raise ValueError(f"rope: cos/sin tables {cos.shape}/{sin.shape} must be (positions, {head_dim // 2})")
    if start_pos < 0 or start_pos + x.shape[0] > cos.shape[0]:
        raise ValueError(f"rope: positions [{start_pos}, {start_pos + x.shape[0]}) exceed the "
                         f"{cos.shape[0]} rows of the tables")
    _rope.rope(x, int(start_pos), cos, sin, int(head_dim))
    return x


def softmax_causal(x, seq):
    """Causal softmax in place over the last axis of x (..., seq, total)."""
    _f32("x", x, x.ndim if isinstance(x, np.ndarray) else 2, writable=True)
    if x.ndim < 2 or x.shape[-2] != seq or not 1 <= seq <= x.shape[-1]:
        raise ValueError(f"softmax_causal: x {x.shape} must be (..., seq={seq}, total >= seq)")
    _attention.softmax_causal(x.reshape(-1, x.shape[-1]), int(seq))
    return x


def attention(out, q, k_cache, v_cache, past, n_heads, n_kv_heads, head_dim, scratch=None):
    """Causal multi-head (grouped-query) attention of q over cache rows [0, past + seq)."""
    seq = q.shape[0] if isinstance(q, np.ndarray) else 0
    _f32("out", out, 2, writable=True), _f32("q", q, 2), _f32("k_cache", k_cache, 2), _f32("v_cache", v_cache, 2)
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"attention: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    if q.shape[1] != n_heads * head_dim or out.shape != q.shape:
        raise ValueError(f"attention: q {q.shape} / out {out.shape} must be (seq, {n_heads * head_dim})")
    if k_cache.shape != v_cache.shape or k_cache.shape[1] != n_kv_heads * head_dim:
        raise ValueError(f"attention: caches {k_cache.shape}/{v_cache.shape} must be (max_len, {n_kv_heads * head_dim})")
    if past < 0 or past + seq > k_cache.shape[0]:
        raise ValueError(f"attention: past {past} + seq {seq} exceeds the cache length {k_cache.shape[0]}")
    need = (max(get_num_threads(), 1), past + seq)
    if scratch is None:  # room for 4 positions x a KV group per thread (see _kernels.attention)
        scratch = np.empty((need[0], 4 * (n_heads // n_kv_heads) * (need[1] + 2 * head_dim)),
                           np.float32)
    else:
        _f32("scratch", scratch, 2, writable=True)
    if scratch.shape[0] < need[0] or scratch.shape[1] < need[1]:
        raise ValueError(f"attention: scratch {scratch.shape} must be at least {need}")
    _attention.attention(out, q, k_cache, v_cache, int(past), int(n_heads), int(n_kv_heads),
                         int(head_dim), scratch)
    return out
