"""Loading: malformed safetensors and config.json, missing / wrong / extra tensors, F16 and BF16
storage, sharded checkpoints, and our SafetensorsFile reader against the `safetensors` package.

Every error must be an llm_fast.errors type (LLMFastError; ConfigError / WeightsError are also
ValueErrors) whose message names the file (or model folder) and the thing at fault.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import llm_fast
from llm_fast.config import ModelConfig
from llm_fast.errors import ConfigError, LLMFastError, ModelNotFoundError, WeightsError
from llm_fast.safetensors_file import SafetensorsFile

STORY_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "story"

CFG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
           vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
           rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
           bos_token_id=1, eos_token_id=2)


# --- writers ---------------------------------------------------------------------------------

def llama_tensors(cfg: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh

    def mat(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    t = {"model.embed_tokens.weight": rng.standard_normal((v, h)).astype(np.float32),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)}
    if not cfg.get("tie_word_embeddings"):
        t["lm_head.weight"] = mat(v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        t[p + "self_attn.q_proj.weight"] = mat(nh * hd, h)
        t[p + "self_attn.k_proj.weight"] = mat(nkv * hd, h)
        t[p + "self_attn.v_proj.weight"] = mat(nkv * hd, h)
        t[p + "self_attn.o_proj.weight"] = mat(h, nh * hd)
        t[p + "mlp.gate_proj.weight"] = mat(inter, h)
        t[p + "mlp.up_proj.weight"] = mat(inter, h)
        t[p + "mlp.down_proj.weight"] = mat(h, inter)
    return t


def safetensors_bytes(tensors: dict, header_patch=None, header_len=None) -> bytes:
    """A safetensors file image. tensors: name -> (dtype string, array whose bytes are stored).

    header_patch(header) may corrupt the header dict; header_len overrides the length field.
    """
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, arr) in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if header_patch is not None:
        header_patch(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    n = len(h) if header_len is None else header_len
    return struct.pack("<Q", n) + h + b"".join(blobs)


def write_folder(folder: Path, cfg: dict = CFG, tensors: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(llama_tensors(cfg) if tensors is None else tensors, str(folder / "model.safetensors"))
    return folder


def expect(exc_type, fn, *needles):
    """fn() raises exc_type (an LLMFastError) whose message contains every needle."""
    with pytest.raises(exc_type) as info:
        fn()
    err = info.value
    assert isinstance(err, LLMFastError), f"{type(err).__name__} is not an llm_fast error"
    msg = str(err)
    for n in needles:
        assert str(n) in msg, f"message {msg!r} does not mention {n!r}"
    assert "\n" not in msg.strip(), f"multi-line message {msg!r}"
    return msg


# --- malformed safetensors -------------------------------------------------------------------

@pytest.fixture
def good_image():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    return {"w": ("F32", a), "b": ("F32", np.ones(5, np.float32))}


def test_valid_image_reads(tmp_path, good_image):
    p = tmp_path / "ok.safetensors"
    p.write_bytes(safetensors_bytes(good_image))
    f = SafetensorsFile(str(p))
    assert set(f.keys()) == {"w", "b"} and "w" in f
    assert f.metadata == {"format": "pt"}
    np.testing.assert_array_equal(f.to_float32("w"), good_image["w"][1])
    assert f.shape("b") == (5,) and f.dtype_name("b") == "F32"
    assert not f.to_float32("w").flags.writeable  # a read-only view of the mapping


@pytest.mark.parametrize("size", [0, 5])
def test_file_too_short(tmp_path, size):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01" * size)
    expect(WeightsError, lambda: SafetensorsFile(str(p)), p, str(size))


def test_truncated_in_header(tmp_path, good_image):
    img = safetensors_bytes(good_image)
    p = tmp_path / "t.safetensors"
    p.write_bytes(img[:20])
    expect(WeightsError, lambda: SafetensorsFile(str(p)), p, "header length")


def test_truncated_in_data(tmp_path, good_image):
    img = safetensors_bytes(good_image)
    p = tmp_path / "t.safetensors"
    p.write_bytes(img[:-4])
    expect(WeightsError, lambda: SafetensorsFile(str(p)), p, "'b'", "data_offsets")


@pytest.mark.parametrize("n", [2 ** 40, 2 ** 64 - 1, 10 ** 6])
def test_header_length_too_large(tmp_path, good_image, n):
    p = tmp_path / "big.safetensors"
    p.write_bytes(safetensors_bytes(good_image, header_len=n))
    expect(WeightsError, lambda: SafetensorsFile(str(p)), p, str(n))


@pytest.mark.parametrize("payload, needle", [
    (b"this is not json", "JSON"),
    (b"\xff\xfe\x00garbage", "JSON"),
    (b"[1, 2, 3]", "JSON object"),
    (b'{"w": {"dtype": "F32"', "JSON"),
])
def test_header_not_json(tmp_path, payload, needle):
    p = tmp_path / "nj.safetensors"
    p.write_bytes(struct.pack("<Q", len(payload)) + payload + b"\0" * 16)
    expect(WeightsError, lambda: SafetensorsFile(str(p)), p, needle)


def test_data_offsets_beyond_file(tmp_path, good_image):
    def patch(h):
        h["b"]["data_offsets"] = [48, 48 + 20 + 4000]
        h["b"]["shape"] = [1005]
    p = tmp_path / "o.safetensors"
    p.write_bytes(safetensors_bytes(good_image, patch))
    expect(WeightsError, lambda: SafetensorsFile(str(p)), p, "'b'", "data_offsets")


def test_data_offsets_reversed(tmp_path, good_image):
    def patch(h):
        h["w"]["data_offsets"] = [48, 0]
    p = tmp_path / "r.safetensors"
    p.write_bytes(safetensors_bytes(good_image, patch))
    expect(WeightsError, lambda: SafetensorsFile(str(p)), p, "'w'")


def test_bytes_do_not_match_shape(tmp_path, good_image):
    def patch(h):
        h["w"]["shape"] = [4, 4]          # 64 bytes needed, 48 stored
    p = tmp_path / "s.safetensors"
    p.write_bytes(safetensors_bytes(good_image, patch))
    expect(WeightsError, lambda: SafetensorsFile(str(p)), p, "'w'", "48", "64", "[4, 4]")


@pytest.mark.parametrize("dtype", ["F8_E4M3", "Q4", "float32", ""])
def test_unsupported_dtype_in_header(tmp_path, good_image, dtype):
    def patch(h):
        h["w"]["dtype"] = dtype
    p = tmp_path / "d.safetensors"
    p.write_bytes(safetensors_bytes(good_image, patch))
    expect(WeightsError, lambda: SafetensorsFile(str(p)), p, "'w'", repr(dtype))


@pytest.mark.parametrize("patch", [
    lambda h: h["w"].pop("data_offsets"),
    lambda h: h["w"].pop("shape"),
    lambda h: h["w"].update(shape="abc"),
    lambda h: h.update(w="not an object"),
    lambda h: h["w"].update(shape=[-3, -4]),
], ids=["no_offsets", "no_shape", "shape_str", "entry_str", "negative"])
def test_malformed_entry(tmp_path, good_image, patch):
    p = tmp_path / "m.safetensors"
    p.write_bytes(safetensors_bytes(good_image, patch))
    expect(WeightsError, lambda: SafetensorsFile(str(p)), p, "'w'")


@pytest.mark.parametrize("shape", [[2.5, 6], [True, 12]], ids=["float", "bool"])
def test_non_integer_shape_rejected(tmp_path, good_image, shape):
    def patch(h):
        h["w"]["shape"] = shape           # 48 bytes would match (2, 6) / (1, 12) after int()
    p = tmp_path / "f.safetensors"
    p.write_bytes(safetensors_bytes(good_image, patch))
    expect(WeightsError, lambda: SafetensorsFile(str(p)), p, "'w'")


def test_missing_file(tmp_path):
    p = tmp_path / "nope.safetensors"
    expect(WeightsError, lambda: SafetensorsFile(str(p)), p)


def test_integer_weight_rejected_at_load(tmp_path):
    """A weight stored as I32 (a valid safetensors dtype, but not a float) names file, tensor, dtype."""
    t = llama_tensors(CFG)
    folder = write_folder(tmp_path / "m", tensors=t)
    img = {k: ("F32", v) for k, v in t.items()}
    img["model.norm.weight"] = ("I32", t["model.norm.weight"].astype(np.int32))
    (folder / "model.safetensors").write_bytes(safetensors_bytes(img))
    expect(WeightsError, lambda: llm_fast.load_model(str(folder)), folder, "model.norm.weight", "I32")


def test_malformed_safetensors_through_load_model(tmp_path):
    folder = write_folder(tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect(WeightsError, lambda: llm_fast.load_model(str(folder)), folder / "model.safetensors")


def test_no_safetensors_in_folder(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG))
    expect(WeightsError, lambda: llm_fast.load_model(str(folder)), folder, ".safetensors")


# --- config.json ------------------------------------------------------------------------------

def test_missing_model_folder(tmp_path):
    p = tmp_path / "does_not_exist"
    msg = expect(ModelNotFoundError, lambda: llm_fast.load_model(str(p)), p)
    assert "exist" in msg


def test_missing_config_json(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(llama_tensors(CFG), str(folder / "model.safetensors"))
    expect(ModelNotFoundError, lambda: llm_fast.load_model(str(folder)), folder, "config.json")
    expect(ConfigError, lambda: ModelConfig.from_file(str(folder / "config.json")),
           folder / "config.json", "not found")


def test_file_that_is_not_a_model(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    expect(ModelNotFoundError, lambda: llm_fast.load_model(str(p)), p)


@pytest.mark.parametrize("text", ["{not json", "", '{"a": 1,}', "\xff"])
def test_config_invalid_json(tmp_path, text):
    folder = write_folder(tmp_path / "m")
    (folder / "config.json").write_bytes(text.encode("latin-1"))
    expect(ConfigError, lambda: llm_fast.load_model(str(folder)), folder / "config.json", "JSON")


def test_config_not_an_object(tmp_path):
    folder = write_folder(tmp_path / "m")
    (folder / "config.json").write_text("[1, 2]")
    expect(ConfigError, lambda: llm_fast.load_model(str(folder)), folder / "config.json", "object")


def _bad_config(tmp_path, **changes):
    cfg = dict(CFG)
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    folder = write_folder(tmp_path / "m", cfg, tensors=llama_tensors(CFG))
    return folder


@pytest.mark.parametrize("changes, needles", [
    (dict(architectures=["GPT2LMHeadModel"]), ["GPT2LMHeadModel"]),
    (dict(architectures=["Qwen2ForCausalLM"]), ["Qwen2ForCausalLM"]),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), ["yarn"]),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), ["dynamic"]),
    (dict(rope_theta=..., rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), ["yarn"]),
    (dict(rope_scaling={"rope_type": "linear"}), ["rope_scaling.factor"]),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["low_freq_factor"]),
    (dict(rope_scaling="linear"), ["rope_scaling"]),
    (dict(num_attention_heads=4, num_key_value_heads=3), ["num_attention_heads", "num_key_value_heads", "4", "3"]),
    (dict(hidden_size=30), ["hidden_size", "30", "num_attention_heads"]),
    (dict(head_dim=7), ["head_dim", "7"]),
    (dict(hidden_size=32.5), ["hidden_size", "32.5"]),
    (dict(hidden_size="32"), ["hidden_size", "'32'"]),
    (dict(vocab_size=True), ["vocab_size", "True"]),
    (dict(num_hidden_layers=0), ["num_hidden_layers", "0"]),
    (dict(intermediate_size=-48), ["intermediate_size", "-48"]),
    (dict(num_key_value_heads=1.5), ["num_key_value_heads", "1.5"]),
    (dict(max_position_embeddings="long"), ["max_position_embeddings"]),
    (dict(rms_norm_eps=-1.0), ["rms_norm_eps"]),
    (dict(rope_theta="big"), ["rope_theta", "big"]),
    (dict(hidden_act="gelu"), ["hidden_act", "gelu"]),
    (dict(attention_bias=True), ["attention_bias"]),
    (dict(eos_token_id="</s>"), ["eos_token_id"]),
], ids=lambda v: "-".join(f"{k}" for k in v) if isinstance(v, dict) else None)
def test_config_problems(tmp_path, changes, needles):
    folder = _bad_config(tmp_path, **changes)
    expect(ConfigError, lambda: llm_fast.load_model(str(folder)), folder / "config.json", *needles)


def test_config_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError) and issubclass(WeightsError, ValueError)
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig.from_dict({**CFG, "architectures": ["BertModel"]})


def test_config_from_dict_defaults_and_variants():
    c = ModelConfig.from_dict({k: v for k, v in CFG.items() if k != "num_key_value_heads"})
    assert c.num_key_value_heads == c.num_attention_heads == 4 and c.head_dim == 8
    c = ModelConfig.from_dict({**CFG, "eos_token_id": [2, 5]})
    assert c.eos_token_ids == (2, 5)
    c = ModelConfig.from_dict({**CFG, "rope_scaling": {"rope_type": "default"}})
    assert c.rope_scaling is None
    c = ModelConfig.from_dict({**CFG, "rope_theta": None,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert c.rope_theta == 5e5 and c.rope_scaling is None


# --- tensors vs config --------------------------------------------------------------------------

def test_missing_tensor(tmp_path):
    t = llama_tensors(CFG)
    del t["model.layers.1.mlp.up_proj.weight"]
    folder = write_folder(tmp_path / "m", tensors=t)
    expect(WeightsError, lambda: llm_fast.load_model(str(folder)), folder,
           "model.layers.1.mlp.up_proj.weight", "missing", "[48, 32]")


def test_missing_lm_head_untied(tmp_path):
    t = llama_tensors(CFG)
    del t["lm_head.weight"]
    folder = write_folder(tmp_path / "m", tensors=t)
    expect(WeightsError, lambda: llm_fast.load_model(str(folder)), folder, "lm_head.weight")


def test_missing_embedding_and_head(tmp_path):
    t = llama_tensors(CFG)
    del t["lm_head.weight"], t["model.embed_tokens.weight"]
    folder = write_folder(tmp_path / "m", tensors=t)
    expect(WeightsError, lambda: llm_fast.load_model(str(folder)), folder, "model.embed_tokens.weight")


@pytest.mark.parametrize("name, shape, expected", [
    ("model.layers.0.self_attn.q_proj.weight", (32, 33), "[32, 32]"),
    ("model.layers.1.self_attn.k_proj.weight", (8, 32), "[16, 32]"),
    ("model.norm.weight", (31,), "[32]"),
    ("model.embed_tokens.weight", (68, 32), "[67, 32]"),
    ("model.layers.0.mlp.down_proj.weight", (48, 32), "[32, 48]"),  # transposed
])
def test_wrong_shape_tensor(tmp_path, name, shape, expected):
    t = llama_tensors(CFG)
    t[name] = np.zeros(shape, np.float32)
    folder = write_folder(tmp_path / "m", tensors=t)
    expect(WeightsError, lambda: llm_fast.load_model(str(folder)), folder, name,
           str(list(shape)), expected)


def test_unexpected_extra_tensor(tmp_path):
    t = llama_tensors(CFG)
    t["model.layers.2.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)  # a third layer
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    folder = write_folder(tmp_path / "m", tensors=t)
    expect(WeightsError, lambda: llm_fast.load_model(str(folder)), folder, "unexpected",
           "model.layers.2.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.bias")


def test_rotary_inv_freq_is_ignored(tmp_path):
    t = llama_tensors(CFG)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    folder = write_folder(tmp_path / "m", tensors=t)
    llm_fast.load_model(str(folder))


def test_all_problems_reported_together(tmp_path):
    t = llama_tensors(CFG)
    del t["model.layers.0.mlp.gate_proj.weight"]
    t["model.norm.weight"] = np.zeros(3, np.float32)
    folder = write_folder(tmp_path / "m", tensors=t)
    expect(WeightsError, lambda: llm_fast.load_model(str(folder)), "model.layers.0.mlp.gate_proj.weight",
           "model.norm.weight")


# --- F16 / BF16 storage ---------------------------------------------------------------------------

def _forward(folder, ids=(1, 5, 9, 33, 2, 60)):
    m = llm_fast.load_model(str(folder))
    return m, m.forward(list(ids), m.new_cache(), logits="all")


def test_f16_weights_load_as_float32(tmp_path):
    t32 = llama_tensors(CFG, seed=3)
    t16 = {k: v.astype(np.float16) for k, v in t32.items()}
    conv = {k: v.astype(np.float32) for k, v in t16.items()}
    f16 = write_folder(tmp_path / "f16", tensors=t16)
    f32 = write_folder(tmp_path / "f32", tensors=conv)
    m16, logits16 = _forward(f16)
    m32, logits32 = _forward(f32)
    w = m16.weights
    assert w.embed_tokens.dtype == np.float32
    np.testing.assert_array_equal(w.embed_tokens, conv["model.embed_tokens.weight"])
    np.testing.assert_array_equal(w.lm_head, conv["lm_head.weight"])
    np.testing.assert_array_equal(w.layers[1].o_proj, conv["model.layers.1.self_attn.o_proj.weight"])
    np.testing.assert_array_equal(w.layers[0].input_layernorm, conv["model.layers.0.input_layernorm.weight"])
    np.testing.assert_array_equal(logits16, logits32)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (as torch)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def test_bf16_weights_load_as_float32(tmp_path):
    t32 = llama_tensors(CFG, seed=4)
    bits = {k: _bf16_bits(v) for k, v in t32.items()}
    conv = {k: (b.astype(np.uint32) << 16).view(np.float32) for k, b in bits.items()}
    folder = tmp_path / "bf16"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG))
    (folder / "model.safetensors").write_bytes(safetensors_bytes({k: ("BF16", b) for k, b in bits.items()}))
    f = SafetensorsFile(str(folder / "model.safetensors"))
    assert f.dtype_name("model.norm.weight") == "BF16"
    np.testing.assert_array_equal(f.to_float32("model.norm.weight"), conv["model.norm.weight"])
    # sanity of the expected values: bf16 keeps ~3 significant digits
    np.testing.assert_allclose(conv["model.norm.weight"], t32["model.norm.weight"], rtol=1 / 128)
    f32 = write_folder(tmp_path / "f32", tensors=conv)
    mbf, logits_bf = _forward(folder)
    _, logits32 = _forward(f32)
    np.testing.assert_array_equal(mbf.weights.embed_tokens, conv["model.embed_tokens.weight"])
    np.testing.assert_array_equal(mbf.weights.layers[1].down_proj, conv["model.layers.1.mlp.down_proj.weight"])
    np.testing.assert_array_equal(logits_bf, logits32)


def test_bf16_special_values(tmp_path):
    bits = np.array([0x0000, 0x8000, 0x3F80, 0xBF80, 0x7F80, 0xFF80, 0x0001, 0x7F7F], np.uint16)
    want = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 9.183549615799121e-41, 3.3895313892515355e38],
                    np.float32)
    p = tmp_path / "x.safetensors"
    p.write_bytes(safetensors_bytes({"x": ("BF16", bits)}))
    got = SafetensorsFile(str(p)).to_float32("x")
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[1])


def test_f64_weights_load_as_float32(tmp_path):
    t = {k: v.astype(np.float64) for k, v in llama_tensors(CFG, seed=6).items()}
    folder = write_folder(tmp_path / "f64", tensors=t)
    m = llm_fast.load_model(str(folder))
    np.testing.assert_array_equal(m.weights.layers[0].o_proj,
                                  t["model.layers.0.self_attn.o_proj.weight"].astype(np.float32))


# --- sharded checkpoints ---------------------------------------------------------------------------

def _write_sharded(folder: Path, tensors: dict, n_shards: int = 3, cfg=CFG) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    names = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::n_shards]}
        save_file(part, str(folder / shard))
        weight_map.update({n: shard for n in part})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_sharded_checkpoint_equals_single_file(tmp_path):
    t = llama_tensors(CFG, seed=8)
    single = write_folder(tmp_path / "single", tensors=t)
    _write_sharded(tmp_path / "sharded", t)
    _, a = _forward(single)
    m, b = _forward(tmp_path / "sharded")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(m.weights.layers[1].qkv_proj, np.concatenate(
        [t[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"]))


def test_sharded_index_ignores_unlisted_files(tmp_path):
    t = llama_tensors(CFG, seed=8)
    folder = tmp_path / "sharded"
    _write_sharded(folder, t)
    # a stray file not in the index (e.g. a leftover consolidated checkpoint) is not read
    (folder / "consolidated.safetensors").write_bytes(b"garbage")
    llm_fast.load_model(str(folder))


def test_sharded_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    _write_sharded(folder, llama_tensors(CFG))
    (folder / "model-00002-of-00003.safetensors").unlink()
    expect(WeightsError, lambda: llm_fast.load_model(str(folder)), "model.safetensors.index.json",
           "model-00002-of-00003.safetensors")


@pytest.mark.parametrize("text", ["{bad json", '{"metadata": {}}', '{"weight_map": [1, 2]}', "[]"])
def test_sharded_malformed_index(tmp_path, text):
    folder = tmp_path / "sharded"
    _write_sharded(folder, llama_tensors(CFG))
    (folder / "model.safetensors.index.json").write_text(text)
    expect(WeightsError, lambda: llm_fast.load_model(str(folder)), "model.safetensors.index.json")


def test_sharded_duplicate_tensor(tmp_path):
    t = llama_tensors(CFG)
    folder = tmp_path / "dup"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG))
    save_file(t, str(folder / "a.safetensors"))
    save_file({"model.norm.weight": t["model.norm.weight"]}, str(folder / "b.safetensors"))
    expect(WeightsError, lambda: llm_fast.load_model(str(folder)), "model.norm.weight",
           "a.safetensors", "b.safetensors")


# --- our reader vs the safetensors package -------------------------------------------------------

def test_reader_matches_safetensors_package_story():
    path = STORY_DIR / "model.safetensors"
    if not path.is_file():
        pytest.skip(f"story model not found at {STORY_DIR}")
    theirs = load_file(str(path))
    ours = SafetensorsFile(str(path))
    assert set(ours.keys()) == set(theirs)
    for name, arr in theirs.items():
        got = ours.raw(name)
        assert got.dtype == arr.dtype and got.shape == arr.shape, name
        np.testing.assert_array_equal(got, arr, err_msg=name)
        np.testing.assert_array_equal(ours.to_float32(name), arr.astype(np.float32), err_msg=name)


def test_reader_matches_safetensors_package_mixed_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    t = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
         "f16": rng.standard_normal((7,)).astype(np.float16),
         "f64": rng.standard_normal((2, 2, 2)),
         "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
         "i8": np.array([-1, 2, 3], np.int8),
         "u8": np.array([255, 0], np.uint8),
         "scalar": np.array(3.5, np.float32),
         "empty": np.zeros((0, 4), np.float32)}
    p = tmp_path / "mixed.safetensors"
    save_file(t, str(p), metadata={"k": "v"})
    theirs = load_file(str(p))
    ours = SafetensorsFile(str(p))
    assert ours.metadata == {"k": "v"}
    for name, arr in theirs.items():
        got = ours.raw(name)
        assert got.dtype == arr.dtype and got.shape == arr.shape, name
        np.testing.assert_array_equal(got, arr)
