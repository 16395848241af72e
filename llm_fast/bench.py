"""`llm-fast bench`: prompt processing and generation speed, like llama-bench.

For each model and each test it runs warm-up passes, then repetitions, and reports the median
tokens/s (the standard deviation and the best repetition too). Every (model, engine) pair lives
in its own worker process and the engines take turns repetition by repetition, so a burst of
load from other work on the machine hits them alike:

- ppN: a prompt of N tokens in one forward (logits of the last token), after `depth` tokens
  already in the cache;
- tgN: N tokens decoded one at a time (greedy: each step feeds the argmax of the previous
  logits), starting after `depth` tokens in the cache.

Physics next to the speed: for tg, achieved GB/s = bytes of weights read per token
(Weights.nbytes()) x tokens/s, and the memory read bandwidth of the machine measured in the same
run (the best of 3 streaming reads of a 1 GiB buffer, right before every tg repetition, since
other work on the machine changes it); `%bw` is the median of the per-repetition ratios. The peak RSS
of each loaded model (above the process's RSS before loading) is reported too.

Peers, side by side in the same run: `--compare numpy` (llm_fast.reference, float32 NumPy),
`--compare torch` (transformers LlamaForCausalLM on the same weights, when torch and
transformers are importable), `--compare llama-cpp` (llama-cpp-python, when installed, on the
same GGUF file, or for other models on an F32 GGUF export of the same weights made by
llm_fast.gguf_export). Models are paths (Hugging Face folder or .gguf) or `synthetic:NAME` (see
llm_fast.synthetic: seeded random weights at real shapes, built in memory).
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np

ENGINES = ("llm_fast", "numpy", "torch", "llama-cpp")
BW_BYTES = 1 << 30
# Pause before handing the cores to the next engine's worker: the threads of the previous one
# (OpenMP, OpenBLAS) keep spinning for a while after their last work and would slow it down.
COOL_DOWN = 0.1


class BenchError(ValueError):
    """A bench argument or model that cannot be run, reported as one line."""


@dataclass
class Result:
    model: str
    params: int
    weights_bytes: int
    engine: str
    test: str            # "pp128", "tg128"
    depth: int
    threads: int
    tokens: int
    tps: list = field(default_factory=list)   # tokens/s of each repetition
    bw: list = field(default_factory=list)    # GB/s measured right before each tg repetition
    rss_bytes: int = 0
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.tps) if self.tps else float("nan")

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.tps) if len(self.tps) > 1 else 0.0

    @property
    def best(self) -> float:
        return max(self.tps) if self.tps else float("nan")

    @property
    def gbs(self) -> float:
        """Achieved weight-read GB/s (meaningful for tg: every token reads all weights once)."""
        return self.median * self.weights_bytes / 1e9 if self.test.startswith("tg") else float("nan")

    @property
    def bw_median(self) -> float:
        return statistics.median(self.bw) if self.bw else float("nan")

    @property
    def pct_bw(self) -> float:
        if not self.bw or not self.test.startswith("tg"):
            return float("nan")
        return 100 * statistics.median(t * self.weights_bytes / 1e9 / b for t, b in zip(self.tps, self.bw))

    def row(self) -> dict:
        d = asdict(self)
        d.update(median_tps=self.median, stdev_tps=self.stdev, best_tps=self.best,
                 achieved_gbs=self.gbs,
                 bandwidth_gbs=self.bw_median, pct_bandwidth=self.pct_bw)
        return d


# ------------------------------------------------------------------------------------------------
# memory bandwidth


class BandwidthProbe:
    """Streaming read of a 1 GiB float32 buffer by the compiled kernels (all threads); GB/s."""

    def __init__(self, nbytes: int = BW_BYTES):
        from ._kernels import linalg
        self._read = linalg.stream_read
        self.buf = np.ones(nbytes // 4, np.float32)  # numpy asks for transparent huge pages

    def measure(self, threads: int, reps: int = 1) -> float:
        best = 0.0
        for _ in range(reps):
            t = time.perf_counter()
            self._read(self.buf, threads)
            best = max(best, self.buf.nbytes / (time.perf_counter() - t) / 1e9)
        return best


# ------------------------------------------------------------------------------------------------
# models


@dataclass
class ModelSpec:
    name: str
    config: object
    weights: object
    gguf_path: Optional[str] = None
    gguf: object = None          # the parsed GGUF file (gguf_file.GGUFModel), for page release


def load_spec(spec: str) -> ModelSpec:
    from .config import ModelConfig
    if spec.startswith("synthetic:"):
        from . import synthetic
        name = spec.split(":", 1)[1]
        config, weights = synthetic.build(name)
        return ModelSpec(spec, config, weights)
    from .loader import resolve_model_path
    path = resolve_model_path(spec)
    if os.path.isfile(path):
        from .gguf_file import load_gguf
        from .weights import build_weights_from_dict
        g = load_gguf(path)
        config = ModelConfig.from_dict(g.config, source=path)
        return ModelSpec(spec, config, build_weights_from_dict(config, g.tensors, path), path, g)
    from .weights import load_safetensors_weights
    config = ModelConfig.from_file(os.path.join(path, "config.json"))
    return ModelSpec(spec, config, load_safetensors_weights(path, config))


def n_params(config) -> int:
    from .synthetic import n_params as count
    return count(config)


# ------------------------------------------------------------------------------------------------
# engines: new(max_len) -> state; prefill(state, ids) ; step(state, tok) -> next token


class LlmFastEngine:
    name = "llm_fast"

    def __init__(self, spec: ModelSpec, threads: int, activations: Optional[str] = None):
        from .kernels import set_num_threads
        from .model import Model
        set_num_threads(threads)
        self.model = Model(spec.config, spec.weights)
        if spec.gguf is not None:   # as llm_fast.load does
            spec.gguf.release_unused_pages(self.model.weights.arrays())
        if activations:
            self.model.set_activations(activations)

    def new(self, max_len):
        return self.model.new_cache(max_len)

    def prefill(self, cache, ids):
        self.model.forward(ids, cache, logits="last")

    def step(self, cache, tok):
        return int(np.argmax(self.model.forward([tok], cache)))


class NumpyEngine:
    name = "numpy"

    def __init__(self, spec: ModelSpec, threads: int):
        from .reference import ReferenceModel
        _limit_blas_threads(threads)
        self.model = ReferenceModel(spec.config, spec.weights, np.float32)

    def new(self, max_len):
        return self.model.new_cache(max_len)

    def prefill(self, cache, ids):
        self.model.forward(ids, cache)

    def step(self, cache, tok):
        return int(np.argmax(self.model.forward([tok], cache)[-1]))


class TorchEngine:
    name = "torch"

    def __init__(self, spec: ModelSpec, threads: int):
        try:
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError as e:
            raise BenchError(f"--compare torch needs torch and transformers ({e})") from None
        self.torch = torch
        torch.set_num_threads(threads)
        c = spec.config
        hf_config = LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
            tie_word_embeddings=c.tie_word_embeddings, torch_dtype="float32")
        hf_config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = LlamaForCausalLM(hf_config)
        model.load_state_dict(_hf_state_dict(c, spec.weights, torch), strict=False, assign=True)
        if c.tie_word_embeddings:
            model.tie_weights()
        self.model = model.eval()
        # the rotary inv_freq buffer was created on the meta device: rebuild it on the CPU
        rot = self.model.model.rotary_emb
        from .rope import inv_frequencies
        inv = torch.from_numpy(inv_frequencies(c).astype(np.float32))
        rot.inv_freq = inv
        if hasattr(rot, "original_inv_freq"):
            rot.original_inv_freq = inv

    def new(self, max_len):
        from transformers import DynamicCache
        return {"past": DynamicCache(), "pos": 0}

    def _run(self, state, ids):
        torch = self.torch
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long)
            out = self.model(input_ids=x, past_key_values=state["past"], use_cache=True,
                             logits_to_keep=1)
        state["past"] = out.past_key_values
        state["pos"] += len(ids)
        return out.logits[0, -1]

    def prefill(self, state, ids):
        self._run(state, [int(t) for t in ids])

    def step(self, state, tok):
        return int(self._run(state, [tok]).argmax())


class LlamaCppEngine:
    name = "llama-cpp"

    def __init__(self, spec: ModelSpec, threads: int):
        try:
            import llama_cpp
        except ImportError:
            raise BenchError("--compare llama-cpp needs llama-cpp-python (pip install "
                             "llama-cpp-python)") from None
        path, tmp = spec.gguf_path, None
        if path is None:
            # not a GGUF model: export the same weights (F32) to a temporary GGUF file, which
            # llama.cpp memory-maps; the file is unlinked once loaded, and our copy of the
            # weights is dropped so the RSS is llama.cpp's alone
            import tempfile
            from .gguf_export import write_gguf
            fd, tmp = tempfile.mkstemp(suffix=".gguf", prefix="llm_fast_bench_")
            os.close(fd)
            write_gguf(tmp, spec.config, spec.weights, name=spec.name)
            spec.weights = None
            gc.collect()
            _reset_peak_rss()
            path = tmp
        try:
            self.llm = llama_cpp.Llama(model_path=path, n_ctx=spec.config.max_position_embeddings,
                                       n_threads=threads, n_threads_batch=threads, n_batch=512,
                                       logits_all=False, verbose=False)
        finally:
            if tmp is not None:
                os.unlink(tmp)

    def new(self, max_len):
        self.llm.reset()
        return self.llm

    def prefill(self, llm, ids):
        llm.eval([int(t) for t in ids])

    def step(self, llm, tok):
        llm.eval([tok])
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))


def _hf_state_dict(c, w, torch) -> dict:
    """transformers Llama parameter names -> float32 tensors sharing our weights' memory."""
    def t(a):
        a = a if isinstance(a, np.ndarray) else a.dequantize()
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    sd = {"model.embed_tokens.weight": t(w.embed_tokens), "model.norm.weight": t(w.norm)}
    if not c.tie_word_embeddings:
        sd["lm_head.weight"] = t(w.lm_head)
    q, kv, inter = c.q_dim, c.kv_dim, c.intermediate_size
    for i, lw in enumerate(w.layers):
        p = f"model.layers.{i}."
        qkv, gu = t(lw.qkv_proj), t(lw.gate_up_proj)
        sd.update({
            p + "input_layernorm.weight": t(lw.input_layernorm),
            p + "post_attention_layernorm.weight": t(lw.post_attention_layernorm),
            p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight": qkv[q:q + kv],
            p + "self_attn.v_proj.weight": qkv[q + kv:], p + "self_attn.o_proj.weight": t(lw.o_proj),
            p + "mlp.gate_proj.weight": gu[:inter], p + "mlp.up_proj.weight": gu[inter:],
            p + "mlp.down_proj.weight": t(lw.down_proj),
        })
    return sd


