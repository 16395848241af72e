"""One model, many requests: a worker thread that interleaves generation streams.

The model's forward is not re-entrant (scratch buffers, one lock), so a single worker thread
runs every forward. Each request is a `stream_generate` generator with its own KVCache and its
own Sampler (so its own RNG): the worker advances the active generators round-robin, one token
each, so concurrent streams progress together and each produces exactly the tokens it would
produce alone (same seed, same text). A new request's first step is its prefill.

Admission is bounded: at most `max_concurrent` streams decode at once and at most `max_queue`
more wait for a slot; beyond that `submit` raises QueueFullError (the server answers 429).

Finished streams leave their KVCache in a small LRU keyed by the tokens it holds; a new request
takes the cache sharing the longest prefix with its prompt, so the next turn of a conversation
only prefills its new tokens (chunked prefill gives the same logits as one-shot prefill).

No HTTP here: events go to a callback, called from the worker thread.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .cache import KVCache
from .generate import GenerationChunk, stream_generate
from .kernels import get_num_threads, set_num_threads
from .model import Model
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer


class QueueFullError(RuntimeError):
    """Every decode slot is busy and the wait queue is full."""


class SchedulerClosedError(RuntimeError):
    """The scheduler was shut down."""


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. Penalties follow OpenAI's definitions, on the logits:
    logit[j] += logit_bias[j] - frequency_penalty * c[j] - presence_penalty * (c[j] > 0),
    where c[j] counts how often j was generated so far in this completion.
    top_logprobs: None for no logprobs, else how many alternatives to report per token."""
    prompt_ids: tuple
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple = ()
    logit_bias: dict = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: Optional[int] = None


@dataclass
class TokenLogprob:
    """log-softmax of the raw model logits at one step: the chosen token and the best others."""
    token: int
    logprob: float
    top: list  # [(token id, logprob)], most likely first


@dataclass
class StepEvent:
    chunk: GenerationChunk
    logprob: Optional[TokenLogprob] = None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


class RequestSampler(Sampler):
    """The library's sampler chain, preceded by logit_bias and OpenAI presence/frequency
    penalties, and recording the logprobs of each chosen token."""

    def __init__(self, params: SamplingParams, logit_bias=None, presence_penalty=0.0,
                 frequency_penalty=0.0, top_logprobs: Optional[int] = None):
        super().__init__(params)
        bias = dict(logit_bias or {})
        self._bias_ids = np.array(sorted(bias), dtype=np.int64)
        self._bias_vals = np.array([bias[i] for i in sorted(bias)], dtype=np.float32)
        self.presence_penalty = float(presence_penalty)
        self.frequency_penalty = float(frequency_penalty)
        self.top_logprobs = top_logprobs
        self.counts: dict = {}
        self.last: Optional[TokenLogprob] = None

    def sample(self, logits: np.ndarray, context_ids=()) -> int:
        lp = log_softmax(logits) if self.top_logprobs is not None else None
        penalize = self.counts and (self.presence_penalty or self.frequency_penalty)
        if self._bias_ids.size or penalize:
            logits = logits.copy()  # the model's buffer is reused by its next forward
            if self._bias_ids.size:
                logits[self._bias_ids] += self._bias_vals
            if penalize:
                ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
                c = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
                logits[ids] -= c * self.frequency_penalty + self.presence_penalty
        tok = super().sample(logits, context_ids)
        self.counts[tok] = self.counts.get(tok, 0) + 1
        if lp is not None:
            k = min(self.top_logprobs, lp.shape[0])
            top = []
            if k > 0:
                idx = np.argpartition(-lp, k - 1)[:k]
                idx = idx[np.lexsort((idx, -lp[idx]))]
                top = [(int(i), float(lp[i])) for i in idx]
            self.last = TokenLogprob(tok, float(lp[tok]), top)
        return tok


class Job:
    """One request inside the scheduler. cancel() may be called from any thread."""

    def __init__(self, request: GenerationRequest, on_event: Callable[[object], None]):
        self.request = request
        self.on_event = on_event       # StepEvent, then None at the end, or an Exception
        self.cancelled = threading.Event()
        self.gen = None
        self.cache: Optional[KVCache] = None
        self.sampler: Optional[RequestSampler] = None

    def cancel(self) -> None:
        self.cancelled.set()


class PrefixCache:
    """A few KVCaches of finished requests; take() hands out the one sharing the longest
    prefix with a prompt (or a new cache), put() returns one, evicting the least recent."""

    def __init__(self, model: Model, size: int, max_len: int):
        self.model, self.size, self.max_len = model, int(size), int(max_len)
        self._caches: list = []  # least recently used first

    def take(self, prompt_ids: Sequence[int]) -> KVCache:
        best, best_n = None, 0
        for c in self._caches:
            n = c.common_prefix(prompt_ids)
            if n > best_n:
                best, best_n = c, n
        if best is not None:
            self._caches.remove(best)
            return best
        return self.model.new_cache(self.max_len)

    def put(self, cache: KVCache) -> None:
        if self.size <= 0 or cache.length == 0:
            return
        self._caches.append(cache)
        del self._caches[:-self.size]

    def clear(self) -> None:
        self._caches.clear()


