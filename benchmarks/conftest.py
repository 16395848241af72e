"""pytest-benchmark helpers: every kernel benchmark records its throughput next to NumPy's, and
the session ends with one summary table (llm_fast vs numpy, same shapes, same run)."""
from __future__ import annotations

import os

import numpy as np
import pytest

import llm_fast

ROWS: list = []


@pytest.fixture
def record(benchmark):
    """record(group, impl, flops=..., nbytes=...) after benchmark(...) has run: stores the
    median time and GFLOP/s / GB/s in extra_info and in the session summary."""

    def _record(group: str, impl: str, flops: float = 0.0, nbytes: float = 0.0):
        t = benchmark.stats.stats.median
        info = {"median_us": t * 1e6}
        if flops:
            info["gflops"] = flops / t / 1e9
        if nbytes:
            info["gbs"] = nbytes / t / 1e9
        benchmark.extra_info.update(info)
        ROWS.append((group, impl, info))

    return _record


def pytest_report_header(config):
    blas = "unset" if "OPENBLAS_CORETYPE" not in os.environ else os.environ["OPENBLAS_CORETYPE"]
    return (f"llm_fast {llm_fast.__version__}: SIMD {llm_fast.simd_level()}, "
            f"{llm_fast.get_num_threads()} threads; numpy {np.__version__}, "
            f"OPENBLAS_CORETYPE={blas}")


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("llm_fast vs numpy (median time, throughput)")
    groups: dict = {}
    for group, impl, info in ROWS:
        groups.setdefault(group, {})[impl] = info
    tr.write_line(f"{'kernel / shape':58s} {'llm_fast':>22s} {'numpy':>22s} {'speedup':>8s}")

    def fmt(info):
        if info is None:
            return "-"
        if "gflops" in info:
            return f"{info['median_us']:9.1f}us {info['gflops']:6.1f}GF/s"
        if "gbs" in info:
            return f"{info['median_us']:9.1f}us {info['gbs']:6.1f}GB/s"
        return f"{info['median_us']:9.1f}us"

    for group, impls in groups.items():
        ours, ref = impls.get("llm_fast"), impls.get("numpy")
        speed = f"{ref['median_us'] / ours['median_us']:7.2f}x" if ours and ref else ""
        tr.write_line(f"{group:58s} {fmt(ours):>22s} {fmt(ref):>22s} {speed:>8s}")
