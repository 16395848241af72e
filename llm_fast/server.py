"""OpenAI-compatible HTTP server (FastAPI) and the web chat page.

    app = create_app(model, tokenizer, "SmolLM2-135M-Instruct")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, and
GET / (a self-contained chat page). Generation runs in one worker thread (scheduler.py) that
interleaves the decode steps of concurrent requests; the HTTP side only renders prompts,
tokenizes, validates and formats. Streaming is server-sent events (`data: {chunk}` ...
`data: [DONE]`) built from the same events as the non-streaming answer, so both give the same
text for the same seed. A client that disconnects cancels its generation.

Every error is an OpenAI error object {"error": {"message", "type", "param", "code"}}: bad
requests are 400 naming the field (FastAPI's 422 is replaced), a missing or wrong API key is
401, a saturated server answers 429 with Retry-After.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import re
import secrets
import time
from functools import lru_cache
from typing import Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat_template import ChatTemplate, ChatTemplateError
from .model import Model
from .sampling import SamplingParams
from .scheduler import (GenerationRequest, QueueFullError, Scheduler, SchedulerClosedError,
                        StepEvent)
from .server_schema import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                            ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChoiceLogprobs,
                            Completion, CompletionChoice, CompletionLogprobs, CompletionRequest,
                            ModelCard, ModelList, TokenLogprobOut, TopLogprob, Usage)
from .tokenizer import Tokenizer

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_STOP_STRINGS = 16
# How often a waiting non-streaming request checks that its client is still connected.
DISCONNECT_POLL_S = 0.5
_NO_EVENT = object()


class APIError(Exception):
    """An error to answer with an OpenAI error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param, code)


# ---------------------------------------------------------------------------------------------
# Validation errors -> 400 naming the field

_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param_from_loc(loc: Sequence) -> Optional[str]:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; union branch tags are dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (isinstance(part, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part)
              and part not in _TYPE_TAGS):
            out += f".{part}" if out else part
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return _bad("invalid request")
    e = errors[0]
    kind, loc = e.get("type", ""), tuple(e.get("loc", ()))
    if kind == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        pos = loc[1] if len(loc) > 1 else "?"
        return _bad(f"the request body is not valid JSON ({detail} at position {pos})")
    param = _param_from_loc(loc)
    if param is None:
        if kind == "missing":
            return _bad("the request body is missing: expected a JSON object")
        return _bad(f"the request body must be a JSON object ({e.get('msg')})")
    msg = f"{param}: {e.get('msg')}"
    if kind != "missing" and "input" in e:
        got = json.dumps(e["input"], default=str)
        msg += f" (got {got if len(got) <= 80 else got[:77] + '...'})"
    return _bad(msg, param)


# ---------------------------------------------------------------------------------------------
# Token strings and bytes, for logprobs


@lru_cache(maxsize=1)
def _byte_decoder() -> dict:
    """GPT-2 byte-level alphabet: unicode char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """id -> (text, UTF-8 bytes) of one token, as OpenAI's logprobs report it. A token may be
    part of a character (byte-level BPE, byte fallback); its bytes are then exact and its text
    shows the undecodable bytes as U+FFFD."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict = {}

    def __call__(self, token_id: int):
        hit = self._cache.get(token_id)
        if hit is None:
            b = self._bytes(token_id)
            hit = self._cache[token_id] = (b.decode("utf-8", errors="replace"), list(b))
        return hit

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.tk.id_to_token(int(token_id))
        if piece is None:
            return b""
        if token_id in self.tokenizer.special_ids:
            return piece.encode()
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if m:
            return bytes([int(m.group(1), 16)])
        table = _byte_decoder()
        if all(ch in table for ch in piece):
            decoded = self.tokenizer.tk.decode([int(token_id)], skip_special_tokens=False)
            raw = bytes(table[ch] for ch in piece)
            if raw.decode("utf-8", errors="replace") == decoded or "\ufffd" in decoded:
                return raw
        return self.tokenizer.tk.decode([int(token_id)], skip_special_tokens=False).encode()


# ---------------------------------------------------------------------------------------------
# The application


