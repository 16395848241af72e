"""Sampling: a documented chain with its own seeded RNG.

Order (the Hugging Face order): repetition penalty -> temperature -> top-k -> top-p -> min-p
-> draw.
- repetition_penalty p (HF / CTRL): for every token id already in the context, a positive logit
  is divided by p and a negative one multiplied by p. 1.0 disables it.
- temperature 0 means greedy (argmax; ties go to the lowest id); otherwise logits / temperature.
- top_k k: keep the k most likely tokens (0 disables).
- top_p p (HF, renormalised): sort by probability, keep the smallest set whose cumulative
  probability reaches p (the token that crosses p is kept whole), renormalise. 1.0 disables.
  This differs from the course's sampler, which keeps only part of the boundary token's mass.
- min_p m: drop tokens whose probability is below m x the top probability (0 disables).
- draw: inverse-CDF with a numpy Generator seeded by `seed` (same seed, same tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self):
        def num(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        num("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        num("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        num("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        num("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, context_ids, penalty: float) -> None:
    """In place on logits (vocab,)."""
    if penalty == 1.0 or len(context_ids) == 0:
        return
    ids = np.unique(np.asarray(context_ids, dtype=np.int64))
    vals = logits[ids]
    logits[ids] = np.where(vals > 0, vals / penalty, vals * penalty)


class Sampler:
    """Chooses the next token from logits. Holds the RNG: one Sampler per generation stream."""

    # Candidates examined before falling back to a full sort (exact either way).
    _CANDIDATES = 1024

    def __init__(self, params: SamplingParams = SamplingParams()):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._work: Optional[np.ndarray] = None

    def __call__(self, logits: np.ndarray, context_ids=()) -> int:
        return self.sample(logits, context_ids)

    def _penalized(self, logits: np.ndarray, context_ids) -> np.ndarray:
        """The logits after the repetition penalty, in the sampler's own float32 buffer."""
        if self._work is None or self._work.shape != logits.shape:
            self._work = np.empty_like(logits, dtype=np.float32)
        np.copyto(self._work, logits)
        apply_repetition_penalty(self._work, context_ids, self.params.repetition_penalty)
        return self._work

    def _top_k_probs(self, logits: np.ndarray, context_ids):
        """(ids, softmax probabilities) after penalty, temperature and top-k, in no order."""
        p = self.params
        x = self._penalized(logits, context_ids).astype(np.float64) / p.temperature
        n = x.shape[0]
        # top-k: keep the k largest logits; the softmax then runs over those k only.
        ids = np.argpartition(-x, p.top_k - 1)[:p.top_k] if 0 < p.top_k < n else np.arange(n)
        e = np.exp(x[ids] - x[ids].max())
        return ids, e / e.sum()

    def candidates(self, logits: np.ndarray, context_ids=()):
        """(ids, probabilities) the draw chooses from, most likely first (probs sum to 1)."""
        p = self.params
        if p.greedy:
            x = self._penalized(logits, context_ids)
            return np.array([int(np.argmax(x))]), np.array([1.0])
        ids, probs = self._top_k_probs(logits, context_ids)
        # Most likely first, ties by lower id. Only the head of the order is needed for top-p,
        # so sort a window of candidates and widen it only if it holds less than top_p mass.
        size = len(ids) if p.top_p >= 1.0 else min(len(ids), self._CANDIDATES)
        while True:
            head = np.argpartition(-probs, size - 1)[:size] if size < len(ids) else np.arange(len(ids))
            head = head[np.lexsort((ids[head], -probs[head]))]
            if p.top_p >= 1.0 or size == len(ids) or probs[head].sum() >= p.top_p:
                break
            size = min(len(ids), size * 8)
        order, probs = ids[head], probs[head]
        if p.top_p < 1.0:
            cut = _top_p_cut_partial(probs, p.top_p)
            order, probs = order[:cut], probs[:cut]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs[0]
            order, probs = order[keep], probs[keep]
        return order, probs / probs.sum()

    def sample(self, logits: np.ndarray, context_ids=()) -> int:
        p = self.params
        if p.greedy and p.repetition_penalty == 1.0:
            return int(np.argmax(logits))
        if not p.greedy and p.top_p >= 1.0 and p.min_p == 0.0:
            return self._draw_without_cut(logits, context_ids)
        ids, probs = self.candidates(logits, context_ids)
        if len(ids) == 1:
            return int(ids[0])
        u = self.rng.random()
        j = int(np.searchsorted(np.cumsum(probs), u, side="right"))
        return int(ids[min(j, len(ids) - 1)])


    def _draw_without_cut(self, logits: np.ndarray, context_ids) -> int:
        """The draw of sample() when nothing is cut after top-k (top_p = 1, min_p = 0, e.g.
        OpenAI's defaults): the same token as walking the whole most-likely-first order with
        the same uniform number, but only the head of that order that the walk reaches is
        sorted (~1 ms instead of ~4 ms for a full 49k-token sort)."""
        ids, probs = self._top_k_probs(logits, context_ids)
        probs = probs / probs.sum()
        u = self.rng.random()
        size = min(len(ids), self._CANDIDATES)
        while True:
            head = np.argpartition(-probs, size - 1)[:size] if size < len(ids) else np.arange(len(ids))
            head = head[np.lexsort((ids[head], -probs[head]))]
            csum = np.cumsum(probs[head])
            if size == len(ids) or csum[-1] > u:
                j = int(np.searchsorted(csum, u, side="right"))
                return int(ids[head[min(j, size - 1)]])
            size = min(len(ids), size * 8)


def _top_p_cut_partial(probs: np.ndarray, top_p: float) -> int:
    """Leading (descending) probabilities kept by top-p: up to and including the token whose
    cumulative mass reaches top_p. probs are normalised over the whole kept set, but may be
    only its head."""
    csum = np.cumsum(probs, dtype=np.float64)
    return max(1, int(np.searchsorted(csum, top_p, side="left")) + 1)
