"""A pure-NumPy Llama forward pass: the readable baseline.

It mirrors llama2.c's forward(): one comment per step, weights used as stored, a KV cache of
plain arrays. It serves two purposes: the benchmark baseline ("what NumPy alone gives") and a
numeric reference for the compiled kernels (run it with dtype=np.float64).
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .rope import inv_frequencies
from .weights import Weights


def _dense(m, dtype):
    """A weight matrix as a dense array (quantized QTensors are dequantized once)."""
    if isinstance(m, np.ndarray):
        return m if m.dtype == dtype else m.astype(dtype)
    return m.dequantize().astype(dtype, copy=False)


class ReferenceCache:
    def __init__(self, config: ModelConfig, max_len: int, dtype):
        shape = (config.num_hidden_layers, max_len, config.kv_dim)
        self.k = np.zeros(shape, dtype)
        self.v = np.zeros(shape, dtype)
        self.length = 0


class ReferenceModel:
    def __init__(self, config: ModelConfig, weights: Weights, dtype=np.float32):
        self.config, self.dtype = config, np.dtype(dtype)
        c, d = config, self.dtype
        self.embed = _dense(weights.embed_tokens, d)
        self.lm_head = self.embed if weights.lm_head is weights.embed_tokens else _dense(weights.lm_head, d)
        self.norm = weights.norm.astype(d)
        self.layers = []
        for lw in weights.layers:
            qkv = _dense(lw.qkv_proj, d)
            gu = _dense(lw.gate_up_proj, d)
            self.layers.append(dict(
                attn_norm=lw.input_layernorm.astype(d),
                wq=qkv[:c.q_dim], wk=qkv[c.q_dim:c.q_dim + c.kv_dim], wv=qkv[c.q_dim + c.kv_dim:],
                wo=_dense(lw.o_proj, d),
                mlp_norm=lw.post_attention_layernorm.astype(d),
                w_gate=gu[:c.intermediate_size], w_up=gu[c.intermediate_size:],
                w_down=_dense(lw.down_proj, d)))
        self.inv_freq = inv_frequencies(config).astype(d)

    def new_cache(self, max_len: int | None = None) -> ReferenceCache:
        return ReferenceCache(self.config, max_len or self.config.max_position_embeddings, self.dtype)

    def _rms_norm(self, x, w):
        return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.config.rms_norm_eps))

    def _rope(self, x, positions):
        # x: (seq, heads, head_dim); rotate-half pairs (i, i + d/2)
        angles = positions[:, None].astype(np.float32) * self.inv_freq.astype(np.float32)[None, :]
        cos = np.cos(angles.astype(np.float64)).astype(self.dtype)[:, None, :]
        sin = np.sin(angles.astype(np.float64)).astype(self.dtype)[:, None, :]
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def forward(self, token_ids, cache: ReferenceCache) -> np.ndarray:
        """Logits (seq, vocab) for token_ids at positions cache.length ..."""
        c = self.config
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        seq, past = len(ids), cache.length
        total = past + seq
        hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        positions = np.arange(past, total)
        # token embedding
        x = self.embed[ids]                                          # (seq, hidden)
        # causal mask: query i (absolute past + i) sees keys 0 .. past + i
        mask = np.arange(total)[None, :] > positions[:, None]      # (seq, total)
        for l, w in enumerate(self.layers):
            # attention: rmsnorm, q/k/v projections, RoPE on q and k
            h = self._rms_norm(x, w["attn_norm"])
            q = (h @ w["wq"].T).reshape(seq, nh, hd)
            k = (h @ w["wk"].T).reshape(seq, nkv, hd)
            v = (h @ w["wv"].T)
            q = self._rope(q, positions)
            k = self._rope(k, positions)
            # store this step's k, v in the cache
            cache.k[l, past:total] = k.reshape(seq, nkv * hd)
            cache.v[l, past:total] = v
            keys = cache.k[l, :total].reshape(total, nkv, hd)
            vals = cache.v[l, :total].reshape(total, nkv, hd)
            # grouped-query: query head h reads kv head h // (nh / nkv)
            group = nh // nkv
            keys = np.repeat(keys, group, axis=1)                     # (total, nh, hd)
            vals = np.repeat(vals, group, axis=1)
            scores = np.einsum("shd,thd->hst", q, keys) / np.sqrt(hd).astype(self.dtype)
            scores = np.where(mask[None], -np.inf, scores)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)     # (nh, seq, total)
            att = np.einsum("hst,thd->shd", probs, vals).reshape(seq, nh * hd)
            # output projection and residual
            x = x + att @ w["wo"].T
            # MLP: rmsnorm, SwiGLU, down projection and residual
            h = self._rms_norm(x, w["mlp_norm"])
            gate = h @ w["w_gate"].T
            up = h @ w["w_up"].T
            x = x + ((gate / (1 + np.exp(-gate))) * up) @ w["w_down"].T
        cache.length = total
        # final norm and classifier
        return self._rms_norm(x, self.norm) @ self.lm_head.T
