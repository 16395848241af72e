"""Weight matrices kept in ggml's block-quantized layout (Q8_0, Q4_0, Q4_1) or as F16 / BF16.

A QTensor is (qtype, shape=(rows, cols) = (out_features, in_features), data) where data is a
uint8 array (rows, row_bytes) holding the rows exactly as a GGUF file stores them; it may be a
view into a memory-mapped file and is never copied here. `matmul` runs the compiled kernels of
csrc/quant.{h,pyx}; F16/BF16 weights are converted on the fly and multiplied with float32
activations.

Activations of Q8_0/Q4_0/Q4_1 (`t.activations`, or Model.set_activations / --activations):
- "q8": x is quantized to 8 bits per 32-block once per call and multiplied with integer dot
  products (vpdpbusd), as llama.cpp does. Fastest decode, but the rounding perturbs SmolLM2's
  logits by up to ~1.3 and flips near-tied top-1 choices (97.5% agreement with float64 over
  tests/fixtures/real_text.txt).
- "q8x2": two 8-bit limbs, x ~= d1*q1 + (d1/256)*q2 with q2 the residual on a 256x finer
  grid, combined in int32 by the same integer kernels: ~16-bit activations (max logit error
  0.008, 100% agreement); decode costs ~10% more than "q8", prefill ~1.4x.
- "f32": float x times the exactly dequantized weights: float32 accuracy. Each weight tile is
  dequantized once into scratch and multiplied by register-blocked float32 GEMM tiles, which
  for prefill (many rows) is faster than "q8"; for one row it is the slowest mode.
- "auto" (default): "f32" from AUTO_F32_ROWS rows on (prefill), "q8x2" below (decode): float
  accuracy at near-"q8" decode speed and better-than-"q8" prefill speed.
Every mode gives results independent of the thread count and of how rows are batched (for
"auto": within each regime).

Scratch: the 8-bit activations go into a `Workspace` that grows on demand and is then reused.
By default each Python thread has its own (thread-local), so concurrent calls from different
threads are safe; pass `workspace=` to manage it yourself.

Error of the "q8" matmul: each activation is rounded to a grid of step d_b = amax_b / 127
(amax_b the largest |x| in its 32-block), so |y - x @ W.T| <= sum_b d_b / 2 * sum_{k in b} |W_k|
plus float32 rounding (tests/test_quant.py checks exactly that bound).
"""
from __future__ import annotations

import threading

import numpy as np

from ._kernels import quant as _q

QTYPES = ("q8_0", "q4_0", "q4_1", "f16", "bf16")
ACTIVATION_MODES = ("auto", "q8", "q8x2", "f32")
DEFAULT_ACTIVATIONS = "auto"
# "auto": from this many activation rows on (prefill), float activations; below (decode), q8x2
AUTO_F32_ROWS = 16
_epoch = 0   # bumped by every change of a QTensor's activation mode (see activation_epoch)


def activation_epoch() -> int:
    """A counter that changes whenever any QTensor's activation mode is set: a model's fused
    decode step compares it to re-read the modes it captured."""
    return _epoch
# qtype -> (weights per block, bytes per block)
BLOCK_SIZES = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "f16": (1, 2), "bf16": (1, 2)}
_CODES = _q.QTYPE_CODES

set_num_threads = _q.set_num_threads
get_num_threads = _q.get_num_threads
simd_level = _q.simd_level
set_simd_level = _q.set_simd_level
Workspace = _q.Workspace

_tls = threading.local()


def _thread_workspace():
    ws = getattr(_tls, "ws", None)
    if ws is None:
        ws = _tls.ws = _q.Workspace()
    return ws


def row_bytes(qtype, cols):
    """Bytes of one row of `cols` weights of type `qtype`."""
    qk, bs = BLOCK_SIZES[qtype]
    if cols % qk:
        raise ValueError(f"{qtype} rows need a multiple of {qk} columns, got {cols}")
    return cols // qk * bs


