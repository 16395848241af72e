"""The Llama forward pass over the compiled kernels: forward(token_ids, cache) -> logits.

The model holds weights, RoPE tables and scratch buffers; the sequence state lives in the
KVCache passed in. No text, no sampling, no I/O here. Prefill runs the whole prompt through each
layer at once (in chunks of at most `max_chunk` rows); decode is the same code with one row.
"""
from __future__ import annotations

import threading

import numpy as np

from .cache import KVCache
from .config import ModelConfig
from .kernels import get_num_threads, raw
from .rope import rope_tables
from .weights import Weights


class Model:
    def __init__(self, config: ModelConfig, weights: Weights, max_chunk: int = 256):
        self.config = config
        self.weights = weights
        self.max_chunk = int(max_chunk)
        c, n = config, self.max_chunk
        self.cos, self.sin = rope_tables(config, c.max_position_embeddings)
        # Scratch for one chunk of rows, allocated once.
        self._x = np.zeros((n, c.hidden_size), np.float32)      # residual stream
        self._h = np.zeros((n, c.hidden_size), np.float32)      # normed input of a block
        self._qkv = np.zeros((n, c.q_dim + 2 * c.kv_dim), np.float32)
        self._q = np.zeros((n, c.q_dim), np.float32)
        self._att = np.zeros((n, c.q_dim), np.float32)
        self._gu = np.zeros((n, 2 * c.intermediate_size), np.float32)
        self._act = np.zeros((n, c.intermediate_size), np.float32)
        self._logits = np.zeros((1, c.vocab_size), np.float32)
        self._scores = np.zeros((max(get_num_threads(), 1), 0), np.float32)
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------------
    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, max_len)

    def forward(self, token_ids, cache: KVCache, logits: str = "last", out=None) -> np.ndarray:
        """Run token_ids (positions cache.length ...) through the model, appending to the cache.

        logits="last": (vocab,) float32 for the last position — a view of an internal buffer,
        overwritten by the next call (copy it to keep it). logits="all": a new (n, vocab) array.
        logits="none": only fill the cache.
        """
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

        with self._lock:
            if self._scores.shape[0] < get_num_threads() or self._scores.shape[1] < cache.max_len:
                self._scores = np.zeros((max(get_num_threads(), 1), cache.max_len), np.float32)
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


def _linear(out, x, w, beta):
    if isinstance(w, np.ndarray):
        raw.matmul_transb(out, beta, x, w, 1.0)
    else:
        w.matmul(out, x, beta)
