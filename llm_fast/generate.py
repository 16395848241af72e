"""Generation in three levels (as mlx-lm): generate_step -> stream_generate -> generate.

generate_step yields token ids (prefill once, then one decode forward per token);
stream_generate turns them into text pieces with stop tokens, stop strings (held back so a stop
string is never half-printed), max_new_tokens, the context limit and timings;
generate collects the pieces into one result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from .cache import KVCache
from .model import Model
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer


@dataclass
class GenerationChunk:
    text: str                      # new text (may be "" while a character or stop string is pending)
    token: Optional[int]           # the token produced at this step (None on the final flush)
    finish_reason: Optional[str]   # None while generating, then "stop" or "length"
    prompt_tokens: int
    generated_tokens: int
    prompt_tps: float
    generation_tps: float
    reused_tokens: int = 0         # prompt tokens whose KV rows were already in the cache


@dataclass
class GenerationResult:
    text: str
    token_ids: list
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    prompt_tps: float
    generation_tps: float
    reused_tokens: int = 0
    timings: dict = field(default_factory=dict)


def prefill(model: Model, prompt_ids: Sequence[int], cache: KVCache) -> tuple:
    """Bring the cache to hold exactly prompt_ids, reusing its longest common prefix.

    Returns (logits of the last prompt token, number of reused tokens). At least the last
    prompt token is always computed, since its logits are needed.
    """
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise ValueError("the prompt is empty (no tokens)")
    if len(ids) > cache.max_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, more than the context of "
                         f"{cache.max_len}")
    reuse = min(cache.common_prefix(ids), len(ids) - 1)
    cache.trim(reuse)
    logits = model.forward(ids[reuse:], cache)
    return logits, reuse


def generate_step(model: Model, prompt_ids: Sequence[int], cache: KVCache,
                  sampler: Sampler, stats: Optional[dict] = None) -> Iterator[int]:
    """Yield sampled token ids forever (the caller stops). The cache holds the prompt and every
    yielded token except the last one. stats receives prefill time and reuse counts."""
    t0 = time.perf_counter()
    logits, reused = prefill(model, prompt_ids, cache)
    if stats is not None:
        stats["prompt_time"] = time.perf_counter() - t0
        stats["reused_tokens"] = reused
    history = list(prompt_ids)
    while True:
        tok = sampler.sample(logits, history if sampler.params.repetition_penalty != 1.0 else ())
        history.append(tok)
        yield tok
        if cache.remaining == 0:
            return
        logits = model.forward((tok,), cache)


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _as_stop_list(stop) -> list:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    return stops


def stream_generate(model: Model, tokenizer: Tokenizer, prompt: Union[str, Sequence[int]],
                    max_new_tokens: int = 256, sampling: Optional[SamplingParams] = None,
                    stop: Union[str, Sequence[str], None] = None, cache: Optional[KVCache] = None,
                    eos_token_ids=None, sampler: Optional[Sampler] = None,
                    ) -> Iterator[GenerationChunk]:
    """Yield GenerationChunk objects as text is produced; the last one has finish_reason set.

    prompt: text (encoded with the tokenizer's special tokens, e.g. BOS) or token ids.
    cache: reuse a KVCache (its common prefix with the prompt is not recomputed); a new one is
    made otherwise. eos_token_ids: the set of ids that end generation (default: the tokenizer's).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    stops = _as_stop_list(stop)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if cache is None:
        cache = model.new_cache()
    if sampler is None:
        sampler = Sampler(sampling or SamplingParams())
    eos = tokenizer.eos_token_ids if eos_token_ids is None else frozenset(eos_token_ids)
    detok = tokenizer.detokenizer(ids)
    stats: dict = {}
    pending = ""           # text decoded but held back (possible start of a stop string)
    n_gen = 0
    t_start = time.perf_counter()
    t_decode = None
    finish = None

    def chunk(text, token, reason):
        now = time.perf_counter()
        pt = stats.get("prompt_time", now - t_start) or 1e-9
        computed = len(ids) - stats.get("reused_tokens", 0)
        gen_time = (now - t_decode) if t_decode is not None else 0.0
        return GenerationChunk(
            text=text, token=token, finish_reason=reason, prompt_tokens=len(ids),
            generated_tokens=n_gen, prompt_tps=computed / pt,
            generation_tps=(n_gen - 1) / gen_time if n_gen > 1 and gen_time > 0 else 0.0,
            reused_tokens=stats.get("reused_tokens", 0))

    for tok in generate_step(model, ids, cache, sampler, stats):
        if t_decode is None:
            t_decode = time.perf_counter()  # decode speed counts tokens after the first
        n_gen += 1
        if tok in eos:
            finish = "stop"
            break
        pending += detok.add(tok)
        if stops:
            hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                yield chunk(pending[:hit], tok, None) if hit else chunk("", tok, None)
                pending = ""
                finish = "stop"
                break
            hold = _stop_holdback(pending, stops)
            out, pending = pending[:len(pending) - hold], pending[len(pending) - hold:]
        else:
            out, pending = pending, ""
        if n_gen >= max_new_tokens or cache.remaining == 0:
            finish = "length"
            yield chunk(out + pending + detok.flush(), tok, None)
            pending = ""
            break
        yield chunk(out, tok, None)
    if finish is None:  # generate_step ended: the context is full
        finish = "length"
    tail = pending
    if finish == "stop" and not stops:
        tail += detok.flush()
    yield chunk(tail, None, finish)


def generate(model: Model, tokenizer: Tokenizer, prompt: Union[str, Sequence[int]],
             max_new_tokens: int = 256, sampling: Optional[SamplingParams] = None,
             stop: Union[str, Sequence[str], None] = None, cache: Optional[KVCache] = None,
             eos_token_ids=None) -> GenerationResult:
    """The whole completion as one GenerationResult (text, ids, finish_reason, speeds)."""
    pieces, tokens, last = [], [], None
    for c in stream_generate(model, tokenizer, prompt, max_new_tokens, sampling, stop, cache,
                             eos_token_ids):
        pieces.append(c.text)
        if c.token is not None:
            tokens.append(c.token)
        last = c
    return GenerationResult(
        text="".join(pieces), token_ids=tokens, finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens, generated_tokens=last.generated_tokens,
        prompt_tps=last.prompt_tps, generation_tps=last.generation_tps,
        reused_tokens=last.reused_tokens)