class QTensor:
    """A (rows, cols) weight matrix in ggml block layout; see the module docstring."""

    __slots__ = ("qtype", "shape", "data", "_code", "_mode")

    def __init__(self, qtype, shape, data, activations=DEFAULT_ACTIVATIONS):
        if qtype not in BLOCK_SIZES:
            raise ValueError(f"unsupported qtype {qtype!r}; expected one of {QTYPES}")
        rows, cols = (int(s) for s in shape)
        if rows < 0 or cols < 0:
            raise ValueError(f"shape must be non-negative, got {tuple(shape)}")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
            raise TypeError(f"data must be a uint8 numpy array, got "
                            f"{getattr(data, 'dtype', type(data).__name__)}")
        rb = row_bytes(qtype, cols)
        if data.shape != (rows, rb):
            raise ValueError(f"{qtype} data for shape {(rows, cols)} must have shape {(rows, rb)}, "
                             f"got {data.shape}")
        if not data.flags.c_contiguous:
            raise ValueError("data must be C-contiguous")
        self.qtype = qtype
        self.shape = (rows, cols)
        self.data = data
        self._code = _CODES[qtype]
        self.activations = activations

    @property
    def activations(self):
        """How x is multiplied with the weights: "auto", "q8", "q8x2" or "f32" (module docstring)."""
        return self._mode

    @activations.setter
    def activations(self, mode):
        global _epoch
        if mode not in ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {mode!r}")
        self._mode = mode
        _epoch += 1

    @property
    def nbytes(self):
        return self.data.nbytes

    @property
    def ndim(self):
        return 2

    def __repr__(self):
        return (f"QTensor({self.qtype!r}, shape={self.shape}, nbytes={self.nbytes}, "
                f"activations={self.activations!r})")

    def matmul(self, out, x, beta=0.0, workspace=None):
        """out = beta * out + x @ W.T for float32 C-contiguous x (m, cols), out (m, rows)
        (1-D x (cols,) / out (rows,) also accepted). beta == 0: out is never read."""
        if x.ndim == 1:
            x = x.reshape(1, -1)
            out = out.reshape(1, -1)
        mode = self._mode
        if mode == "auto":
            mode = "f32" if x.shape[0] >= AUTO_F32_ROWS else "q8x2"
        _q.matmul(self._code, self.data, self.shape[1], x, out, beta,
                  workspace if workspace is not None else _thread_workspace(), mode == "f32",
                  2 if mode == "q8x2" else 1)
        return out

    def dequantize(self, out=None):
        """The float32 (rows, cols) matrix, bit-identical to gguf.quants.dequantize."""
        if out is None:
            out = np.empty(self.shape, dtype=np.float32)
        _q.dequantize(self._code, self.data, out)
        return out

    def dequantize_rows(self, ids, out=None):
        """Rows `ids` as float32 (len(ids), cols): the embedding lookup."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((ids.shape[0], self.shape[1]), dtype=np.float32)
        _q.dequantize_rows(self._code, self.data, ids, out)
        return out


def is_qtensor(obj):
    return isinstance(obj, QTensor)


# ------------------------------------------------------------------ quantization (ggml's
# reference quantizers, vectorised; byte-identical to gguf.quants.quantize)

_CHUNK = 1 << 16  # blocks per chunk: bounds the temporaries to a few MB


def _roundf(v):
    """C roundf (half away from zero), exactly: floor(|v|) + (frac >= 0.5) with the sign."""
    a = np.abs(v)
    f = np.floor(a)
    r = f + (a - f >= np.float32(0.5))
    return np.where(v < 0, -r, r)


def _q8_0_blocks(b):
    amax = np.abs(b).max(axis=1, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = _roundf(b * inv).astype(np.int8)
    out = np.empty((b.shape[0], 34), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out


def _pack_nibbles(q):
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _q4_0_blocks(b):
    imax = np.abs(b).argmax(axis=1)
    mx = b[np.arange(b.shape[0]), imax][:, None]
    d = mx / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.clip(np.trunc(b * inv + np.float32(8.5)), 0, 15)
    out = np.empty((b.shape[0], 18), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = _pack_nibbles(q)
    return out


def _q4_1_blocks(b):
    mx = b.max(axis=1, keepdims=True)
    mn = b.min(axis=1, keepdims=True)
    d = (mx - mn) / np.float32(15)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.clip(np.trunc((b - mn) * inv + np.float32(0.5)), 0, 15)
    out = np.empty((b.shape[0], 20), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:4] = mn.astype(np.float16).view(np.uint8)
    out[:, 4:] = _pack_nibbles(q)
    return out


_BLOCK_QUANTIZERS = {"q8_0": _q8_0_blocks, "q4_0": _q4_0_blocks, "q4_1": _q4_1_blocks}


def _to_bf16(a):
    n = a.view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    n = (n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16  # round to nearest even
    return n.astype(np.uint16)


def quantize(arr, qtype):
    """Quantize a float (rows, cols) matrix to a QTensor of type qtype (q8_0, q4_0, q4_1, f16,
    bf16), byte-identical to ggml's reference quantizers (gguf.quants.quantize)."""
    if qtype not in BLOCK_SIZES:
        raise ValueError(f"unsupported qtype {qtype!r}; expected one of {QTYPES}")
    a = np.ascontiguousarray(arr, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"quantize expects a 2-D (rows, cols) matrix, got shape {a.shape}")
    rows, cols = a.shape
    rb = row_bytes(qtype, cols)
    if qtype == "f16":
        return QTensor(qtype, a.shape, a.astype(np.float16).view(np.uint8).reshape(rows, rb))
    if qtype == "bf16":
        return QTensor(qtype, a.shape, _to_bf16(a).view(np.uint8).reshape(rows, rb))
    fn = _BLOCK_QUANTIZERS[qtype]
    bs = BLOCK_SIZES[qtype][1]
    blocks = a.reshape(-1, 32)
    data = np.empty((blocks.shape[0], bs), dtype=np.uint8)
    for s in range(0, blocks.shape[0], _CHUNK):
        data[s:s + _CHUNK] = fn(blocks[s:s + _CHUNK])
    return QTensor(qtype, a.shape, data.reshape(rows, rb))


# ------------------------------------------------------------------ row operations

def concat_rows(tensors):
    """Stack QTensors of one qtype and column count along the rows (fused q/k/v, gate/up)."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concat_rows needs at least one QTensor")
    first = tensors[0]
    for t in tensors:
        if not isinstance(t, QTensor):
            raise TypeError(f"concat_rows expects QTensors, got {type(t).__name__}")
        if t.qtype != first.qtype or t.shape[1] != first.shape[1]:
            raise ValueError(f"concat_rows: {t!r} does not match {first!r} (qtype and cols must agree)")
    data = np.concatenate([t.data for t in tensors], axis=0)
    return QTensor(first.qtype, (data.shape[0], first.shape[1]), data, first.activations)


def take_rows(qt, perm):
    """A new QTensor whose row i is row perm[i] of qt (rows are whole blocks, so this is exact)."""
    perm = np.asarray(perm)
    if perm.ndim != 1 or not np.issubdtype(perm.dtype, np.integer):
        raise ValueError("perm must be a 1-D integer array")
    if perm.size and (perm.min() < 0 or perm.max() >= qt.shape[0]):
        raise IndexError(f"perm has values outside [0, {qt.shape[0]})")
    data = np.ascontiguousarray(qt.data[perm])
    return QTensor(qt.qtype, (perm.shape[0], qt.shape[1]), data, qt.activations)