class _ApiKeyMiddleware:
    """Pure ASGI (BaseHTTPMiddleware would break streaming disconnects): /v1/* needs
    `Authorization: Bearer <key>`; / and /health stay open."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                err = APIError(401, "missing or invalid API key: send the header "
                                    "'Authorization: Bearer <key>'", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _resolve_template(chat_template, tokenizer: Tokenizer) -> Optional[ChatTemplate]:
    if isinstance(chat_template, ChatTemplate):
        return chat_template
    tokens = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    if chat_template == "chatml":
        return ChatTemplate.chatml(**tokens)
    if isinstance(chat_template, str):
        return ChatTemplate(chat_template, **tokens)
    if chat_template is not None:
        raise TypeError(f"chat_template must be a ChatTemplate, 'chatml', a template string or "
                        f"None, got {type(chat_template).__name__}")
    if tokenizer.chat_template:
        return ChatTemplate(tokenizer.chat_template, origin="the model's chat template", **tokens)
    return None


def create_app(model: Model, tokenizer: Tokenizer, model_id: str = "llm_fast",
               api_key: Optional[str] = None, max_queue: int = 16,
               chat_template: Union[ChatTemplate, str, None] = None, *,
               max_concurrent: int = 4, prefix_cache_size: int = 4, n_ctx: Optional[int] = None,
               default_max_tokens: Optional[int] = None) -> FastAPI:
    """The FastAPI app serving one model.

    chat_template: a ChatTemplate, "chatml", a Jinja template string, or None for the
    tokenizer's own (without one, /v1/chat/completions answers 400). max_concurrent streams
    decode at once (round-robin); max_queue more may wait; beyond that, 429. prefix_cache_size
    finished KV caches are kept for prompt-prefix reuse (0 disables). n_ctx caps the context
    (default: the model's). default_max_tokens applies to chat requests that set no limit
    (default: until end of turn or the context is full).
    """
    from . import __version__, simd_level

    template = _resolve_template(chat_template, tokenizer)
    scheduler = Scheduler(model, tokenizer, max_concurrent=max_concurrent, max_queue=max_queue,
                          prefix_cache_size=prefix_cache_size, n_ctx=n_ctx)
    created = int(time.time())
    fingerprint = f"llm_fast-{__version__}-{simd_level()}"
    token_text = TokenText(tokenizer)
    with open(os.path.join(STATIC_DIR, "index.html"), encoding="utf-8") as f:
        page = f.read()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    app = FastAPI(title="llm_fast", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.chat_template = template
    if api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)

    # -- errors ----------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, msg, type=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                        type="server_error").response()

    # -- helpers ---------------------------------------------------------------------------
    def generation_request(req, prompt_ids: list, max_tokens: Optional[int],
                           top_logprobs: Optional[int], prompt_param: str) -> GenerationRequest:
        if req.n != 1:
            raise _bad(f"n must be 1 (llm_fast returns one choice per request), got {req.n}", "n")
        n_ctx = scheduler.n_ctx
        if not prompt_ids:
            raise _bad("the prompt is empty (no tokens)", prompt_param)
        if len(prompt_ids) > n_ctx:
            raise _bad(f"the prompt has {len(prompt_ids)} tokens, more than the context of "
                       f"{n_ctx} tokens; shorten it", prompt_param, "context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise _bad(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", "stop")
        if any(s == "" for s in stop):
            raise _bad("stop: stop strings must be non-empty", "stop")
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            if not re.fullmatch(r"\d+", key) or not int(key) < model.config.vocab_size:
                raise _bad(f"logit_bias: keys must be token ids in [0, {model.config.vocab_size}), "
                           f"got {key!r}", "logit_bias")
            if not -100 <= value <= 100:
                raise _bad(f"logit_bias: values must be in [-100, 100], got {value} for token {key}",
                           "logit_bias")
            bias[int(key)] = float(value)
        greedy = req.temperature == 0 or req.top_p == 0
        seed = None if req.seed is None else req.seed % (1 << 64)
        try:
            sampling = SamplingParams(temperature=0.0 if greedy else req.temperature,
                                      top_k=req.top_k, top_p=req.top_p if req.top_p > 0 else 1.0,
                                      min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                                      seed=seed)
        except ValueError as e:
            raise _bad(str(e), str(e).split(" ", 1)[0]) from None
        if max_tokens is None:
            max_tokens = default_max_tokens or n_ctx
        return GenerationRequest(
            prompt_ids=tuple(prompt_ids), max_tokens=int(max_tokens), sampling=sampling,
            stop=tuple(stop), logit_bias=bias, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, top_logprobs=top_logprobs)

    def submit(gen_req: GenerationRequest):
        """Queue a request; returns (job, asyncio.Queue of events)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            job = scheduler.submit(gen_req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFullError as e:
            raise APIError(429, str(e), code="server_busy", type="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except SchedulerClosedError as e:
            raise APIError(503, str(e), code="server_shutting_down", type="server_error") from None
        return job, events

    async def collect(request: Request, job, events: asyncio.Queue):
        """All StepEvents of a non-streaming request (None if the client went away)."""
        out = []
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        try:
            while True:
                try:
                    ev = events.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        ev = await asyncio.wait_for(events.get(), max(next_check - loop.time(), 0.0))
                    except asyncio.TimeoutError:
                        ev = _NO_EVENT
                if loop.time() >= next_check:  # on a clock: events may arrive without a pause
                    if await request.is_disconnected():
                        return None
                    next_check = loop.time() + DISCONNECT_POLL_S
                if ev is _NO_EVENT:
                    continue
                if ev is None:
                    return out
                if isinstance(ev, Exception):
                    raise _as_api_error(ev)
                out.append(ev)
                if ev.chunk.finish_reason is not None:
                    return out
        finally:
            job.cancel()

    def usage(last: StepEvent) -> Usage:
        c = last.chunk
        return Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.generated_tokens,
                     total_tokens=c.prompt_tokens + c.generated_tokens,
                     prompt_tokens_details={"cached_tokens": c.reused_tokens})

    def chat_logprobs(evs) -> Optional[ChoiceLogprobs]:
        items = []
        for ev in evs:
            lp = ev.logprob
            if lp is None:
                continue
            text, b = token_text(lp.token)
            top = [TopLogprob(token=token_text(t)[0], logprob=v, bytes=token_text(t)[1])
                   for t, v in lp.top]
            items.append(TokenLogprobOut(token=text, logprob=lp.logprob, bytes=b, top_logprobs=top))
        return ChoiceLogprobs(content=items)

    def completion_logprobs(evs, offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for ev in evs:
            lp = ev.logprob
            if lp is None:
                continue
            text = token_text(lp.token)[0]
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({token_text(t)[0]: v for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(text)
        return out

    def sse(obj) -> str:
        data = obj if isinstance(obj, str) else obj.model_dump_json()
        return f"data: {data}\n\n"

    def sse_response(job, events, head: list, on_event) -> StreamingResponse:
        """Server-sent events for one job: the `head` chunks, then on_event(ev)'s chunks for
        each generation event up to the one that finishes, then [DONE]. A failure becomes an
        OpenAI error chunk that ends the stream; the job is cancelled however the stream ends
        (a client that goes away stops the generation)."""
        async def stream():
            try:
                for piece in head:
                    yield piece
                while True:
                    ev = await events.get()
                    if ev is None:
                        break
                    if isinstance(ev, Exception):
                        yield sse(json.dumps(_as_api_error(ev).body()))
                        return
                    for piece in on_event(ev):
                        yield piece
                    if ev.chunk.finish_reason is not None:
                        break
                yield sse("[DONE]")
            finally:
                job.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- routes ----------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "auth": bool(api_key),
                "n_ctx": scheduler.n_ctx, **scheduler.stats()}

    @app.get("/v1/models")
    async def list_models():
        return ModelList(data=[ModelCard(id=model_id, created=created)])

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name != model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{model_id!r}", "model", "model_not_found", type="not_found_error")
        return ModelCard(id=model_id, created=created)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if template is None:
            raise _bad("this model ships no chat template; restart the server with "
                       "--chat-template chatml (or a Jinja file), or use /v1/completions",
                       "messages", "no_chat_template")
        if req.tools:
            raise _bad("tools (function calling) are not supported by this server", "tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise _bad("response_format: only {'type': 'text'} is supported", "response_format")
        if req.top_logprobs and not req.logprobs:
            raise _bad("top_logprobs requires logprobs=true", "top_logprobs")
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise _bad(f"messages[{i}].content[{j}]: only text parts are supported, "
                                   f"got type {part.type!r}", f"messages[{i}].content[{j}].type")
                content = "\n".join(part.text for part in content)
            if content is None:
                if m.role != "assistant":
                    raise _bad(f"messages[{i}].content is required for role {m.role!r}",
                               f"messages[{i}].content")
                content = ""
            msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.name is not None:
                msg["name"] = m.name
            messages.append(msg)
        try:
            prompt = template.render(messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise _bad(f"messages: the chat template rejected the conversation: {e}", "messages") from None
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        gen_req = generation_request(req, prompt_ids, max_tokens, top, "messages")
        job, events = submit(gen_req)
        cid, now = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        common = dict(id=cid, created=now, model=model_id, system_fingerprint=fingerprint)

        if not req.stream:
            evs = await collect(request, job, events)
            if evs is None:
                return Response(status_code=499)
            text = "".join(ev.chunk.text for ev in evs)
            choice = ChatChoice(message=AssistantMessage(content=text),
                                logprobs=chat_logprobs(evs) if req.logprobs else None,
                                finish_reason=evs[-1].chunk.finish_reason)
            return ChatCompletion(choices=[choice], usage=usage(evs[-1]), **common)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: ChatDelta, finish=None, lps=None) -> str:
            return sse(ChatCompletionChunk(
                choices=[ChatChunkChoice(delta=delta, finish_reason=finish,
                                         logprobs=chat_logprobs(lps) if lps else None)],
                **common))

        def on_event(ev):
            c = ev.chunk
            lps = [ev] if ev.logprob is not None else None
            if c.text or lps:
                yield chunk(ChatDelta(content=c.text), lps=lps)
            if c.finish_reason is not None:
                yield chunk(ChatDelta(), finish=c.finish_reason)
                if include_usage:
                    yield sse(ChatCompletionChunk(choices=[], usage=usage(ev), **common))

        return sse_response(job, events, [chunk(ChatDelta(role="assistant", content=""))], on_event)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if req.suffix:
            raise _bad("suffix (insertion) is not supported", "suffix")
        if req.best_of not in (None, 1):
            raise _bad(f"best_of must be 1, got {req.best_of}", "best_of")
        if req.echo and req.logprobs is not None:
            raise _bad("echo together with logprobs is not supported", "echo")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise _bad(f"prompt: one prompt per request, got {len(prompt)}", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = tokenizer.encode(prompt) if prompt else []
            prompt_text = prompt
        else:
            vocab = model.config.vocab_size
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise _bad(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
            prompt_ids = list(prompt)
            prompt_text = tokenizer.decode(prompt_ids)
        gen_req = generation_request(req, prompt_ids, req.max_tokens, req.logprobs, "prompt")
        job, events = submit(gen_req)
        cid, now = "cmpl-" + secrets.token_hex(12), int(time.time())
        common = dict(id=cid, created=now, model=model_id, system_fingerprint=fingerprint)
        echo = prompt_text if req.echo else ""
        want_lp = req.logprobs is not None

        if not req.stream:
            evs = await collect(request, job, events)
            if evs is None:
                return Response(status_code=499)
            text = echo + "".join(ev.chunk.text for ev in evs)
            choice = CompletionChoice(text=text, finish_reason=evs[-1].chunk.finish_reason,
                                      logprobs=completion_logprobs(evs, len(echo)) if want_lp else None)
            return Completion(choices=[choice], usage=usage(evs[-1]), **common)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        offset = len(echo)

        def on_event(ev):
            nonlocal offset
            c = ev.chunk
            lp = completion_logprobs([ev], offset) if (want_lp and ev.logprob) else None
            if c.text or lp or c.finish_reason:
                yield sse(Completion(choices=[CompletionChoice(
                    text=c.text, logprobs=lp, finish_reason=c.finish_reason)], **common))
            if lp:
                offset += sum(len(t) for t in lp.tokens)
            if c.finish_reason is not None and include_usage:
                yield sse(Completion(choices=[], usage=usage(ev), **common))

        head = [sse(Completion(choices=[CompletionChoice(text=echo)], **common))] if echo else []
        return sse_response(job, events, head, on_event)

    return app


def _as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SchedulerClosedError):
        return APIError(503, str(exc), code="server_shutting_down", type="server_error")
    if isinstance(exc, ValueError):
        return _bad(str(exc))
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
