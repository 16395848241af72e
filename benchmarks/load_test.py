"""Bounded load test of the OpenAI-compatible server, on loopback only.

    python benchmarks/load_test.py                       # SmolLM2 if it loads, else a tiny model
    python benchmarks/load_test.py --requests 32 --concurrency 4 --max-tokens 32 --time-limit 60
    python benchmarks/load_test.py --url http://127.0.0.1:8000   # a server already running

Starts `llm-fast serve` in a subprocess unless --url is given, then `concurrency`
client threads send streaming chat completions (distinct questions, seeded sampling) until
`requests` are done or `time-limit` seconds have passed (no new request starts after that, and
requests still running 15 s later are abandoned).
Reports requests/s, latency and time-to-first-token percentiles, and tokens/s: the aggregate
over all streams and the mean per stream.

On a machine shared with other CPU-heavy processes, OpenMP's default wait policy can stall a
decode step for seconds (threads spin for a preempted partner); the environment is passed to
the server, so `OMP_WAIT_POLICY=passive python benchmarks/load_test.py` shows the difference.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlparse

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three colors of the rainbow.",
    "Write one sentence about the sea.",
    "What is 12 plus 30?",
    "Give me a short tip for learning to code.",
    "Why is the sky blue? Answer briefly.",
    "Suggest a name for a small robot.",
    "What do bees make?",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
GRACE_S = 15.0  # after the time limit, requests still running get this long to finish


def start_server(model_arg: str | None, concurrency: int, threads: int | None):
    """(subprocess, url, model id): `python -m llm_fast serve` on a free loopback port, with
    SmolLM2 (or --model), else a tiny random model. A separate process, so the clients here do
    not share the server's interpreter lock."""
    import httpx
    import llm_fast
    from server_util import free_port, make_tiny_chat_model

    name, model_path = "SmolLM2-135M-Instruct", model_arg
    if model_arg is None:
        try:
            llm_fast.loader.default_model_path()
            llm_fast.load_tokenizer(None)
        except Exception as e:
            print(f"# SmolLM2 unavailable ({type(e).__name__}: {e}); using a tiny random model",
                  file=sys.stderr)
            model_path = make_tiny_chat_model(os.path.join(tempfile.mkdtemp(), "tiny-chatml"))
    if model_path is not None:
        name = os.path.basename(model_path.rstrip("/"))
    port = free_port()
    cmd = [sys.executable, "-m", "llm_fast", "serve", "--port", str(port), "--model-id", name,
           "--max-concurrent", str(concurrency), "--max-queue", str(4 * concurrency),
           "--log-level", "warning"]
    if model_path is not None:
        cmd += ["--model", model_path]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url, name
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"llm-fast serve did not start: {proc.communicate()[1]}")
        time.sleep(0.2)


def one_request(client, url: str, body: dict, headers: dict, deadline: float) -> dict:
    """One streamed chat completion; abandoned (status "deadline") past `deadline`."""
    t0 = time.perf_counter()
    ttft, usage, status, pieces = None, None, None, 0
    with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        status = r.status_code
        if status != 200:
            r.read()
            return {"status": status, "latency": time.perf_counter() - t0}
        for line in r.iter_lines():
            if time.perf_counter() > deadline:
                return {"status": "deadline", "latency": time.perf_counter() - t0}
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for ch in chunk.get("choices", []):
                if ch["delta"].get("content"):
                    pieces += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    tokens = usage["completion_tokens"] if usage else pieces
    return {"status": status, "latency": latency, "ttft": ttft if ttft is not None else latency,
            "tokens": tokens, "prompt_tokens": usage["prompt_tokens"] if usage else None}


