"""RoPE frequency and cos/sin tables (computed once per model, in float32 like transformers)."""
from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig


def inv_frequencies(config: ModelConfig) -> np.ndarray:
    """(head_dim / 2,) float32 inverse frequencies, with linear / llama3 scaling applied."""
    d = config.head_dim
    # transformers: 1 / base ** (arange(0, d, 2).float() / d), evaluated in float32.
    exponents = (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d))
    inv = (1.0 / np.power(np.float32(config.rope_theta), exponents, dtype=np.float32)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv
    factor = float(s["factor"])
    if s["rope_type"] == "linear":
        return (inv / np.float32(factor)).astype(np.float32)
    # llama3: long wavelengths are divided by factor, short ones kept, the middle blended.
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: ModelConfig, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (max_len, head_dim / 2), float32, C-contiguous."""
    inv = inv_frequencies(config)
    pos = np.arange(max_len, dtype=np.float32)
    angles = (pos[:, None] * inv[None, :]).astype(np.float32)  # float32 product, as transformers
    a64 = angles.astype(np.float64)
    return (np.ascontiguousarray(np.cos(a64), dtype=np.float32),
            np.ascontiguousarray(np.sin(a64), dtype=np.float32))