def _limit_blas_threads(threads: int) -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return  # OpenBLAS keeps its own default (all cores)
    threadpool_limits(threads)


_ENGINE_CLASSES = {"llm_fast": LlmFastEngine, "numpy": NumpyEngine, "torch": TorchEngine,
                   "llama-cpp": LlamaCppEngine}


def available_peers() -> list:
    """The --compare engines importable here."""
    import importlib.util
    out = ["numpy"]
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        out.append("torch")
    if importlib.util.find_spec("llama_cpp"):
        out.append("llama-cpp")
    return out


# ------------------------------------------------------------------------------------------------
# running


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _prompt(rng, vocab: int, n: int) -> list:
    lo = 3 if vocab > 16 else 0   # skip the usual special ids
    return rng.integers(lo, vocab, n).tolist()


def run_test(engine, vocab: int, kind: str, n: int, depth: int, reps: int, warmup: int,
             probe: Optional[BandwidthProbe], threads: int, seed: int = 0) -> tuple:
    """(tokens/s per repetition, GB/s measured before each repetition)."""
    rng = np.random.default_rng(seed)
    tps, bws = [], []
    for r in range(warmup + reps):
        bw = None
        if kind == "tg" and probe is not None and r >= warmup:
            bw = probe.measure(threads, reps=3)   # best of 3 passes over 1 GiB
        # Wake the engine's threads and bring its weights back into the caches (after the
        # bandwidth probe or another engine's turn) with an untimed short run.
        scratch = engine.new(min(n, 16) + 1)
        if kind == "pp":
            engine.prefill(scratch, _prompt(rng, vocab, min(n, 16)))
        else:
            engine.step(scratch, engine.step(scratch, 1))
        del scratch
        state = engine.new(depth + n + (1 if kind == "tg" else 0))
        if depth:
            engine.prefill(state, _prompt(rng, vocab, depth))
        if kind == "pp":
            ids = _prompt(rng, vocab, n)
            t0 = time.perf_counter()
            engine.prefill(state, ids)
            dt = time.perf_counter() - t0
        else:
            tok = int(_prompt(rng, vocab, 1)[0])
            t0 = time.perf_counter()
            for _ in range(n):
                tok = engine.step(state, tok)
            dt = time.perf_counter() - t0
        if r >= warmup:
            tps.append(n / dt)
            if bw is not None:
                bws.append(bw)
    return tps, bws


