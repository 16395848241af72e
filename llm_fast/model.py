"""The Llama forward pass over the compiled kernels: forward(token_ids, cache) -> logits.

The model holds weights, RoPE tables and scratch buffers; the sequence state lives in the
KVCache passed in. No text, no sampling, no I/O here. Prefill runs the whole prompt through each
layer at once (in chunks of at most `max_chunk` rows); decode is the same code with one row.

Decoding one token through the Python layer loop costs ~12 kernel calls per layer, each with its
argument parsing and its own OpenMP fork/join. For float32 weights a fused decode step
(csrc/decode.h) runs the same kernels in the same order for all layers in one nogil call, on
pointers captured here once; its logits are bit-identical to the layer loop's, which stays the
readable reference path (`use_fused_decode = False` selects it).
"""
from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np

from .cache import KVCache
from .config import ModelConfig
from .kernels import DecodePlan, get_num_threads, raw
from .memory import aligned_copy, aligned_zeros
from .rope import rope_tables
from .weights import Weights


class Model:
    def __init__(self, config: ModelConfig, weights: Weights, max_chunk: int = 256):
        self.config = config
        self.weights = weights = placed(weights)
        self.max_chunk = int(max_chunk)
        c, n = config, self.max_chunk
        self.cos, self.sin = rope_tables(config, c.max_position_embeddings)
        # Scratch for one chunk of rows, allocated once.
        self._x = aligned_zeros((n, c.hidden_size))        # residual stream
        self._h = aligned_zeros((n, c.hidden_size))        # normed input of a block
        self._qkv = aligned_zeros((n, c.q_dim + 2 * c.kv_dim))
        self._q = aligned_zeros((n, c.q_dim))
        self._att = aligned_zeros((n, c.q_dim))
        self._gu = aligned_zeros((n, 2 * c.intermediate_size))
        self._act = aligned_zeros((n, c.intermediate_size))
        self._logits = aligned_zeros((1, c.vocab_size))
        self._group = c.num_attention_heads // c.num_key_value_heads
        self._scores = np.zeros((max(get_num_threads(), 1), 0), np.float32)
        self._lock = threading.Lock()
        self._plan = None
        if _fusable(weights):
            self._plan = DecodePlan(c, weights, self.cos, self.sin, c.max_position_embeddings,
                                    max(get_num_threads(), os.cpu_count() or 1))
            self._plan_modes = _activation_epoch()
        self.use_fused_decode = self._plan is not None

    # ----------------------------------------------------------------------------------------
    def quantized_matrices(self) -> list:
        """The block-quantized / F16 / BF16 weight matrices (QTensor) of the model."""
        from .quant import QTensor
        return [m for m in self.weights.arrays() if isinstance(m, QTensor)]

    def set_activations(self, mode: str) -> None:
        """How the quantized matrices take their input ("auto" | "q8" | "q8x2" | "f32"; see
        llm_fast.quant). Float32 models have no quantized matrices: nothing changes."""
        from .quant import ACTIVATION_MODES
        if mode not in ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {mode!r}")
        for m in self.quantized_matrices():
            m.activations = mode

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, max_len)

    def forward(self, token_ids, cache: KVCache, logits: str = "last", out=None) -> np.ndarray:
        """Run token_ids (positions cache.length ...) through the model, appending to the cache.

        logits="last": (vocab,) float32 for the last position — a view of an internal buffer,
        overwritten by the next call (copy it to keep it). logits="all": a new (n, vocab) array.
        logits="none": only fill the cache.
        """
        if (self.use_fused_decode and type(token_ids) in (list, tuple) and len(token_ids) == 1
                and type(token_ids[0]) is int and logits in ("last", "none")):
            return self._decode_one(token_ids[0], cache, logits == "last")
        ids = np.asarray(token_ids)
        if ids.ndim != 1:
            ids = ids.reshape(-1)
        n = ids.shape[0]
        if n == 0:
            raise ValueError("forward: token_ids is empty")
        if ids.dtype.kind not in "iu":
            raise TypeError(f"forward: token_ids must be integers, got dtype {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"forward: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        if n > cache.remaining:
            raise ValueError(f"forward: {n} tokens do not fit the cache ({cache.length} of "
                             f"{cache.max_len} positions used)")
        if logits not in ("last", "all", "none"):
            raise ValueError(f"forward: logits must be 'last', 'all' or 'none', got {logits!r}")
        if len(cache.k) != self.config.num_hidden_layers or cache.k[0].shape[1] != self.config.kv_dim:
            raise ValueError("forward: the cache was made for a different model")

        if n == 1 and self.use_fused_decode and logits != "all":
            return self._decode_one(int(ids[0]), cache, logits == "last")
        with self._lock:
            # per thread: scores and gathered rows of 4 positions x a KV group (see attention)
            need = (max(get_num_threads(), 1),
                    4 * self._group * (cache.max_len + 2 * self.config.head_dim))
            if self._scores.shape[0] < need[0] or self._scores.shape[1] < need[1]:
                self._scores = aligned_zeros(need)
            all_logits = np.empty((n, self.config.vocab_size), np.float32) if logits == "all" else None
            for start in range(0, n, self.max_chunk):
                chunk = ids[start:start + self.max_chunk]
                self._layers(chunk, cache)
                m = chunk.shape[0]
                if logits == "all":
                    self._head(self._x[:m], all_logits[start:start + m])
                elif logits == "last" and start + m == n:
                    self._head(self._x[m - 1:m], self._logits)
            cache.tokens.extend(int(t) for t in ids)
        if logits == "all":
            return all_logits
        if logits == "last":
            return self._logits[0]
        return None

    def _decode_one(self, tok: int, cache: KVCache, want_logits: bool):
        """One token through the fused decode step (same result as the layer loop)."""
        if not 0 <= tok < self.config.vocab_size:
            raise ValueError(f"forward: token id {tok} is outside the vocabulary [0, {self.config.vocab_size})")
        if cache.length >= cache.max_len:
            raise ValueError(f"forward: 1 tokens do not fit the cache ({cache.length} of "
                             f"{cache.max_len} positions used)")
        with self._lock:
            epoch = _activation_epoch()
            if epoch != self._plan_modes:   # some QTensor.activations changed since
                self._plan.refresh_activations(self.weights)
                self._plan_modes = epoch
            self._plan.step(tok, cache.k, cache.v, cache.length,
                            self._logits[0] if want_logits else None, get_num_threads())
            cache.length += 1
            cache.tokens.append(tok)
        return self._logits[0] if want_logits else None

    # ----------------------------------------------------------------------------------------
    def _embed(self, ids, x):
        table = self.weights.embed_tokens
        if isinstance(table, np.ndarray):
            np.take(table, ids, axis=0, out=x)
        else:
            table.dequantize_rows(ids, x)

    def _layers(self, ids, cache: KVCache):
        c = self.config
        m, pos = ids.shape[0], cache.length
        x, h = self._x[:m], self._h[:m]
        qkv, q, att = self._qkv[:m], self._q[:m], self._att[:m]
        gu, act = self._gu[:m], self._act[:m]
        self._embed(ids, x)
        for l, w in enumerate(self.weights.layers):
            k_cache, v_cache = cache.k[l], cache.v[l]
            # attention block: x += o_proj(attn(rope(q), rope(k), v))
            raw.rms_norm(h, x, w.input_layernorm, c.rms_norm_eps)
            _linear(qkv, h, w.qkv_proj, 0.0)
            raw.qkv_split_rope(qkv, q, k_cache, v_cache, pos, self.cos, self.sin,
                               c.num_attention_heads, c.num_key_value_heads, c.head_dim)
            raw.attention(att, q, k_cache, v_cache, pos, c.num_attention_heads,
                          c.num_key_value_heads, c.head_dim, self._scores)
            _linear(x, att, w.o_proj, 1.0)          # beta = 1: the residual add is fused
            # MLP block: x += down(silu(gate(h)) * up(h))
            raw.rms_norm(h, x, w.post_attention_layernorm, c.rms_norm_eps)
            _linear(gu, h, w.gate_up_proj, 0.0)
            raw.swiglu(act, gu)
            _linear(x, act, w.down_proj, 1.0)
        cache.length = pos + m

    def _head(self, x, out):
        m = x.shape[0]
        h = self._h[:m]
        raw.rms_norm(h, x, self.weights.norm, self.config.rms_norm_eps)
        _linear(out, h, self.weights.lm_head, 0.0)


def placed(weights: Weights) -> Weights:
    """The weights with every float32 array on a 64-byte boundary (2 MiB + huge pages for large
    ones; see llm_fast.memory). Arrays already aligned are kept, others copied once; quantized
    matrices are kept as they are. Tied embeddings stay one object."""
    memo = {}

    def place(a):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32:
            return a
        if id(a) not in memo:
            memo[id(a)] = aligned_copy(a)
        return memo[id(a)]

    layers = [dataclasses.replace(
        lw, input_layernorm=place(lw.input_layernorm), qkv_proj=place(lw.qkv_proj),
        o_proj=place(lw.o_proj), post_attention_layernorm=place(lw.post_attention_layernorm),
        gate_up_proj=place(lw.gate_up_proj), down_proj=place(lw.down_proj))
        for lw in weights.layers]
    return dataclasses.replace(weights, embed_tokens=place(weights.embed_tokens), layers=layers,
                               norm=place(weights.norm), lm_head=place(weights.lm_head))


def _fusable(weights: Weights) -> bool:
    """The fused decode step takes C-contiguous float32 norms and float32 or QTensor matrices."""
    from .quant import QTensor
    norms = [weights.norm] + [a for lw in weights.layers
                              for a in (lw.input_layernorm, lw.post_attention_layernorm)]
    mats = [weights.embed_tokens, weights.lm_head]
    for lw in weights.layers:
        mats += [lw.qkv_proj, lw.o_proj, lw.gate_up_proj, lw.down_proj]
    f32 = lambda m: isinstance(m, np.ndarray) and m.dtype == np.float32 and m.flags.c_contiguous
    return all(f32(a) for a in norms) and all(f32(m) or isinstance(m, QTensor) for m in mats)


def _activation_epoch() -> int:
    from . import quant
    return quant.activation_epoch()


def _linear(out, x, w, beta):
    if isinstance(w, np.ndarray):
        raw.matmul_transb(out, beta, x, w, 1.0)
    else:
        w.matmul(out, x, beta)
