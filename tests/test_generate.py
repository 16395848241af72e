"""Generation on the story model: stream == non-stream, seeds, greedy == a manual argmax loop,
stop strings (never half-printed), max_new_tokens, EOS, KV-cache reuse; and the streaming
detokenizer on byte-level and byte-fallback tokenizers (emoji, CJK)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

import llm_fast
from llm_fast.generate import generate, stream_generate
from llm_fast.sampling import SamplingParams
from llm_fast.tokenizer import Tokenizer

STORY_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "story"
PROMPT = "Once upon a time"
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def story():
    if not (STORY_DIR / "model.safetensors").is_file():
        pytest.skip(f"story model not found at {STORY_DIR}")
    return llm_fast.load(str(STORY_DIR))


@pytest.fixture(scope="module")
def greedy_full(story):
    """The greedy continuation of PROMPT up to EOS (ids without EOS, text)."""
    model, tok = story
    r = generate(model, tok, PROMPT, 400, GREEDY)
    assert r.finish_reason == "stop"
    return r


def manual_greedy(model, ids, max_new, eos):
    cache = model.new_cache()
    logits = model.forward(ids, cache)
    out = []
    for _ in range(max_new):
        t = int(np.argmax(logits))
        out.append(t)
        if t in eos:
            break
        logits = model.forward([t], cache)
    return out


# --- stream == non-stream, seeds, greedy ----------------------------------------------------------

@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=3),
                                      SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.2, seed=11)],
                         ids=["greedy", "topk_topp", "minp_penalty"])
def test_stream_pieces_concatenate_to_generate(story, sampling):
    model, tok = story
    chunks = list(stream_generate(model, tok, PROMPT, 80, sampling))
    result = generate(model, tok, PROMPT, 80, sampling)
    assert "".join(c.text for c in chunks) == result.text
    assert [c.token for c in chunks if c.token is not None] == result.token_ids
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == result.finish_reason in ("stop", "length")
    assert chunks[-1].token is None
    # the text is the decode of the generated ids (in the context of the prompt)
    ids = tok.encode(PROMPT)
    assert result.text == tok.decode(ids + result.token_ids)[len(tok.decode(ids)):]


def test_same_seed_same_text(story):
    model, tok = story
    s = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=1234)
    a = generate(model, tok, PROMPT, 60, s)
    b = generate(model, tok, PROMPT, 60, s)
    assert a.text == b.text and a.token_ids == b.token_ids
    others = {generate(model, tok, PROMPT, 60, SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=k)).text
              for k in (1, 2, 3)}
    assert len(others | {a.text}) >= 3, "different seeds should give different stories"


def test_greedy_matches_manual_argmax_loop(story, greedy_full):
    model, tok = story
    ids = tok.encode(PROMPT)
    assert ids == [1, 80, 147, 201, 282, 57]
    manual = manual_greedy(model, ids, 400, tok.eos_token_ids)
    assert manual[-1] in tok.eos_token_ids                       # it does reach EOS
    assert greedy_full.token_ids == manual[:-1]                  # EOS itself is not in token_ids
    assert greedy_full.generated_tokens == len(manual)
    assert greedy_full.prompt_tokens == len(ids)
    # a greedy sampler with other (ignored) knobs is still argmax
    r = generate(model, tok, PROMPT, 30, SamplingParams(temperature=0.0, top_k=5, top_p=0.5, seed=9))
    assert r.token_ids == manual[:30]


def test_prompt_as_ids_equals_text(story):
    model, tok = story
    a = generate(model, tok, PROMPT, 25, GREEDY)
    b = generate(model, tok, tok.encode(PROMPT), 25, GREEDY)
    assert a.text == b.text and a.token_ids == b.token_ids


# --- finish reasons --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 17])
def test_max_new_tokens_gives_length(story, greedy_full, n):
    model, tok = story
    r = generate(model, tok, PROMPT, n, GREEDY)
    assert r.finish_reason == "length"
    assert r.generated_tokens == n and r.token_ids == greedy_full.token_ids[:n]
    assert greedy_full.text.startswith(r.text)


def test_eos_gives_stop(story, greedy_full):
    model, tok = story
    assert greedy_full.finish_reason == "stop"
    n = greedy_full.generated_tokens
    r = generate(model, tok, PROMPT, n, GREEDY)              # EOS is the n-th token
    assert r.finish_reason == "stop"
    # a custom EOS set: the 5th greedy token ends the generation, and is not part of the text
    fifth = greedy_full.token_ids[4]
    r = generate(model, tok, PROMPT, 100, GREEDY, eos_token_ids={fifth, 12345})
    first = greedy_full.token_ids.index(fifth)
    assert r.finish_reason == "stop" and r.token_ids == greedy_full.token_ids[:first]
    assert r.text == tok.decode(tok.encode(PROMPT) + r.token_ids)[len(PROMPT):]
    # no EOS at all: runs to the limit
    r = generate(model, tok, PROMPT, n + 5, GREEDY, eos_token_ids=())
    assert r.finish_reason == "length" and r.generated_tokens == n + 5


def test_context_full_gives_length(story):
    model, tok = story
    cache = model.new_cache(10)
    r = generate(model, tok, PROMPT, 100, GREEDY, cache=cache)
    assert r.finish_reason == "length"
    assert cache.length == 10 and r.generated_tokens == 10 - 6 + 1


def test_generate_argument_errors(story):
    model, tok = story
    for bad in (0, -3, 1.5, True, None):
        with pytest.raises(ValueError, match="max_new_tokens"):
            generate(model, tok, PROMPT, bad, GREEDY)
    with pytest.raises(ValueError, match="stop"):
        generate(model, tok, PROMPT, 5, GREEDY, stop="")
    with pytest.raises(ValueError, match="stop"):
        generate(model, tok, PROMPT, 5, GREEDY, stop=["ok", 3])
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, [], 5, GREEDY)
    with pytest.raises(ValueError, match="context"):
        generate(model, tok, [1] * 20, 5, GREEDY, cache=model.new_cache(10))


# --- stop strings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("stop", ["Spot", "little girl", "mom, dad", "d Lily", ".\n", "bird", "s"])
def test_stop_string(story, greedy_full, stop):
    model, tok = story
    full = greedy_full.text
    at = full.find(stop)
    assert at >= 0, f"{stop!r} not in the greedy text"
    chunks = list(stream_generate(model, tok, PROMPT, 400, GREEDY, stop=stop))
    pieces = [c.text for c in chunks]
    text = "".join(pieces)
    assert chunks[-1].finish_reason == "stop"
    assert stop not in text
    # exactly the text before the stop: nothing of it was printed and later retracted
    assert text == full[:at]
    emitted = ""
    for p in pieces:
        emitted += p
        assert full.startswith(emitted) and len(emitted) <= at
        assert stop not in emitted
    assert generate(model, tok, PROMPT, 400, GREEDY, stop=stop).text == text


def test_stop_string_at_the_very_start(story, greedy_full):
    model, tok = story
    first_char = greedy_full.text[0]
    r = generate(model, tok, PROMPT, 50, GREEDY, stop=first_char)
    assert r.text == "" and r.finish_reason == "stop"


def test_several_stop_strings_earliest_wins(story, greedy_full):
    model, tok = story
    full = greedy_full.text
    stops = ["bird", "Spot", "never-appears"]
    at = min(full.find(s) for s in stops if s in full)
    r = generate(model, tok, PROMPT, 400, GREEDY, stop=stops)
    assert r.text == full[:at] and r.finish_reason == "stop"


def test_stop_prefix_held_back_then_released(story, greedy_full):
    """A piece that could start a stop string is held back, and released when the stop fails."""
    model, tok = story
    plain = [c.text for c in stream_generate(model, tok, PROMPT, 400, GREEDY)]
    k = next(i for i, p in enumerate(plain) if i >= 3 and len(p) >= 2)
    stop = plain[k] + "\u2603"                     # starts like piece k, never completes
    assert stop not in greedy_full.text
    pieces = [c.text for c in stream_generate(model, tok, PROMPT, 400, GREEDY, stop=stop)]
    assert "".join(pieces) == greedy_full.text    # everything released in the end (EOS)
    cum = np.cumsum([0] + [len(p) for p in pieces])
    plain_cum = np.cumsum([0] + [len(p) for p in plain])
    assert cum[k + 1] == plain_cum[k], "piece k should be held back while it may start the stop"
    assert cum[k + 2] == plain_cum[k + 2], "and released with the next piece"


def test_stop_string_with_length_limit(story, greedy_full):
    model, tok = story
    n = 8
    short = generate(model, tok, PROMPT, n, GREEDY)
    r = generate(model, tok, PROMPT, n, GREEDY, stop="never-appears-xyz")
    assert r.text == short.text and r.finish_reason == "length"
    # the text ends in a held-back prefix of the stop at the limit: released, not lost
    tail = short.text[-2:]
    r = generate(model, tok, PROMPT, n, GREEDY, stop=tail + "\u2603")
    assert r.text == short.text and r.finish_reason == "length"


# --- KV-cache reuse ------------------------------------------------------------------------------------

def test_cache_reuse_extended_prompt(story):
    model, tok = story
    prompt = tok.encode(PROMPT)
    cache = model.new_cache()
    first = generate(model, tok, prompt, 12, GREEDY, cache=cache)
    assert first.reused_tokens == 0
    # the cache holds the prompt and every generated token except the last one
    assert cache.tokens == prompt + first.token_ids[:-1]
    extra = tok.encode(" They went", add_special_tokens=False)
    longer = prompt + first.token_ids + extra
    second = generate(model, tok, longer, 20, GREEDY, cache=cache)
    assert second.reused_tokens == len(prompt) + len(first.token_ids) - 1
    fresh = generate(model, tok, longer, 20, GREEDY)
    assert fresh.reused_tokens == 0
    assert second.text == fresh.text and second.token_ids == fresh.token_ids
    # a prompt that diverges inside the cached part reuses only the common prefix
    other = prompt[:4] + extra
    third = generate(model, tok, other, 10, GREEDY, cache=cache)
    assert third.reused_tokens == 4
    assert third.token_ids == generate(model, tok, other, 10, GREEDY).token_ids
    # the very same prompt again: all but its last token are reused (its logits are needed)
    again = generate(model, tok, other, 10, GREEDY, cache=cache)
    assert again.reused_tokens == len(other) - 1 and again.token_ids == third.token_ids


def test_cache_reuse_with_sampling_matches_fresh(story):
    model, tok = story
    s = SamplingParams(temperature=0.8, top_k=20, seed=5)
    cache = model.new_cache()
    prompt = tok.encode(PROMPT)
    generate(model, tok, prompt + [300, 301], 5, GREEDY, cache=cache)
    a = generate(model, tok, prompt + [300, 301, 17], 30, s, cache=cache)
    b = generate(model, tok, prompt + [300, 301, 17], 30, s)
    assert a.reused_tokens == len(prompt) + 2
    assert a.token_ids == b.token_ids


# --- the streaming detokenizer --------------------------------------------------------------------------

TEXTS = [
    "Hi 😀👍🏽 你好，世界! naïve café 🇫🇷 end",
    "日本語のテキストと emoji 🎉🎉 mixed with ascii, and ∑∫√ math.",
    "👨‍👩‍👧‍👦 family; 한국어 텍스트; Ελληνικά; עברית",
    "😀",
    "a",
]


@pytest.fixture(scope="module")
def byte_level():
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"], show_progress=False)
    corpus = ["hello world, the quick brown fox jumps over the lazy dog"] * 20 + ["你好世界 😀 emoji 日本語"] * 3
    tk.train_from_iterator(corpus, trainer)
    return Tokenizer(tk, bos_token_id=0, eos_token_ids=[1])


@pytest.fixture(scope="module")
def byte_fallback():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyzHIE!,.;":
        vocab.setdefault(ch, len(vocab))
    merges = [("▁", "a"), ("e", "n")]
    vocab["▁a"], vocab["en"] = len(vocab), len(vocab) + 1
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens(["<s>", "</s>"])           # ids 1, 2 become special added tokens
    return Tokenizer(tk, bos_token_id=1, eos_token_ids=[2])


def _stream(tokenizer, ids, context=()):
    d = tokenizer.detokenizer(context)
    pieces = [d.add(i) for i in ids]
    tail = d.flush()
    return pieces, tail, d


@pytest.mark.parametrize("kind", ["byte_level", "byte_fallback"])
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_detokenizer_pieces_concatenate_to_decode(request, kind, text):
    tokenizer = request.getfixturevalue(kind)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text                       # the tokenizers round-trip
    if len(text) > 3:
        assert len(ids) > len(text) // 2                      # and really split characters into bytes
    pieces, tail, d = _stream(tokenizer, ids)
    assert "".join(pieces) + tail == tokenizer.decode(ids) == d.text
    assert tail == ""                                          # a complete stream holds nothing back
    for p in pieces:
        assert "\ufffd" not in p, f"replacement character emitted in {pieces!r}"


def test_detokenizer_flushes_an_incomplete_character(byte_fallback):
    ids = byte_fallback.encode("ab😀", add_special_tokens=False)
    pieces, tail, _ = _stream(byte_fallback, ids[:-1])         # the emoji's last byte is missing
    assert "".join(pieces) == "ab"
    assert tail != "" and "\ufffd" in tail


def test_detokenizer_skips_special_tokens(byte_fallback):
    ids = byte_fallback.encode("hi 😀", add_special_tokens=False)
    pieces, tail, _ = _stream(byte_fallback, [1] + ids + [2])
    assert "".join(pieces) + tail == "hi 😀"


def test_detokenizer_with_context_keeps_leading_space(story, greedy_full):
    _, tok = story
    prompt = tok.encode(PROMPT)
    pieces, tail, _ = _stream(tok, greedy_full.token_ids, context=prompt)
    want = tok.decode(prompt + greedy_full.token_ids)[len(tok.decode(prompt)):]
    assert "".join(pieces) + tail == want
    assert "\ufffd" not in "".join(pieces)
    # continuing any split of a text: the pieces are exactly the rest of its decode
    ids = tok.encode(PROMPT + " there was a dog. It was big and happy.", add_special_tokens=False)
    for n in range(1, len(ids)):
        head = tok.decode(ids[:n])
        pieces, tail, _ = _stream(tok, ids[n:], context=ids[:n])
        assert head + "".join(pieces) + tail == tok.decode(ids), n


@pytest.mark.parametrize("kind, head, rest", [
    ("byte_level", "你好世界", "😀 ok"),
    ("byte_fallback", "你好世界", "😀 ok"),
    ("byte_level", "ok 😀", "🇫🇷 fin"), ("byte_fallback", "ok 😀", "🇫🇷 fin"),
    ("byte_level", "naïve", " café"), ("byte_fallback", "naïve", " café"),
    ("byte_level", "x", "\ufffd literal replacement char"),
    ("byte_fallback", "x", "\ufffd literal replacement char"),
])
def test_detokenizer_after_multibyte_context(request, kind, head, rest):
    """Context ids ending inside / after multi-byte characters: the pieces are the rest of the text."""
    tokenizer = request.getfixturevalue(kind)
    ids = tokenizer.encode(head + rest, add_special_tokens=False)
    assert tokenizer.decode(ids) == head + rest
    for n in range(1, len(ids)):
        before = tokenizer.decode(ids[:n])
        if "\ufffd" in before:
            continue                                   # the split falls inside a character
        pieces, tail, _ = _stream(tokenizer, ids[n:], context=ids[:n])
        assert before + "".join(pieces) + tail == head + rest, (n, pieces, tail)
        if "\ufffd" not in rest:
            assert tail == "" and all("\ufffd" not in p for p in pieces)


def test_detokenizer_prompt_ending_in_cjk_byte_fallback(byte_fallback):
    """A prompt ending in two byte-fallback CJK characters, a continuation of byte-fallback
    characters: the streamed text must be the continuation, not U+FFFD."""
    prompt = byte_fallback.encode("hi 你好", add_special_tokens=False)      # ..., E4 BD A0 E5 A5 BD
    cont = byte_fallback.encode("世界 ok", add_special_tokens=False)[1:]   # without the leading "▁"
    assert byte_fallback.decode(prompt + cont) == "hi 你好世界 ok"
    d = byte_fallback.detokenizer(prompt)
    text = "".join(d.add(i) for i in cont) + d.flush()
    assert text == "世界 ok", repr(text)
