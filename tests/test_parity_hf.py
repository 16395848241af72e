"""Parity with Hugging Face transformers (float32, eager attention) on checked-in goldens.

The goldens are written by scripts/make_fixtures.py (see tests/fixtures/README.md); these tests
need only numpy and llm_fast. Every logit must be within ATOL (max abs) of transformers', for
the prompt (one forward), for every decode step through the same KV cache, and greedy decoding
must reproduce transformers' token ids exactly.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import llm_fast

ATOL = 1e-4
HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
STORY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "story"
STORY_GOLDEN = FIXTURES / "story_golden.npz"
RANDOM_DIRS = sorted(p for p in (FIXTURES / "models").iterdir() if (p / "golden.npz").is_file())


@functools.lru_cache(maxsize=None)
def load_model(path: str):
    return llm_fast.load_model(path)


def load_golden(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        golden = {k: z[k] for k in z.files}
    golden["meta"] = json.loads(str(golden["meta"]))
    return golden


def assert_logits_close(got, want: np.ndarray, what: str) -> None:
    got = np.asarray(got)
    assert got.dtype == np.float32, f"{what}: logits dtype {got.dtype}, expected float32"
    assert got.shape == want.shape, f"{what}: logits shape {got.shape}, expected {want.shape}"
    diff = np.abs(got.astype(np.float64) - want)
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    assert diff.max() <= ATOL, (
        f"{what}: max |llm_fast - transformers| = {diff.max():.3e} > {ATOL:g} at index {tuple(map(int, worst))} "
        f"(got {got[worst]:.6f}, want {want[worst]:.6f})"
    )


def check_prompt_then_decode(model, golden: dict) -> None:
    """Whole prompt in one forward, then each golden decode token through the same cache."""
    cache = model.new_cache()
    prompt = golden["prompt_ids"]
    logits = model.forward(prompt.tolist(), cache, logits="all")
    assert_logits_close(logits, golden["prompt_logits"], f"prompt ({len(prompt)} tokens)")
    assert cache.length == len(prompt)
    for step, (tok, want) in enumerate(zip(golden["decode_ids"], golden["decode_logits"])):
        last = model.forward([int(tok)], cache)
        assert_logits_close(last, want, f"decode step {step} (position {len(prompt) + step}, token {int(tok)})")
    assert cache.length == len(prompt) + len(golden["decode_ids"])


def greedy_ids(model, prompt: np.ndarray, max_new: int, eos: int | None) -> list[int]:
    """argmax decoding over model.forward outputs, stopping after eos or max_new new tokens."""
    cache = model.new_cache()
    ids = prompt.tolist()
    last = model.forward(ids, cache)
    for _ in range(max_new):
        tok = int(np.argmax(last))
        ids.append(tok)
        if tok == eos:
            break
        last = model.forward([tok], cache)
    return ids


def assert_same_ids(got: list[int], want: np.ndarray, n_prompt: int) -> None:
    want = want.tolist()
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise AssertionError(
            f"greedy ids diverge at generated token {first - n_prompt} (sequence index {first}): "
            f"got {got[first:first + 8]}..., transformers {want[first:first + 8]}... "
            f"(lengths {len(got)} vs {len(want)})"
        )


# --- the story model (TinyStories-656K, read from ../shared/models/story) --------------------


@pytest.fixture(scope="module")
def story():
    if not (STORY_DIR / "model.safetensors").is_file():
        pytest.skip(f"story model not found at {STORY_DIR} (expected ../shared/models/story next to the repo)")
    golden = load_golden(STORY_GOLDEN)
    digest = hashlib.sha256((STORY_DIR / "model.safetensors").read_bytes()).hexdigest()
    if digest != golden["meta"]["model_sha256"]:
        pytest.fail(f"{STORY_DIR}/model.safetensors has sha256 {digest}, the golden was made from "
                    f"{golden['meta']['model_sha256']}: regenerate with scripts/make_fixtures.py")
    return load_model(str(STORY_DIR)), golden


def test_story_prompt_and_decode_logits(story):
    model, golden = story
    assert len(golden["decode_ids"]) >= 50
    check_prompt_then_decode(model, golden)


def test_story_greedy_until_eos(story):
    model, golden = story
    meta = golden["meta"]
    assert golden["greedy_ids"][-1] == meta["eos_id"], "golden continuation should end with EOS"
    got = greedy_ids(model, golden["prompt_ids"], meta["max_new_tokens"], meta["eos_id"])
    assert_same_ids(got, golden["greedy_ids"], len(golden["prompt_ids"]))


# --- seeded random-weight models made with transformers (tests/fixtures/models/<name>) ---------


@pytest.fixture(params=RANDOM_DIRS, ids=[p.name for p in RANDOM_DIRS])
def random_model(request):
    folder = request.param
    return load_model(str(folder)), load_golden(folder / "golden.npz")


def test_random_prompt_and_decode_logits(random_model):
    model, golden = random_model
    check_prompt_then_decode(model, golden)


def test_random_greedy(random_model):
    model, golden = random_model
    n_prompt = len(golden["prompt_ids"])
    got = greedy_ids(model, golden["prompt_ids"], len(golden["greedy_ids"]) - n_prompt, eos=None)
    assert_same_ids(got, golden["greedy_ids"], n_prompt)


@pytest.mark.parametrize("chunks", [(5, 7), (1,) * 12], ids=["5+7", "one_by_one"])
def test_random_chunked_prefill(random_model, chunks):
    """A prompt fed in pieces through the cache (prefill at a nonzero offset) matches one HF forward."""
    model, golden = random_model
    prompt = golden["prompt_ids"].tolist()
    assert sum(chunks) == len(prompt)
    cache = model.new_cache()
    parts, start = [], 0
    for n in chunks:
        parts.append(np.array(model.forward(prompt[start:start + n], cache, logits="all"), copy=True))
        start += n
    assert_logits_close(np.concatenate(parts), golden["prompt_logits"], f"prompt in chunks {chunks}")


def test_fixture_coverage():
    """The random fixtures cover what the parity criterion asks for (guards against regenerating less)."""
    metas = [load_golden(p / "golden.npz")["meta"] for p in RANDOM_DIRS]
    configs = [json.loads((p / "config.json").read_text()) for p in RANDOM_DIRS]

    def theta(c):
        return c["rope_theta"] if "rope_theta" in c else c["rope_parameters"]["rope_theta"]

    ratios = {c["num_attention_heads"] // c["num_key_value_heads"] for c in configs}
    head_dims = {c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"] for c in configs}
    assert {True, False} <= {c["tie_word_embeddings"] for c in configs}
    assert {1, 2, 3} <= ratios
    assert any(hd & (hd - 1) for hd in head_dims), f"no head_dim that is not a power of two in {head_dims}"
    assert {10000.0, 500000.0, 1000000.0} <= {theta(c) for c in configs}
    assert {1e-5, 1e-6} <= {c["rms_norm_eps"] for c in configs}
    assert {"float32", "bfloat16", "float16"} <= {m["storage_dtype"] for m in metas}
    assert "MistralForCausalLM" in {m["arch"] for m in metas}
    assert any(c["tie_word_embeddings"] and not m["stores_lm_head"] for c, m in zip(configs, metas))


def test_random_trim_and_redo(random_model):
    """cache.trim(n) keeps the first n positions: rewinding over a wrong token still matches HF."""
    model, golden = random_model
    prompt, decode_ids = golden["prompt_ids"].tolist(), golden["decode_ids"].tolist()
    cache = model.new_cache()
    model.forward(prompt + decode_ids[:5], cache, logits="all")
    cache.trim(len(prompt) + 2)
    model.forward([(decode_ids[2] + 1) % len(golden["prompt_logits"][0])], cache)  # a token HF never saw
    cache.trim(len(prompt) + 2)
    assert cache.length == len(prompt) + 2
    for step in range(2, len(decode_ids)):
        last = model.forward([decode_ids[step]], cache)
        assert_logits_close(last, golden["decode_logits"][step], f"decode step {step} after trim")