def parse_int_list(name: str, text: str, minimum: int = 0) -> list:
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = int(part)
        except ValueError:
            raise BenchError(f"{name}: {part!r} is not an integer") from None
        if v < minimum:
            raise BenchError(f"{name}: {v} is below {minimum}")
        out.append(v)
    return out


def machine_info(threads: int, probe: Optional[BandwidthProbe]) -> dict:
    from .kernels import simd_level
    info = {"threads": threads, "python": platform.python_version(), "numpy": np.__version__,
            "cpu": _cpu_name(), "simd": simd_level()}
    if probe is not None:
        info["bandwidth_gbs"] = probe.measure(threads, reps=5)
    return info


class _EngineWorker:
    """One (model, engine) pair loaded in its own process, running one repetition at a time on
    request (stdin/stdout, one JSON line each): the parent interleaves the engines repetition
    by repetition, so a burst of load from other work on the machine hits all of them."""

    def __init__(self, spec_text: str, engine: str, threads: int, bandwidth: bool):
        import subprocess
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        if engine.startswith("llm_fast"):
            env["OPENBLAS_NUM_THREADS"] = "1"   # no idle BLAS threads next to our kernels
        job = {"model": spec_text, "engine": engine, "threads": threads, "bandwidth": bandwidth}
        self.name = f"{spec_text} ({engine})"
        self.proc = subprocess.Popen([sys.executable, "-m", "llm_fast.bench", "--serve",
                                      json.dumps(job)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None, env=env, text=True)
        self.info = self._read()     # {"params", "weights_bytes", "context", "vocab"}

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise BenchError(f"{self.name}: the worker exited (status {self.proc.returncode})")
        msg = json.loads(line)
        if "error" in msg:
            raise BenchError(f"{self.name}: {msg['error']}")
        return msg

    def run(self, kind: str, n: int, depth: int, reps: int, warmup: int) -> dict:
        self.proc.stdin.write(json.dumps({"kind": kind, "n": n, "depth": depth, "reps": reps,
                                          "warmup": warmup}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def rss(self) -> int:
        return self.run("rss", 0, 0, 0, 0)["rss_bytes"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def _serve(job_text: str) -> int:
    """Worker side of _EngineWorker."""
    job = json.loads(job_text)
    out = sys.stdout

    def send(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    probe = BandwidthProbe() if job["bandwidth"] else None   # allocated before the baseline
    try:
        gc.collect()
        rss0 = _rss_bytes()
        have_reset = _reset_peak_rss()
        spec = load_spec(job["model"])
        weights_bytes = spec.weights.nbytes()
        name, _, mode = job["engine"].partition(":")   # "llm_fast:q8": an activation mode
        engine = (_ENGINE_CLASSES[name](spec, job["threads"], mode) if mode
                  else _ENGINE_CLASSES[name](spec, job["threads"]))
        c = spec.config
        send({"params": n_params(c), "weights_bytes": weights_bytes,
              "context": c.max_position_embeddings, "vocab": c.vocab_size})
    except (ValueError, OSError, ImportError) as e:
        send({"error": str(e)})
        return 1
    for line in sys.stdin:
        req = json.loads(line)
        if req["kind"] == "rss":
            # weights + engine state + caches, above the process before loading
            send({"rss_bytes": (_peak_rss_bytes() if have_reset else _rss_bytes()) - rss0})
            continue
        tps, bws = run_test(engine, c.vocab_size, req["kind"], req["n"], req["depth"],
                            req["reps"], req["warmup"], probe, job["threads"])
        send({"tps": tps, "bw": bws})
    return 0


def run(models: list, pp: list, tg: list, depths: list, reps: int, warmup: int, threads: int,
        engines: list, log: Callable = print, bandwidth: bool = True) -> tuple:
    """Benchmark every model with every engine; returns (results, machine info).

    Each (model, engine) pair lives in its own worker process: OpenMP runtimes of different
    engines (ours, torch's) never compete for the cores, and each peak RSS belongs to one model.
    The workers of a model run their repetitions in turn (engine A rep 1, engine B rep 1, ...),
    so the load of other work on the machine hits every engine alike."""
    probe = BandwidthProbe() if bandwidth else None
    machine = machine_info(threads, probe)
    del probe
    if "bandwidth_gbs" in machine:
        log(f"memory read bandwidth ({threads} threads, 1 GiB): {machine['bandwidth_gbs']:.1f} GB/s")
    results = []
    for spec_text in models:
        workers = []
        try:
            for eng in engines:
                log(f"loading {spec_text} ({eng}) ...")
                workers.append(_EngineWorker(spec_text, eng, threads, bandwidth))
            info = workers[0].info
            for depth in depths:
                for kind, sizes in (("pp", pp), ("tg", tg)):
                    for n in sizes:
                        res = {w: Result(spec_text, info["params"], info["weights_bytes"], eng,
                                         f"{kind}{n}", depth, threads, n)
                               for w, eng in zip(workers, engines)}
                        need = depth + n + (1 if kind == "tg" else 0)
                        if need > info["context"]:
                            for r in res.values():
                                r.note = f"skipped: needs {need} positions, context is {info['context']}"
                            log(f"  {kind}{n} @ d{depth}: {r.note}")
                            results += res.values()
                            continue
                        for w in workers:
                            if warmup:
                                w.run(kind, n, depth, 0, warmup)
                        for _ in range(reps):
                            for w in workers:
                                if len(workers) > 1:
                                    time.sleep(COOL_DOWN)
                                got = w.run(kind, n, depth, 1, 0)
                                res[w].tps += got["tps"]
                                res[w].bw += got["bw"]
                        for w, r in res.items():
                            log(f"  {r.engine:9s} {r.test:6s} @ d{depth:<5d} {r.median:10.1f} t/s"
                                + (f"  {r.gbs:6.1f} GB/s ({r.pct_bw:.0f}% of {r.bw_median:.1f} "
                                   f"measured)" if kind == "tg" and r.bw else ""))
                        results += res.values()
            for w in workers:
                rss = w.rss()
                for r in results:
                    if r.model == spec_text and r.engine == engines[workers.index(w)]:
                        r.rss_bytes = rss
        finally:
            for w in workers:
                w.close()
    return results, machine


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------------------
# output


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _short(model: str) -> str:
    """A model's name for the table: a path's last component (CSV/JSON keep the full text)."""
    return model if model.startswith("synthetic:") else os.path.basename(model.rstrip("/")) or model


def format_table(results: list, machine: dict) -> str:
    head = ["model", "params", "MiB", "engine", "test", "t/s", "±", "best", "GB/s", "bw GB/s",
            "%bw", "RSS MiB", "vs llm_fast"]
    ours = next((r.engine for r in results if r.engine.startswith("llm_fast")), "llm_fast")
    base = {(r.model, r.test, r.depth): r.median for r in results if r.engine == ours}
    rows = []
    for r in results:
        test = r.test + (f" @ d{r.depth}" if r.depth else "")
        if r.note:
            rows.append([_short(r.model), f"{r.params / 1e6:.1f}M", f"{r.weights_bytes / 2**20:.1f}",
                         r.engine, test, r.note, "", "", "", "", "", "", ""])
            continue
        ref = base.get((r.model, r.test, r.depth))
        rel = "" if r.engine == ours or not ref else f"{ref / r.median:.2f}x faster"
        rows.append([_short(r.model), f"{r.params / 1e6:.1f}M", f"{r.weights_bytes / 2**20:.1f}", r.engine,
                     test, _fmt(r.median, ",.1f"), _fmt(r.stdev, ",.1f"), _fmt(r.best, ",.1f"),
                     _fmt(r.gbs, ".1f"),
                     _fmt(r.bw_median, ".1f"), _fmt(r.pct_bw, ".0f"),
                     f"{r.rss_bytes / 2**20:.0f}", rel])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) if i >= 5 else str(c).ljust(w)
                                          for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    out = [line(head), "|" + "|".join(("-" * (w + 1) + ":") if i >= 5 else "-" * (w + 2)
                                      for i, w in enumerate(widths)) + "|"]
    out += [line(r) for r in rows]
    info = (f"{machine.get('cpu', '?')}, {machine['threads']} threads, SIMD {machine.get('simd')}"
            + (f", memory read bandwidth {machine['bandwidth_gbs']:.1f} GB/s at start"
               if "bandwidth_gbs" in machine else ""))
    return "\n".join(out) + "\n\n" + info + (f"\n'vs llm_fast': how many times faster {ours} is "
                                             "than that engine on the same test.")


def write_csv(path: str, results: list) -> None:
    rows = [r.row() for r in results]
    keys = ["model", "params", "weights_bytes", "engine", "test", "depth", "threads", "tokens",
            "median_tps", "stdev_tps", "best_tps", "achieved_gbs", "bandwidth_gbs", "pct_bandwidth",
            "rss_bytes", "note"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_json(path: str, results: list, machine: dict) -> None:
    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v
    rows = [{k: clean(v) for k, v in r.row().items()} for r in results]
    with open(path, "w") as f:
        json.dump({"machine": machine, "results": rows}, f, indent=1)


def plot(path: str, results: list, machine: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib (pip install matplotlib)") from None
    tests = sorted({(r.test, r.depth) for r in results if r.tps},
                   key=lambda t: (t[0][:2], int(t[0][2:]), t[1]))
    if not tests:
        raise BenchError("--plot: no measured results to plot")
    fig, axes = plt.subplots(1, len(tests), figsize=(5.2 * len(tests), 4.2), squeeze=False)
    for ax, (test, depth) in zip(axes[0], tests):
        for eng in dict.fromkeys(r.engine for r in results):
            pts = sorted((r.params, r.median) for r in results
                         if r.engine == eng and r.test == test and r.depth == depth and r.tps)
            if pts:
                ax.plot([p / 1e6 for p, _ in pts], [v for _, v in pts], "o-", label=eng)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel("tokens / s")
        ax.set_title(test + (f" @ depth {depth}" if depth else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"llm-fast bench: {machine.get('cpu', '')}, {machine['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# CLI


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="prompt-processing and generation speed (like llama-bench)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "-m", action="append", default=None,
                   help="model folder, .gguf file or synthetic:NAME (repeatable or comma list; "
                        "default: synthetic:story-656k). Synthetic names: "
                        "story-656k, 15m, 32m, 42m, 110m, smollm2-135m")
    p.add_argument("-p", "--n-prompt", default="128,512",
                   help="prompt lengths for ppN tests, comma list (default 128,512; '' for none)")
    p.add_argument("-n", "--n-gen", default="128",
                   help="generated tokens for tgN tests, comma list (default 128; '' for none)")
    p.add_argument("-d", "--depth", default="0",
                   help="tokens already in the cache before each test, comma list (default 0)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--threads", "-t", type=int, default=None,
                   help="threads for every engine (default: all cores)")
    p.add_argument("--compare", action="append", default=None,
                   help="also run peers: numpy, torch, llama-cpp, all (repeatable or comma list)")
    p.add_argument("--activations", default=None,
                   help="llm_fast activation modes for quantized models, comma list of auto, q8, "
                        "q8x2, f32: one llm_fast engine per mode, side by side (default: auto)")
    p.add_argument("--no-bandwidth", action="store_true",
                   help="skip the memory bandwidth measurements")
    p.add_argument("--csv", default=None, help="write the results as CSV")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.add_argument("--plot", default=None, help="write a PNG of tokens/s per model size")
    p.set_defaults(func=cmd_bench)


def _split(values) -> list:
    out = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def cmd_bench(args) -> int:
    models = _split(args.model) or ["synthetic:story-656k"]
    pp = parse_int_list("-p", args.n_prompt, 1)
    tg = parse_int_list("-n", args.n_gen, 1)
    depths = parse_int_list("--depth", args.depth, 0) or [0]
    if not pp and not tg:
        raise BenchError("nothing to run: -p and -n are both empty")
    if args.repetitions < 1:
        raise BenchError(f"--repetitions must be >= 1, got {args.repetitions}")
    if args.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {args.warmup}")
    threads = args.threads if args.threads is not None else (os.cpu_count() or 1)
    if threads < 1:
        raise BenchError(f"--threads must be >= 1, got {threads}")
    peers = _split(args.compare)
    if "all" in peers:
        peers = available_peers()
    for e in peers:
        if e not in ENGINES[1:]:
            raise BenchError(f"--compare: unknown engine {e!r} (choose from numpy, torch, "
                             f"llama-cpp, all)")
    from .quant import ACTIVATION_MODES
    modes = _split([args.activations]) if args.activations else []
    for m in modes:
        if m not in ACTIVATION_MODES:
            raise BenchError(f"--activations: unknown mode {m!r} (choose from "
                             f"{', '.join(ACTIVATION_MODES)})")
    ours = [f"llm_fast:{m}" if m != "auto" else "llm_fast" for m in dict.fromkeys(modes)]
    engines = (ours or ["llm_fast"]) + [e for e in ENGINES[1:] if e in peers]
    for spec in models:
        if spec.startswith("synthetic:"):
            from .synthetic import SHAPES
            if spec.split(":", 1)[1] not in SHAPES:
                raise BenchError(f"unknown synthetic model {spec!r} (known: "
                                 f"{', '.join('synthetic:' + n for n in SHAPES)})")
        else:
            from .loader import resolve_model_path
            resolve_model_path(spec)  # a missing path fails here, before any work
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--plot needs matplotlib (pip install matplotlib)") from None
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    results, machine = run(models, pp, tg, depths, args.repetitions, args.warmup, threads,
                           engines, log=log, bandwidth=not args.no_bandwidth)
    print(format_table(results, machine))
    if args.csv:
        write_csv(args.csv, results)
    if args.json:
        write_json(args.json, results, machine)
    if args.plot:
        plot(args.plot, results, machine)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        sys.exit(_serve(sys.argv[2]))
    print("usage: llm-fast bench ... (this module's entry point is the llm-fast CLI)", file=sys.stderr)
    sys.exit(2)
