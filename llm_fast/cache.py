"""The KV cache: per layer, preallocated K and V buffers of (max_len, kv_heads * head_dim)."""
from __future__ import annotations

import numpy as np

from .config import ModelConfig


class KVCache:
    """Keys (after RoPE) and values of the tokens seen so far.

    A forward of n new tokens writes rows [length, length + n) of every layer and attends over
    rows [0, length + n). The buffers are allocated once (np.zeros: pages are committed only
    when written, so a long max_len costs address space, not memory, until it is used).
    """

    def __init__(self, config: ModelConfig, max_len: int | None = None):
        max_len = config.max_position_embeddings if max_len is None else int(max_len)
        if not 1 <= max_len <= config.max_position_embeddings:
            raise ValueError(f"max_len must be in [1, {config.max_position_embeddings}] "
                             f"(the model's context), got {max_len}")
        self.max_len = max_len
        self.k = [np.zeros((max_len, config.kv_dim), np.float32) for _ in range(config.num_hidden_layers)]
        self.v = [np.zeros((max_len, config.kv_dim), np.float32) for _ in range(config.num_hidden_layers)]
        self.length = 0
        self.tokens: list[int] = []  # the ids whose K/V rows are held, for prefix reuse

    @property
    def remaining(self) -> int:
        return self.max_len - self.length

    def trim(self, n: int) -> None:
        """Keep only the first n positions (n <= length)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot trim a cache of length {self.length} to {n}")
        self.length = n
        del self.tokens[n:]

    def reset(self) -> None:
        self.trim(0)

    def nbytes_used(self) -> int:
        """Bytes of K/V held for the current length (all layers)."""
        return 2 * len(self.k) * self.length * self.k[0].shape[1] * 4

    def nbytes_reserved(self) -> int:
        return 2 * len(self.k) * self.k[0].nbytes

    def common_prefix(self, ids) -> int:
        """Length of the longest prefix of ids that the cache already holds."""
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        return n
