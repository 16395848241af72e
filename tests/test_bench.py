"""`llm-fast bench`: a short real run (tiny synthetic model, 1 repetition) and its one-line
errors. Speeds are not checked here (the machine is shared); the benchmarks live in benchmarks/."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llm_fast import bench


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llm_fast", "bench", *args],
                          capture_output=True, text=True, timeout=300)


def test_bench_runs_and_writes_csv_json(tmp_path):
    js, cs = tmp_path / "r.json", tmp_path / "r.csv"
    res = _cli("-m", "synthetic:story-656k", "-p", "16", "-n", "8", "-d", "0,4", "-r", "2",
               "--warmup", "0", "--compare", "numpy", "--json", str(js), "--csv", str(cs))
    assert res.returncode == 0, res.stderr
    assert "| synthetic:story-656k" in res.stdout and "pp16" in res.stdout and "tg8" in res.stdout
    assert "memory read bandwidth" in res.stdout + res.stderr
    data = json.loads(js.read_text())
    rows = data["results"]
    assert {(r["engine"], r["test"], r["depth"]) for r in rows} == {
        (e, t, d) for e in ("llm_fast", "numpy") for t in ("pp16", "tg8") for d in (0, 4)}
    for r in rows:
        assert len(r["tps"]) == 2 and r["median_tps"] > 0
        if r["test"] == "tg8":
            assert r["achieved_gbs"] > 0 and r["bandwidth_gbs"] > 0
    assert data["machine"]["bandwidth_gbs"] > 0
    assert cs.read_text().splitlines()[0].startswith("model,params,weights_bytes,engine,test")


def test_bench_skips_tests_beyond_the_context():
    res = _cli("-m", "synthetic:story-656k", "-p", "", "-n", "4", "-d", "510", "-r", "1",
               "--warmup", "0", "--no-bandwidth")
    assert res.returncode == 0, res.stderr
    assert "skipped: needs 515 positions, context is 512" in res.stdout


@pytest.mark.parametrize("args,msg", [
    (["-m", "synthetic:7b"], "unknown synthetic model 'synthetic:7b'"),
    (["-p", "x"], "-p: 'x' is not an integer"),
    (["--compare", "jax"], "--compare: unknown engine 'jax'"),
    (["-p", "", "-n", ""], "nothing to run"),
    (["-m", "/nonexistent/model"], "does not exist"),
])
def test_bench_errors_are_one_line(args, msg):
    res = _cli(*args, "--no-bandwidth", "-r", "1")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], res.stderr


def test_parse_int_list():
    assert bench.parse_int_list("-p", "128, 512,") == [128, 512]
    with pytest.raises(ValueError, match="below 1"):
        bench.parse_int_list("-n", "0", 1)
