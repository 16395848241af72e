"""The model forward pass: loading (course vectors), the float64 NumPy reference, and invariances.

Runs on the story model (../shared/models/story, skipped when missing) and on tiny seeded random
Llama models written here (config.json + model.safetensors).

- prefill of a prompt == feeding it token by token through the KV cache (<= 1e-5; in fact bit
  for bit, which simd.h promises and a separate test checks);
- llm_fast.reference.ReferenceModel in float64 agrees with Model.forward within 1e-4;
- chunked prefill (max_chunk=3) == unchunked; cache.trim + re-forward == fresh;
- 1 thread == 2 threads for a whole forward (bit for bit);
- forward errors; the decode step allocates no large arrays.
"""
from __future__ import annotations

import json
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import llm_fast
from llm_fast.model import Model
from llm_fast.reference import ReferenceModel
from llm_fast.safetensors_file import SafetensorsFile

STORY_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "story"
STORY_PROMPT = [1, 80, 147, 201, 282, 57]  # "Once upon a time" with BOS


# --- a tiny random Llama, written to disk ------------------------------------------------------

def llama_tensors(cfg: dict, seed: int, tie_store: str = "embed") -> dict:
    """Seeded float32 tensors named as in Hugging Face checkpoints.

    Projections ~ N(0, 1/fan_in) so activations and logits stay O(1). tie_store: which matrix a
    tied model stores ("embed" or "lm_head").
    """
    rng = np.random.default_rng(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // nh

    def mat(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {}
    emb = rng.standard_normal((v, h)).astype(np.float32)
    if not cfg.get("tie_word_embeddings"):
        t["model.embed_tokens.weight"] = emb
        t["lm_head.weight"] = mat(v, h)
    elif tie_store == "embed":
        t["model.embed_tokens.weight"] = emb
    else:
        t["lm_head.weight"] = emb
    t["model.norm.weight"] = norm(h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        t[p + "self_attn.q_proj.weight"] = mat(nh * hd, h)
        t[p + "self_attn.k_proj.weight"] = mat(nkv * hd, h)
        t[p + "self_attn.v_proj.weight"] = mat(nkv * hd, h)
        t[p + "self_attn.o_proj.weight"] = mat(h, nh * hd)
        t[p + "mlp.gate_proj.weight"] = mat(inter, h)
        t[p + "mlp.up_proj.weight"] = mat(inter, h)
        t[p + "mlp.down_proj.weight"] = mat(h, inter)
    return t


def write_model(folder: Path, cfg: dict, seed: int = 0, tie_store: str = "embed") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    full = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, **cfg}
    (folder / "config.json").write_text(json.dumps(full))
    save_file(llama_tensors(full, seed, tie_store), str(folder / "model.safetensors"))
    return folder


SYNTHETIC = {
    # GQA 3, untied, odd vocab / MLP
    "gqa3": dict(vocab_size=301, hidden_size=48, intermediate_size=101, num_hidden_layers=2,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    # MQA, tied (only lm_head stored, like the story model), head_dim 16, llama3 RoPE scaling
    "mqa_tied_llama3": dict(vocab_size=97, hidden_size=64, intermediate_size=97, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=80,
                            rms_norm_eps=1e-6, rope_theta=500000.0, tie_word_embeddings=True,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16}),
    # explicit head_dim 64 (q_dim 128 != hidden 32), MHA
    "hd64": dict(vocab_size=131, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                 max_position_embeddings=48, rms_norm_eps=1e-6, rope_theta=1e6,
                 tie_word_embeddings=False),
    # head_dim 12, GQA 2
    "hd12": dict(vocab_size=113, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def synthetic_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: write_model(root / name, cfg, seed=i, tie_store=_tie_store(name))
            for i, (name, cfg) in enumerate(SYNTHETIC.items())}


def _tie_store(name: str) -> str:
    return "lm_head" if name == "mqa_tied_llama3" else "embed"


@pytest.fixture(scope="module")
def story():
    if not (STORY_DIR / "model.safetensors").is_file():
        pytest.skip(f"story model not found at {STORY_DIR}")
    return llm_fast.load_model(str(STORY_DIR))


_MODELS = ["story"] + list(SYNTHETIC)


@pytest.fixture(scope="module", params=_MODELS)
def any_model(request, synthetic_dirs):
    """(name, Model, prompt ids) for the story model and every synthetic model."""
    if request.param == "story":
        return "story", request.getfixturevalue("story"), STORY_PROMPT + [300, 400, 17, 1500, 23, 9, 1999]
    model = llm_fast.load_model(str(synthetic_dirs[request.param]))
    rng = np.random.default_rng(99)
    ids = rng.integers(0, model.config.vocab_size, 13).tolist()
    return request.param, model, ids


@contextmanager
def threads(n):
    old = llm_fast.get_num_threads()
    llm_fast.set_num_threads(n)
    try:
        yield
    finally:
        llm_fast.set_num_threads(old)


def course_close(got, want, rel):
    got, want = float(got), float(want)
    assert abs(got - want) <= rel * (abs(got) + abs(want)) / 2, f"{got} vs {want} (rel {rel})"


# --- loading: the course vectors on the story model ------------------------------------------

def test_story_dimensions(story):
    c = story.config
    assert (c.vocab_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.hidden_size, c.head_dim, c.intermediate_size) == (2048, 2, 8, 4, 128, 16, 384)
    assert c.tie_word_embeddings


def test_story_course_loading_vectors(story):
    c, w = story.config, story.weights
    q, kv, inter = c.q_dim, c.kv_dim, c.intermediate_size
    embed = np.asarray(w.embed_tokens)
    head = np.asarray(w.lm_head)
    l0, l1 = w.layers
    table = [
        ("embedding [50]", embed.reshape(-1)[50], 0.14453125),
        ("input_layernorm 0 [10]", l0.input_layernorm[10], 0.18652344),
        ("post_attention_layernorm 1 [10]", l1.post_attention_layernorm[10], 0.32421875),
        ("norm [100]", w.norm[100], 0.73046875),
        ("down_proj 0 [100]", np.asarray(l0.down_proj).reshape(-1)[100], -0.0625),
        ("up_proj 0 [100]", np.asarray(l0.gate_up_proj)[inter:].reshape(-1)[100], 1.46875),
        ("gate_proj 1 [100]", np.asarray(l1.gate_up_proj)[:inter].reshape(-1)[100], 0.296875),
        ("q_proj 1 [100]", np.asarray(l1.qkv_proj)[:q].reshape(-1)[100], 0.032226563),
        ("k_proj 1 [100]", np.asarray(l1.qkv_proj)[q:q + kv].reshape(-1)[100], -0.21386719),
        ("v_proj 0 [100]", np.asarray(l0.qkv_proj)[q + kv:].reshape(-1)[100], 0.041015625),
        ("o_proj 0 [100]", np.asarray(l0.o_proj).reshape(-1)[100], 0.01965332),
    ]
    for what, got, want in table:
        try:
            course_close(got, want, 1e-6)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None
    assert head.reshape(-1)[10] == embed.reshape(-1)[10]
    np.testing.assert_array_equal(head, embed)


def test_story_fused_matrices_equal_file_tensors(story):
    """qkv_proj / gate_up_proj rows are exactly [q; k; v] / [gate; up] of the file."""
    f = SafetensorsFile(str(STORY_DIR / "model.safetensors"))
    w = story.weights
    for i, lw in enumerate(w.layers):
        p = f"model.layers.{i}."
        np.testing.assert_array_equal(lw.qkv_proj, np.concatenate(
            [f.to_float32(p + "self_attn." + n + "_proj.weight") for n in "qkv"]))
        np.testing.assert_array_equal(lw.gate_up_proj, np.concatenate(
            [f.to_float32(p + "mlp.gate_proj.weight"), f.to_float32(p + "mlp.up_proj.weight")]))
        np.testing.assert_array_equal(lw.o_proj, f.to_float32(p + "self_attn.o_proj.weight"))
        np.testing.assert_array_equal(lw.down_proj, f.to_float32(p + "mlp.down_proj.weight"))
        np.testing.assert_array_equal(lw.input_layernorm, f.to_float32(p + "input_layernorm.weight"))
    np.testing.assert_array_equal(w.lm_head, f.to_float32("lm_head.weight"))


def test_synthetic_loads_exactly(synthetic_dirs):
    for name, folder in synthetic_dirs.items():
        cfg = json.loads((folder / "config.json").read_text())
        want = llama_tensors(cfg, seed=list(SYNTHETIC).index(name), tie_store=_tie_store(name))
        model = llm_fast.load_model(str(folder))
        w, q_dim = model.weights, model.config.q_dim
        if cfg["tie_word_embeddings"]:
            tied = want.get("model.embed_tokens.weight", want.get("lm_head.weight"))
            np.testing.assert_array_equal(w.embed_tokens, tied)
            np.testing.assert_array_equal(w.lm_head, tied)
        else:
            np.testing.assert_array_equal(w.embed_tokens, want["model.embed_tokens.weight"])
            np.testing.assert_array_equal(w.lm_head, want["lm_head.weight"])
        np.testing.assert_array_equal(w.layers[1].down_proj, want["model.layers.1.mlp.down_proj.weight"])
        np.testing.assert_array_equal(w.layers[0].qkv_proj[:q_dim],
                                      want["model.layers.0.self_attn.q_proj.weight"])
        if cfg["tie_word_embeddings"]:
            assert w.lm_head is w.embed_tokens


# --- forward vs the float64 reference ---------------------------------------------------------

def test_reference_float64_agrees(any_model):
    name, model, ids = any_model
    got = model.forward(ids, model.new_cache(), logits="all")
    assert got.dtype == np.float32 and got.shape == (len(ids), model.config.vocab_size)
    ref_model = ReferenceModel(model.config, model.weights, dtype=np.float64)
    ref = ref_model.forward(ids, ref_model.new_cache(64))
    assert np.isfinite(got).all()
    err = np.abs(got - ref).max()
    assert err <= 1e-4, f"{name}: max |forward - float64 reference| = {err:.3e}"
    # and decode steps through the cache, continuing both
    cache, rcache = model.new_cache(), ref_model.new_cache(64)
    model.forward(ids, cache, logits="none")
    ref_model.forward(ids, rcache)
    for t in (3, 5, 7):
        tok = t % model.config.vocab_size
        err = np.abs(model.forward([tok], cache) - ref_model.forward([tok], rcache)[0]).max()
        assert err <= 1e-4, f"{name}: decode step max error {err:.3e}"


def test_reference_float32_close(story):
    """The float32 NumPy baseline is itself close to the compiled forward (sanity of both)."""
    ref_model = ReferenceModel(story.config, story.weights, dtype=np.float32)
    ref = ref_model.forward(STORY_PROMPT, ref_model.new_cache(16))
    got = story.forward(STORY_PROMPT, story.new_cache(), logits="all")
    assert np.abs(got - ref).max() <= 1e-3


# --- invariances --------------------------------------------------------------------------------

def _token_by_token(model, ids):
    cache = model.new_cache()
    rows = [np.array(model.forward([t], cache), copy=True) for t in ids]
    return np.stack(rows), cache


_PREFILL_VS_STEPS: dict = {}


def _prefill_vs_steps(name, model, ids):
    """(prefill logits, its cache, token-by-token logits, its cache), computed once per model."""
    if name not in _PREFILL_VS_STEPS:
        cache = model.new_cache()
        prefill = model.forward(ids, cache, logits="all")
        steps, cache2 = _token_by_token(model, ids)
        _PREFILL_VS_STEPS[name] = prefill, cache, steps, cache2
    return _PREFILL_VS_STEPS[name]


def test_prefill_equals_token_by_token(any_model):
    name, model, ids = any_model
    prefill, cache, steps, cache2 = _prefill_vs_steps(name, model, ids)
    err = np.abs(prefill - steps).max()
    assert err <= 1e-5, f"{name}: prefill vs token-by-token max |diff| = {err:.3e}"
    assert cache.length == cache2.length == len(ids)
    assert cache.tokens == cache2.tokens == list(ids)


def test_prefill_equals_token_by_token_bitwise(any_model):
    """simd.h promises prefill == token-by-token decode bit for bit (logits and K/V rows)."""
    name, model, ids = any_model
    prefill, cache, steps, cache2 = _prefill_vs_steps(name, model, ids)
    np.testing.assert_array_equal(prefill, steps, err_msg=name)
    n = len(ids)
    for layer in range(model.config.num_hidden_layers):
        np.testing.assert_array_equal(cache.k[layer][:n], cache2.k[layer][:n])
        np.testing.assert_array_equal(cache.v[layer][:n], cache2.v[layer][:n])


def test_last_logits_equal_last_row_of_all(any_model):
    name, model, ids = any_model
    all_rows = model.forward(ids, model.new_cache(), logits="all")
    last = np.array(model.forward(ids, model.new_cache(), logits="last"), copy=True)
    np.testing.assert_array_equal(last, all_rows[-1])
    cache = model.new_cache()
    assert model.forward(ids, cache, logits="none") is None
    assert cache.length == len(ids)
    np.testing.assert_array_equal(model.forward([4], cache), model.forward(ids + [4], model.new_cache()))


def test_chunked_prefill_equals_unchunked(any_model):
    name, model, ids = any_model
    chunked = Model(model.config, model.weights, max_chunk=3)
    c1, c2 = model.new_cache(), chunked.new_cache()
    a = model.forward(ids, c1, logits="all")
    b = chunked.forward(ids, c2, logits="all")
    assert np.abs(a - b).max() <= 1e-5
    np.testing.assert_array_equal(a, b, err_msg=f"{name}: chunked prefill differs from unchunked")
    np.testing.assert_array_equal(np.array(model.forward(ids, model.new_cache()), copy=True),
                                  chunked.forward(ids, chunked.new_cache()))
    for layer in range(model.config.num_hidden_layers):
        np.testing.assert_array_equal(c1.k[layer][:len(ids)], c2.k[layer][:len(ids)])
        np.testing.assert_array_equal(c1.v[layer][:len(ids)], c2.v[layer][:len(ids)])


def test_prompt_in_pieces_through_cache(any_model):
    """Prefill at a nonzero offset (5 + 1 + rest) == one prefill."""
    name, model, ids = any_model
    whole = model.forward(ids, model.new_cache(), logits="all")
    cache = model.new_cache()
    parts = [model.forward(ids[:5], cache, logits="all"), model.forward(ids[5:6], cache, logits="all"),
             model.forward(ids[6:], cache, logits="all")]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_trim_then_reforward_equals_fresh(any_model):
    name, model, ids = any_model
    v = model.config.vocab_size
    fresh_cache = model.new_cache()
    fresh = model.forward(ids + [5, 6], fresh_cache, logits="all")
    cache = model.new_cache()
    model.forward(ids + [(7 * i + 3) % v for i in range(9)], cache, logits="none")  # a wrong continuation
    cache.trim(len(ids))
    assert cache.length == len(ids) and cache.tokens == list(ids)
    redo = model.forward([5, 6], cache, logits="all")
    np.testing.assert_array_equal(redo, fresh[len(ids):])
    # trim into the prompt and redo its end
    cache.trim(4)
    again = model.forward(ids[4:] + [5, 6], cache, logits="all")
    np.testing.assert_array_equal(again, fresh[4:])
    # reset and start over
    cache.reset()
    assert cache.length == 0 and cache.tokens == []
    np.testing.assert_array_equal(model.forward(ids + [5, 6], cache, logits="all"), fresh)
    with pytest.raises(ValueError, match="trim"):
        cache.trim(cache.length + 1)
    with pytest.raises(ValueError):
        cache.trim(-1)


def test_threads_whole_forward(any_model):
    name, model, ids = any_model
    outs = []
    for n in (1, 2):
        with threads(n):
            cache = model.new_cache()
            prompt = model.forward(ids, cache, logits="all")
            dec = np.array(model.forward([3], cache), copy=True)
            outs.append((prompt, dec))
    np.testing.assert_array_equal(outs[0][0], outs[1][0], err_msg=f"{name}: prefill depends on threads")
    np.testing.assert_array_equal(outs[0][1], outs[1][1], err_msg=f"{name}: decode depends on threads")


def test_threads_long_prefill_story(story):
    """A prompt long enough that every kernel takes its parallel path."""
    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, 2048, 150).tolist()
    outs = []
    for n in (1, 2):
        with threads(n):
            outs.append(story.forward(ids, story.new_cache(), logits="all"))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_cache_accounting(story):
    cache = story.new_cache(32)
    assert cache.max_len == 32 and cache.remaining == 32
    story.forward(STORY_PROMPT, cache)
    c = story.config
    assert cache.remaining == 32 - len(STORY_PROMPT)
    assert cache.nbytes_used() == 2 * c.num_hidden_layers * len(STORY_PROMPT) * c.kv_dim * 4
    assert cache.nbytes_reserved() == 2 * c.num_hidden_layers * 32 * c.kv_dim * 4
    assert cache.common_prefix(STORY_PROMPT[:3] + [9]) == 3
    with pytest.raises(ValueError, match="max_len"):
        story.new_cache(c.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="max_len"):
        story.new_cache(0)


def test_fill_cache_to_the_last_position(synthetic_dirs):
    model = llm_fast.load_model(str(synthetic_dirs["hd64"]))
    n = model.config.max_position_embeddings
    cache = model.new_cache()
    ids = [(5 * i) % model.config.vocab_size for i in range(n)]
    model.forward(ids[:-1], cache, logits="none")
    last = np.array(model.forward(ids[-1:], cache), copy=True)
    assert cache.remaining == 0
    np.testing.assert_array_equal(last, model.forward(ids, model.new_cache()))
    ref_model = ReferenceModel(model.config, model.weights, dtype=np.float64)
    ref = ref_model.forward(ids, ref_model.new_cache())
    assert np.abs(last - ref[-1]).max() <= 1e-4


# --- forward errors --------------------------------------------------------------------------------

def test_forward_errors(story):
    cache = story.new_cache(16)
    with pytest.raises(ValueError, match="empty"):
        story.forward([], cache)
    with pytest.raises(ValueError, match="empty"):
        story.forward(np.array([], np.int64), cache)
    with pytest.raises(ValueError, match="2048") as info:
        story.forward([1, 2048, 5], cache)
    assert "vocab" in str(info.value)
    with pytest.raises(ValueError, match="-1"):
        story.forward([1, -1], cache)
    with pytest.raises(ValueError, match="99999"):
        story.forward([99999], cache)
    with pytest.raises(TypeError, match="integer"):
        story.forward([1.0, 2.0], cache)
    with pytest.raises(ValueError, match="logits"):
        story.forward([1], cache, logits="first")
    assert cache.length == 0 and cache.tokens == []  # nothing was written by the failed calls
    story.forward(list(range(3, 13)), cache)
    with pytest.raises(ValueError, match="cache") as info:
        story.forward(list(range(3, 10)), cache)      # 10 + 7 > 16
    assert "16" in str(info.value)
    assert cache.length == 10
    story.forward(list(range(3, 9)), cache)           # exactly fills it
    assert cache.remaining == 0
    with pytest.raises(ValueError, match="cache"):
        story.forward([5], cache)


def test_forward_rejects_cache_of_another_model(story, synthetic_dirs):
    other = llm_fast.load_model(str(synthetic_dirs["gqa3"]))
    with pytest.raises(ValueError, match="different model"):
        story.forward([1, 2], other.new_cache())


# --- the decode step does not allocate --------------------------------------------------------

def _decode_peak_growth(model, prompt, steps=50) -> int:
    cache = model.new_cache()
    tok = int(np.argmax(model.forward(prompt, cache)))
    for _ in range(3):                       # warm-up
        tok = int(np.argmax(model.forward([tok], cache)))
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(steps):
            tok = int(np.argmax(model.forward([tok], cache)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def test_decode_allocates_no_large_arrays_story(story):
    growth = _decode_peak_growth(story, STORY_PROMPT)
    # the smallest per-token buffer worth calling large, the logits row, is 2048 * 4 = 8 KiB
    assert growth < 8 * 1024, f"50 decode steps raised the traced peak by {growth} bytes"


def test_decode_allocates_no_large_arrays_synthetic(tmp_path):
    cfg = dict(vocab_size=4099, hidden_size=64, intermediate_size=1000, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    model = llm_fast.load_model(str(write_model(tmp_path / "m", cfg, seed=5)))
    growth = _decode_peak_growth(model, [1, 2, 3, 4, 5])
    # logits 16 KiB, fused gate/up row 8 KiB: none may be allocated per step
    assert growth < 6 * 1024, f"50 decode steps raised the traced peak by {growth} bytes"
