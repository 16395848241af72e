"""The fused decode step (csrc/decode.h) against the Python layer loop it replaces.

Invariants, not tolerances: for float32 weights the fused step runs the same kernels in the same
order for every output element, so its logits must be bit-identical to the layer loop's, to the
rows of a one-shot prefill (logits="all"), and to itself at 1 and 2 threads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import llm_fast
from llm_fast import synthetic
from llm_fast.memory import aligned_empty, aligned_copy
from llm_fast.model import Model

HERE = Path(__file__).resolve().parent
STORY_DIR = HERE.parents[1] / "shared" / "models" / "story"
FIXTURE_DIRS = sorted(p for p in (HERE / "fixtures" / "models").iterdir() if (p / "config.json").is_file())


def _models():
    out = [pytest.param(("synthetic", "story-656k"), id="synthetic-story-656k")]
    out += [pytest.param(("dir", str(p)), id=p.name) for p in FIXTURE_DIRS]
    if (STORY_DIR / "model.safetensors").is_file():
        out.append(pytest.param(("dir", str(STORY_DIR)), id="story"))
    return out


def _load(spec):
    kind, name = spec
    if kind == "synthetic":
        return Model(*synthetic.build(name, seed=3))
    return llm_fast.load_model(name)


def _decode(model, ids, fused: bool, threads: int | None = None):
    old = llm_fast.get_num_threads()
    if threads:
        llm_fast.set_num_threads(threads)
    try:
        model.use_fused_decode = fused
        model._plan.adaptive = False   # run on exactly `threads` threads
        cache = model.new_cache(min(64, model.config.max_position_embeddings))
        return np.stack([np.array(model.forward([t], cache), copy=True) for t in ids]), cache
    finally:
        model.use_fused_decode = True
        model._plan.adaptive = True
        llm_fast.set_num_threads(old)


@pytest.mark.parametrize("spec", _models())
def test_fused_equals_layer_loop_and_prefill(spec):
    model = _load(spec)
    assert model.use_fused_decode, "float32 weights should get the fused decode step"
    n = min(23, model.config.max_position_embeddings)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, n).tolist()
    fused, c1 = _decode(model, ids, fused=True)
    loop, c2 = _decode(model, ids, fused=False)
    np.testing.assert_array_equal(fused, loop)
    for l in range(model.config.num_hidden_layers):   # same K/V rows written
        np.testing.assert_array_equal(c1.k[l][:n], c2.k[l][:n])
        np.testing.assert_array_equal(c1.v[l][:n], c2.v[l][:n])
    cache = model.new_cache(min(64, model.config.max_position_embeddings))
    prefill = model.forward(ids, cache, logits="all")
    np.testing.assert_array_equal(prefill, fused)


@pytest.mark.parametrize("spec", _models()[:3])
def test_fused_thread_count_invariance(spec):
    model = _load(spec)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 17).tolist()
    one, _ = _decode(model, ids, fused=True, threads=1)
    two, _ = _decode(model, ids, fused=True, threads=2)
    np.testing.assert_array_equal(one, two)


def test_fused_decode_checks_inputs():
    model = Model(*synthetic.build("story-656k"))
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward([model.config.vocab_size], cache)
    model.forward([1], cache)
    model.forward([2], cache, logits="none")
    assert cache.length == 2 and cache.tokens == [1, 2]
    with pytest.raises(ValueError, match="do not fit"):
        model.forward([3], cache)


def test_synthetic_shapes_are_deterministic():
    c1, w1 = synthetic.build("story-656k", seed=7)
    c2, w2 = synthetic.build("story-656k", seed=7)
    np.testing.assert_array_equal(w1.layers[1].qkv_proj, w2.layers[1].qkv_proj)
    assert synthetic.n_params(c1) == 656_000  # the story model's parameter count
    assert w1.lm_head is w1.embed_tokens  # tied, as the story model
    assert synthetic.n_params(synthetic.config("110m")) == pytest.approx(109.5e6, rel=0.01)
    assert synthetic.n_params(synthetic.config("smollm2-135m")) == 134_515_008
    with pytest.raises(ValueError, match="unknown synthetic model"):
        synthetic.config("7b")


def test_aligned_buffers():
    for shape in [(3,), (97, 101), (1024, 1024)]:
        a = aligned_empty(shape)
        assert a.shape == shape and a.dtype == np.float32 and a.ctypes.data % 64 == 0
    big = aligned_empty((1 << 20,))
    assert big.ctypes.data % (2 << 20) == 0
    x = np.arange(10, dtype=np.float32)[1:]
    y = aligned_copy(x)
    assert y.ctypes.data % 64 == 0 and np.array_equal(x, y)


# ------------------------------------------------------------------ quantized weights

def _quantized_models():
    import json
    # fixtures whose hidden size is a whole number of 32-blocks (others stay float32)
    blocky = [p for p in FIXTURE_DIRS
              if json.loads((p / "config.json").read_text())["hidden_size"] % 32 == 0][:3]
    out = [pytest.param((str(p), q), id=f"{p.name}-{q}") for p in blocky
           for q in ("q8_0", "q4_0", "q4_1")]
    if (STORY_DIR / "model.safetensors").is_file():
        out += [pytest.param((str(STORY_DIR), q), id=f"story-{q}") for q in ("q8_0", "q4_1")]
    return out


@pytest.mark.parametrize("spec", _quantized_models())
@pytest.mark.parametrize("mode", ["auto", "q8", "q8x2", "f32"])
def test_fused_quantized_equals_layer_loop(spec, mode):
    """Quantized matrices in the fused step: the same activation quantization and row kernels
    as quant.matmul, so bit-identical logits and K/V rows to the Python layer loop, in every
    activation mode ("auto" decodes with q8x2), at 1 and 2 threads."""
    path, q = spec
    model = llm_fast.load_model(path, quantize=q, activations=mode)
    assert model.quantized_matrices() and model.use_fused_decode
    n = min(19, model.config.max_position_embeddings)
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, n).tolist()
    fused, c1 = _decode(model, ids, fused=True)
    loop, c2 = _decode(model, ids, fused=False)
    np.testing.assert_array_equal(fused, loop)
    for l in range(model.config.num_hidden_layers):
        np.testing.assert_array_equal(c1.k[l][:n], c2.k[l][:n])
        np.testing.assert_array_equal(c1.v[l][:n], c2.v[l][:n])
    one, _ = _decode(model, ids, fused=True, threads=1)
    np.testing.assert_array_equal(one, fused)
    if mode != "auto":   # auto prefills >= 16 rows with float activations
        prefill = model.forward(ids, model.new_cache(64), logits="all")
        np.testing.assert_array_equal(prefill, fused)


def test_fused_step_follows_activation_mode_changes():
    model = llm_fast.load_model(str(FIXTURE_DIRS[0]), quantize="q4_1")
    ids = np.random.default_rng(6).integers(0, model.config.vocab_size, 9).tolist()
    runs = {}
    for mode in ("q8", "f32", "q8"):
        model.set_activations(mode)
        fused, _ = _decode(model, ids, fused=True)
        loop, _ = _decode(model, ids, fused=False)
        np.testing.assert_array_equal(fused, loop)
        runs.setdefault(mode, fused)
    assert not np.array_equal(runs["q8"], runs["f32"])   # the mode really changed the numbers
    # one matrix set directly (not through the model) is seen too
    model.quantized_matrices()[0].activations = "f32"
    fused, _ = _decode(model, ids, fused=True)
    loop, _ = _decode(model, ids, fused=False)
    np.testing.assert_array_equal(fused, loop)
