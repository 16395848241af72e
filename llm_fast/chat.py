"""Multi-turn chat on one KV cache: ChatSession.

    session = ChatSession(model, tokenizer, system_prompt="You are concise.",
                          sampling=SamplingParams(temperature=0))
    for piece in session.send("What is the capital of France?"):
        print(piece, end="", flush=True)
    session.last_stats   # prompt / reused / computed / generated tokens, tok/s

Each turn renders the whole conversation with the chat template, encodes it with
add_special_tokens=False (the template writes BOS where it wants one), and hands the ids to
stream_generate with the session's own KVCache: the longest common prefix with what the cache
holds is reused and only the new suffix is prefilled. Nothing assumes the template renders
earlier turns the same way every time; wherever the token ids differ the cache is trimmed.

A turn is recorded (user message + reply appended to `messages`) when its stream ends: run to
completion, or stopped early by the consumer (break, close(), Ctrl-C): then the reply is the text
streamed so far. A turn stopped before its first token was sampled (Ctrl-C during the prefill)
is not recorded, and neither is one that fails with an exception: the conversation is unchanged.

Context window policy: the prompt plus max_new_tokens must fit the context. When it would not,
the oldest turns after the system prompt are left out of the prompt, whole user/assistant pairs
at a time, and the shorter conversation is prefilled again (a history window, as MiniMind's chat
demo keeps). Dropped turns stay dropped for later turns (so the prompt keeps a stable prefix the
cache can reuse) but stay in `messages` / `history`, so a saved conversation is complete. If the
system prompt and the newest user message alone do not fit, send() raises ValueError.

Sessions hold no state in the model: several sessions can share one loaded model, each with its
own cache (memory_bytes() reports what one session holds) and its own sampler RNG.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence, Union

from .chat_template import ChatTemplate, NoChatTemplateError
from .generate import stream_generate
from .sampling import Sampler, SamplingParams

ROLES = ("system", "user", "assistant")

# End-of-turn markers of common chat formats. Those the template writes become end-of-generation
# ids when the tokenizer has them as one special token, stop strings otherwise.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                       "<|END_OF_TURN_TOKEN|>")


@dataclass(frozen=True)
class TurnStats:
    prompt_tokens: int       # the rendered conversation, in tokens
    reused_tokens: int       # of those, already in the KV cache (not recomputed)
    computed_tokens: int     # prompt_tokens - reused_tokens: prefilled this turn
    generated_tokens: int    # tokens sampled, the end-of-turn token included
    prompt_tps: float        # computed_tokens per second of prefill
    decode_tps: float        # generated tokens per second after the first
    finish_reason: str       # "stop" (end of turn / stop string), "length", or "interrupted"
    dropped_messages: int    # messages left out of the prompt by the context window


class KVMemory(NamedTuple):
    used: int                # bytes of K/V rows holding tokens now
    reserved: int            # bytes of the session's preallocated K/V buffers


def resolve_template(tokenizer, template: Union[None, str, ChatTemplate] = None) -> ChatTemplate:
    """The ChatTemplate a session uses.

    None: the tokenizer's own chat_template (NoChatTemplateError if it has none: a guessed
    format silently degrades replies). "chatml": the ChatML template. A ChatTemplate: itself.
    Any other string: Jinja template source (to use a file, see chat_template.load_chat_template).
    """
    if isinstance(template, ChatTemplate):
        return template
    tokens = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    if template is None:
        if not tokenizer.chat_template:
            raise NoChatTemplateError(
                "this model's tokenizer has no chat template and llm_fast will not guess one; "
                "pass template='chatml' to use ChatML (<|im_start|>role\\n...<|im_end|>) or a "
                "Jinja template string")
        return ChatTemplate(tokenizer.chat_template, origin="the model's chat template", **tokens)
    if template == "chatml":
        return ChatTemplate.chatml(**tokens)
    if isinstance(template, str):
        if "{{" not in template and "{%" not in template:
            raise ValueError(
                f"template must be None, 'chatml', a ChatTemplate or Jinja source, got "
                f"{template[:60]!r} (to use a template file, load it with "
                f"llm_fast.chat_template.load_chat_template(path))")
        return ChatTemplate(template, origin="template string", **tokens)
    raise TypeError(f"template must be None, 'chatml', a ChatTemplate or a Jinja string, "
                    f"got {type(template).__name__}")


def end_of_turn(tokenizer, template: ChatTemplate) -> tuple:
    """(end-of-generation ids, extra stop strings) for replies in this template's format."""
    eos = set(tokenizer.eos_token_ids)
    stops = []
    for marker in END_OF_TURN_MARKERS:
        if marker not in template.source:
            continue
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if len(ids) == 1 and ids[0] in tokenizer.special_ids:
            eos.add(ids[0])
        else:
            stops.append(marker)
    return frozenset(eos), stops