def run(url: str, n_requests: int, concurrency: int, max_tokens: int, time_limit: float,
        api_key: str | None, model_id: str) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results, lock = [], threading.Lock()
    next_index = [0]
    t_start = time.perf_counter()

    deadline = t_start + time_limit + GRACE_S  # in-flight requests are cut off here

    def worker():
        with httpx.Client(timeout=time_limit + GRACE_S) as client:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= n_requests or time.perf_counter() - t_start > time_limit:
                        return
                    next_index[0] += 1
                body = {"model": model_id, "max_tokens": max_tokens, "temperature": 0.7,
                        "seed": i, "stream": True, "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
                try:
                    res = one_request(client, url, body, headers, deadline)
                except httpx.HTTPError as e:
                    res = {"status": f"{type(e).__name__}", "latency": 0.0}
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    ok = [r for r in results if r["status"] == 200]
    lat = np.array([r["latency"] for r in ok]) if ok else np.zeros(1)
    ttft = np.array([r["ttft"] for r in ok]) if ok else np.zeros(1)
    tokens = sum(r["tokens"] for r in ok)
    per_stream = [(r["tokens"] - 1) / (r["latency"] - r["ttft"]) for r in ok
                  if r["tokens"] > 1 and r["latency"] > r["ttft"]]
    pct = lambda a: {f"p{q}": round(float(np.percentile(a, q)), 3) for q in (50, 90, 99)}
    return {
        "model": model_id, "requests": len(results), "ok": len(ok),
        "errors": {str(s): sum(1 for r in results if r["status"] == s)
                   for s in {r["status"] for r in results if r["status"] != 200}},
        "concurrency": concurrency, "max_tokens": max_tokens, "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3), "latency_s": pct(lat), "ttft_s": pct(ttft),
        "completion_tokens": tokens, "tokens_per_s_total": round(tokens / wall, 1),
        "tokens_per_s_per_stream": round(float(np.mean(per_stream)), 1) if per_stream else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server on loopback (default: start one)")
    p.add_argument("--model", default=None, help="model for the in-process server (default: SmolLM2)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--time-limit", type=float, default=60.0,
                   help="seconds after which no new request starts")
    p.add_argument("--api-key", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads of the server started here (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = p.parse_args(argv)
    if not (1 <= args.requests <= 1000 and 1 <= args.concurrency <= 64 and args.time_limit <= 600):
        p.error("bounded test: requests in [1, 1000], concurrency in [1, 64], time-limit <= 600")
    server = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server below is stopped
    if args.url:
        host = urlparse(args.url).hostname
        if host not in LOOPBACK:
            p.error(f"--url must be a loopback address (127.0.0.1, localhost, ::1), got {host}")
        import httpx
        model_id = httpx.get(args.url.rstrip("/") + "/v1/models", headers=(
            {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})).json()["data"][0]["id"]
        url = args.url.rstrip("/")
    else:
        if args.api_key:
            p.error("--api-key is for --url (the server started here is open, on loopback)")
        server, url, model_id = start_server(args.model, args.concurrency, args.threads)
    try:
        run(url, 2, 1, 4, 30, args.api_key, model_id)  # warm-up (not counted)
        res = run(url, args.requests, args.concurrency, args.max_tokens, args.time_limit,
                  args.api_key, model_id)
        import httpx
        health = httpx.get(url + "/health").json()
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    if args.json:
        print(json.dumps(res))
        return 0
    import llm_fast
    threads = args.threads or ("server's" if args.url else llm_fast.get_num_threads())
    print(f"load test: {res['model']} on {url} ({os.cpu_count()} CPUs, {threads} threads, "
          f"SIMD {llm_fast.simd_level()}, n_ctx {health['n_ctx']})")
    print(f"  {res['ok']}/{res['requests']} requests ok, errors {res['errors'] or 'none'}; "
          f"concurrency {res['concurrency']}, max_tokens {res['max_tokens']}, wall {res['wall_s']} s")
    print(f"  throughput      {res['requests_per_s']:.2f} requests/s, "
          f"{res['tokens_per_s_total']} completion tokens/s in total "
          f"({res['tokens_per_s_per_stream']} tokens/s per stream)")
    lat, ttft = res["latency_s"], res["ttft_s"]
    print(f"  latency (s)     p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}")
    print(f"  first token (s) p50 {ttft['p50']:.3f}  p90 {ttft['p90']:.3f}  p99 {ttft['p99']:.3f}")
    return 0 if res["ok"] == res["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