class Scheduler:
    def __init__(self, model: Model, tokenizer: Tokenizer, max_concurrent: int = 4,
                 max_queue: int = 16, prefix_cache_size: int = 4, n_ctx: Optional[int] = None,
                 threads: Optional[int] = None):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.n_ctx = int(n_ctx or model.config.max_position_embeddings)
        if not 1 <= self.n_ctx <= model.config.max_position_embeddings:
            raise ValueError(f"n_ctx must be in [1, {model.config.max_position_embeddings}], "
                             f"got {n_ctx}")
        self.max_concurrent, self.max_queue = int(max_concurrent), int(max_queue)
        # OpenMP's thread count is a per-thread setting: pass the creator's on to the worker.
        self.threads = int(threads) if threads else get_num_threads()
        self.prefix_cache = PrefixCache(model, prefix_cache_size, self.n_ctx)
        self._waiting: deque = deque()
        self._active: list = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llm_fast-scheduler", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, on_event: Callable[[object], None]) -> Job:
        """Queue a request; events arrive through on_event (from the worker thread)."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty (no tokens)")
        if len(request.prompt_ids) > self.n_ctx:
            raise ValueError(f"the prompt has {len(request.prompt_ids)} tokens, more than the "
                             f"context of {self.n_ctx}")
        job = Job(request, on_event)
        with self._cond:
            if self._closed:
                raise SchedulerClosedError("the server is shutting down")
            self._prune_waiting()
            free = self.max_concurrent - len(self._active)
            if len(self._waiting) >= max(free, 0) + self.max_queue:
                raise QueueFullError(
                    f"the server is busy: {len(self._active)} requests generating and "
                    f"{len(self._waiting)} waiting (max_concurrent={self.max_concurrent}, "
                    f"max_queue={self.max_queue}); retry later")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def stats(self) -> dict:
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting),
                    "max_concurrent": self.max_concurrent, "max_queue": self.max_queue,
                    "cached_prefixes": len(self.prefix_cache._caches), "threads": self.threads}

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ----------------------------------------------------------------------------------------
    def _prune_waiting(self) -> None:
        if any(j.cancelled.is_set() for j in self._waiting):
            self._waiting = deque(j for j in self._waiting if not j.cancelled.is_set())

    def _start(self, job: Job) -> None:
        r = job.request
        job.cache = self.prefix_cache.take(r.prompt_ids)
        job.sampler = RequestSampler(r.sampling, r.logit_bias, r.presence_penalty,
                                     r.frequency_penalty, r.top_logprobs)
        job.gen = stream_generate(self.model, self.tokenizer, list(r.prompt_ids), r.max_tokens,
                                  stop=list(r.stop) or None, cache=job.cache,
                                  sampler=job.sampler)

    def _finish(self, job: Job, event=None) -> None:
        self._active.remove(job)
        if job.gen is not None:
            job.gen.close()
        if job.cache is not None:
            self.prefix_cache.put(job.cache)
            job.cache = None
        if not job.cancelled.is_set():
            _deliver(job, event)

    def _run(self) -> None:
        set_num_threads(self.threads)
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closed:
                    break
                while self._waiting and len(self._active) < self.max_concurrent:
                    job = self._waiting.popleft()
                    if not job.cancelled.is_set():
                        self._active.append(job)
            for job in list(self._active):  # one step of each stream, round-robin
                self._step(job)
        with self._cond:
            jobs = list(self._active) + list(self._waiting)
            self._active.clear()
            self._waiting.clear()
        for job in jobs:
            _deliver(job, SchedulerClosedError("the server is shutting down"))

    def _step(self, job: Job) -> None:
        if job.cancelled.is_set():
            with self._cond:
                self._finish(job)
            return
        try:
            if job.gen is None:
                self._start(job)
            chunk = next(job.gen)
        except StopIteration:
            chunk = None
        except Exception as e:  # reported to this request only; the others keep going
            with self._cond:
                self._finish(job, e)
            return
        if chunk is not None:
            lp = job.sampler.last if (chunk.token is not None and job.sampler.top_logprobs is not None) else None
            _deliver(job, StepEvent(chunk, lp))
        if chunk is None or chunk.finish_reason is not None:
            with self._cond:
                self._finish(job)


def _deliver(job: Job, event) -> None:
    try:
        job.on_event(event)
    except Exception:  # the consumer is gone (e.g. its event loop closed): stop this job
        job.cancel()