def validate_history(messages) -> list:
    """A checked plain copy of a conversation: a list of {"role", "content"} dicts, an optional
    system message first, then user and assistant messages alternating, starting with a user
    message and ending with an assistant reply. ValueError names the first problem."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise ValueError(f"a chat history must be a list of {{'role', 'content'}} objects, "
                         f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"history[{i}] must be an object with 'role' and 'content', "
                             f"got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"history[{i}]['role'] must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"history[{i}]['content'] must be a string, got "
                             f"{type(content).__name__}")
        out.append({"role": role, "content": content})
    turns = out[1:] if out and out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            where = i + (len(out) - len(turns))
            raise ValueError(f"history[{where}] has role {m['role']!r} where {want!r} was expected "
                             f"(a system message may only come first; then user and assistant "
                             f"messages alternate)")
    if len(turns) % 2:
        raise ValueError("the history ends with a user message that has no reply")
    return out


class _TurnState:
    def __init__(self):
        self.text = ""
        self.stats: Optional[TurnStats] = None


class ChatReply:
    """The streamed reply of one turn: an iterator of text pieces.

    Nothing runs until it is first advanced. `text` is what has been streamed so far, `stats`
    the turn's TurnStats once it has ended. close() (or dropping the iterator) stops the reply
    early; the session keeps what was streamed.
    """

    def __init__(self, session: "ChatSession", user_text: Optional[str]):
        self._state = _TurnState()
        self._gen = session._respond(user_text, self._state, weakref.ref(self))

    def __iter__(self) -> "ChatReply":
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    @property
    def text(self) -> str:
        return self._state.text

    @property
    def stats(self) -> Optional[TurnStats]:
        return self._state.stats


class ChatSession:
    """A conversation with one model, on its own KV cache.

    template: None (the tokenizer's chat_template; NoChatTemplateError if there is none),
    "chatml", a ChatTemplate, or Jinja source. sampling: the SamplingParams of every reply (the
    session owns the sampler, so a seeded session is reproducible call for call). stop: stop
    strings (never part of a reply). max_context: the KV cache length (default: the model's
    context); each prompt plus max_new_tokens must fit in it (see the module doc for what
    happens when it does not).
    """

    def __init__(self, model, tokenizer, system_prompt: Optional[str] = None,
                 template: Union[None, str, ChatTemplate] = None,
                 sampling: Optional[SamplingParams] = None, max_new_tokens: int = 256,
                 stop: Union[str, Sequence[str], None] = None, max_context: Optional[int] = None):
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a string or None, got "
                            f"{type(system_prompt).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.template = resolve_template(tokenizer, template)
        self.eos_token_ids, marker_stops = end_of_turn(tokenizer, self.template)
        self.stop = stops + [s for s in marker_stops if s not in stops]
        self.sampling = sampling if sampling is not None else SamplingParams()
        self.sampler = Sampler(self.sampling)
        self.max_new_tokens = max_new_tokens
        self.cache = model.new_cache(max_context)
        self.system_prompt = system_prompt
        self.last_stats: Optional[TurnStats] = None
        self._turns: list = []       # user / assistant messages, alternating
        self._first = 0              # index in _turns of the oldest message still in the prompt
        self._active = None          # weakref to the ChatReply being streamed

    # ----------------------------------------------------------------------------------------
    # The conversation

    @property
    def context_length(self) -> int:
        return self.cache.max_len

    @property
    def messages(self) -> list:
        """The whole conversation (system prompt first, when there is one), dropped turns
        included. A copy: change the conversation with send/undo/regenerate/load_history."""
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return copy.deepcopy(system + self._turns)

    @property
    def history(self) -> list:
        """messages as plain JSON data: a list of {"role", "content"} dicts."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages]

    @property
    def dropped_messages(self) -> int:
        """Messages after the system prompt left out of the prompt by the context window."""
        return self._first

    def load_history(self, messages) -> None:
        """Replace the conversation (and the system prompt: the history's, or None) with a list
        of {"role", "content"} dicts, as `history` returns. ValueError when it is malformed."""
        checked = validate_history(messages)
        self._close_active()
        if checked and checked[0]["role"] == "system":
            self.system_prompt, checked = checked[0]["content"], checked[1:]
        else:
            self.system_prompt = None
        self._turns, self._first, self.last_stats = checked, 0, None

    def reset(self) -> None:
        """Forget every turn (the system prompt stays) and empty the cache."""
        self._close_active()
        self._turns, self._first, self.last_stats = [], 0, None
        self.cache.reset()

    def undo(self) -> list:
        """Remove the last user message and its reply; return them. ValueError if there is none."""
        self._close_active()
        if not self._turns:
            raise ValueError("nothing to undo: the conversation has no turns")
        removed = self._turns[-2:]
        self._turns = self._turns[:-2]
        self._first = min(self._first, len(self._turns))
        return removed

    # ----------------------------------------------------------------------------------------
    # Replies

    def send(self, user_text: str) -> ChatReply:
        """Stream the reply to user_text (an iterator of text pieces; see ChatReply). The turn
        is added to `messages` when the stream ends or is stopped; a ValueError is raised when
        the iteration starts if even this message alone does not fit the context."""
        if not isinstance(user_text, str):
            raise TypeError(f"send: user_text must be a string, got {type(user_text).__name__}")
        return ChatReply(self, user_text)

    def regenerate(self) -> ChatReply:
        """Drop the last reply and stream a new one to the same user message."""
        if not self._turns:
            raise ValueError("nothing to regenerate: the conversation has no reply yet")
        return ChatReply(self, None)

    def chat(self, user_text: str) -> str:
        """send() collected into one string."""
        return "".join(self.send(user_text))

    def memory_bytes(self) -> KVMemory:
        """K/V bytes this session holds now (used) and has preallocated (reserved). The model's
        weights and scratch are shared by every session and not counted."""
        return KVMemory(self.cache.nbytes_used(), self.cache.nbytes_reserved())

    # ----------------------------------------------------------------------------------------

    def _close_active(self) -> None:
        reply = self._active() if self._active is not None else None
        if reply is not None:
            reply.close()
        self._active = None

    def _render(self, turns: list) -> list:
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        text = self.template.render(system + turns, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _plan(self, turns: list) -> tuple:
        """(prompt ids, index of the first kept message) for turns ending with a user message:
        the history window described in the module doc."""
        budget = self.cache.max_len - self.max_new_tokens
        first = min(self._first, len(turns) - 1)
        while True:
            ids = self._render(turns[first:])
            if len(ids) <= budget:
                return ids, first
            later = [i for i in range(first + 1, len(turns)) if turns[i]["role"] == "user"]
            if not later:
                raise ValueError(
                    f"the message does not fit the context: the system prompt and this message "
                    f"take {len(ids)} tokens, and with max_new_tokens={self.max_new_tokens} that "
                    f"exceeds the context of {self.cache.max_len} tokens; shorten the message "
                    f"or lower max_new_tokens")
            first = later[0]

    def _respond(self, user_text: Optional[str], state: _TurnState, reply_ref) -> Iterator[str]:
        # A generator: runs from the consumer's first next() on.
        self._close_active()
        if user_text is None:
            if not self._turns:
                raise ValueError("nothing to regenerate: the conversation has no reply yet")
            turns = self._turns[:-1]
        else:
            turns = self._turns + [{"role": "user", "content": user_text}]
        ids, first = self._plan(turns)
        self._active = reply_ref
        stream = stream_generate(self.model, self.tokenizer, ids, self.max_new_tokens,
                                 stop=self.stop or None, cache=self.cache,
                                 eos_token_ids=self.eos_token_ids, sampler=self.sampler)
        last, finish, failed = None, "interrupted", False
        try:
            for chunk in stream:
                last = chunk
                if chunk.text:
                    state.text += chunk.text
                    yield chunk.text
            finish = last.finish_reason
        except Exception:
            failed = True
            raise
        finally:
            stream.close()
            if self._active is reply_ref:
                self._active = None
            self._repair_cache()
            if not failed and last is not None:
                state.stats = self.last_stats = TurnStats(
                    prompt_tokens=len(ids), reused_tokens=last.reused_tokens,
                    computed_tokens=len(ids) - last.reused_tokens,
                    generated_tokens=last.generated_tokens, prompt_tps=last.prompt_tps,
                    decode_tps=last.generation_tps, finish_reason=finish,
                    dropped_messages=first)
                self._turns = turns + [{"role": "assistant", "content": state.text}]
                self._first = first

    def _repair_cache(self) -> None:
        # An interrupt between a prefill chunk and the token bookkeeping can leave the cache's
        # length and its token list out of step; keep only the part both describe.
        cache = self.cache
        if len(cache.tokens) != cache.length:
            cache.trim(min(len(cache.tokens), cache.length))
