"""GGUF (v2/v3) files of Llama-family models: config, weights and tokenizer.

    g = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    g.config      # dict with Hugging Face config.json keys (architectures, hidden_size, ...)
    g.tensors     # HF names -> float32 ndarray (norms, 1-D) or QTensor (matrices, memory-mapped)
    g.tokenizer   # tokenizers.Tokenizer built from tokenizer.ggml.* (no tokenizer.json needed)
    g.bos_token_id, g.eos_token_ids (a set: eos, eot, eom and llama.cpp's end-of-generation
    names), g.add_bos, g.chat_template

The file is read with gguf.GGUFReader (a read-only memory map). Q8_0 / Q4_0 / Q4_1 / F16 / BF16
matrices stay views into the map (QTensor); only F32 / F16 / BF16 vectors are converted to
float32, and the Q and K projections are copied once, because their rows are un-permuted:
llama.cpp's converter stores them ordered for interleaved ("GPT-J") RoPE, and llm_fast uses the
Hugging Face rotate-half form. Before the reader runs, the file structure (header, metadata,
tensor table, tensor extents) is checked, so a malformed file raises GGUFError naming the file
and the problem instead of crashing somewhere inside a memory map.

The tokenizer follows llama.cpp (src/llama-vocab.cpp): "gpt2" vocabularies are byte-level BPE
with the pre-tokenizer regexes llama.cpp uses for `tokenizer.ggml.pre`; "llama" vocabularies
are SentencePiece-style BPE whose merges are ranked by the token scores, with byte fallback and
a "▁" prefix on every text fragment that starts the input or follows a special token. Control,
user-defined and unknown tokens are added tokens, so their text (e.g. "<|im_start|>") is matched
whole.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import ConfigError, WeightsError
from .quant import QTensor, take_rows

SUPPORTED_ARCHITECTURES = ("llama",)


class GGUFError(WeightsError):
    """A GGUF file is malformed, truncated, or holds something llm_fast cannot run."""


@dataclass
class GGUFModel:
    path: str
    config: dict
    tensors: dict
    tokenizer: object                 # tokenizers.Tokenizer
    bos_token_id: Optional[int]
    eos_token_ids: set
    add_bos: bool
    chat_template: Optional[str]
    metadata: dict = field(repr=False, default_factory=dict)  # scalar metadata (no vocab arrays)
    mapping: object = field(repr=False, default=None)  # the file's read-only np.memmap

    def release_unused_pages(self, in_use) -> int:
        """Drop from this process's resident set the pages of the file mapping that no array
        in `in_use` (the model's final matrices: ndarrays or QTensors) points into: the metadata, and tensors that
        were copied (un-permuted Q/K, fused QKV and gate/up). The pages stay in the OS page
        cache and would fault back in if read again, so this is always safe. Returns the
        number of bytes advised away (0 where madvise is unavailable)."""
        mm = self.mapping
        raw = getattr(mm, "_mmap", None)
        if raw is None or not hasattr(raw, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return 0
        base, size = mm.ctypes.data, mm.nbytes
        page = mmap.PAGESIZE
        used = []
        for a in in_use:
            if not isinstance(a, np.ndarray):
                a = a.data                      # a QTensor: its uint8 blocks
            lo = a.ctypes.data
            if base <= lo < base + size:
                used.append((lo - base, lo - base + a.nbytes))
        used.sort()
        freed, pos = 0, 0
        for lo, hi in used + [(size, size)]:
            start = -(-pos // page) * page          # whole pages strictly between used ranges
            end = lo // page * page
            if end > start:
                raw.madvise(mmap.MADV_DONTNEED, start, end - start)
                freed += end - start
            pos = max(pos, hi)
        return freed


# ------------------------------------------------------------------ structural pre-check

_GGUF_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MAX_DIMS = 4


def _ggml_type_sizes():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    return {int(t): (t.name, GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType
            if t in GGML_QUANT_SIZES}


class _Scanner:
    """Walks the GGUF header with bounds checks; every failure names the file and the spot."""

    def __init__(self, path, buf, size):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, what):
        raise GGUFError(f"{self.path}: {what}")

    def need(self, n, what):
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated: {what} at byte {self.pos} needs {n} bytes, the file has "
                      f"{self.size}")

    def u32(self, what):
        self.need(4, what)
        v = struct.unpack_from("<I", self.buf, self.pos)[0]
        self.pos += 4
        return v

    def u64(self, what):
        self.need(8, what)
        v = struct.unpack_from("<Q", self.buf, self.pos)[0]
        self.pos += 8
        return v

    def string(self, what, decode=True):
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n] if decode else None
        self.pos += n
        if decode:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                self.fail(f"{what} at byte {self.pos - n} is not valid UTF-8")
        return None

    def value(self, vtype, what, depth=0):
        if vtype in _SCALAR_SIZES:
            n = _SCALAR_SIZES[vtype]
            self.need(n, what)
            v = self.buf[self.pos:self.pos + n]
            self.pos += n
            return v
        if vtype == _STRING:
            self.string(what, decode=False)
            return None
        if vtype == _ARRAY:
            if depth > 2:
                self.fail(f"{what}: arrays nested too deeply")
            itype = self.u32(f"item type of {what}")
            count = self.u64(f"length of {what}")
            if itype in _SCALAR_SIZES:
                self.need(count * _SCALAR_SIZES[itype], f"{count} items of {what}")
                self.pos += count * _SCALAR_SIZES[itype]
            elif itype == _STRING:
                self.need(count * 8, f"{count} strings of {what}")
                unpack, buf, size = struct.unpack_from, self.buf, self.size
                pos = self.pos
                for _ in range(count):
                    if pos + 8 > size:
                        break
                    pos += 8 + unpack("<Q", buf, pos)[0]
                else:
                    if pos <= size:
                        self.pos = pos
                        return None
                self.fail(f"truncated: the strings of {what} run past the end of the file "
                          f"({size} bytes)")
            elif itype == _ARRAY:
                for i in range(count):
                    self.value(_ARRAY, f"{what}[{i}]", depth + 1)
            else:
                self.fail(f"{what}: unknown array item type {itype}")
            return None
        self.fail(f"{what}: unknown metadata value type {vtype}")


def check_gguf_structure(path):
    """Validate header, metadata layout, tensor table and tensor extents without trusting any
    count or offset in the file. Returns (version, n_tensors, n_kv). Raises GGUFError."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise GGUFError(f"{path}: cannot be read ({e.strerror})") from None
    if size < 24:
        raise GGUFError(f"{path}: not a GGUF file ({size} bytes, shorter than a GGUF header)")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != _GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _check(path, buf, size)


def _check(path, buf, size):
    s = _Scanner(path, buf, size)
    s.pos = 4
    version = s.u32("version")
    if version not in (2, 3):
        if version & 0xFFFF == 0:
            s.fail("big-endian GGUF files are not supported")
        s.fail(f"GGUF version {version} is not supported (only versions 2 and 3)")
    n_tensors = s.u64("tensor count")
    n_kv = s.u64("metadata count")
    # every metadata entry takes >= 13 bytes, every tensor entry >= 28: reject absurd counts
    if n_kv * 13 + n_tensors * 28 > size:
        s.fail(f"header claims {n_tensors} tensors and {n_kv} metadata entries, more than a "
               f"{size}-byte file can hold (truncated or corrupt)")
    alignment = 32
    seen = set()
    for i in range(n_kv):
        key = s.string(f"metadata key #{i}")
        if key in seen:
            s.fail(f"metadata key {key!r} appears twice")
        seen.add(key)
        vtype = s.u32(f"type of metadata {key!r}")
        raw = s.value(vtype, f"metadata {key!r}")
        if key == "general.alignment":
            if vtype != 4:
                s.fail("general.alignment must be a uint32")
            alignment = struct.unpack("<I", raw)[0]
            if alignment == 0 or alignment & (alignment - 1):
                s.fail(f"general.alignment {alignment} is not a power of two")
    types = _ggml_type_sizes()
    infos = []
    names = set()
    for i in range(n_tensors):
        name = s.string(f"name of tensor #{i}")
        if name in names:
            s.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = s.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            s.fail(f"tensor {name!r} has {n_dims} dimensions (1..{_MAX_DIMS} allowed)")
        dims = [s.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        ttype = s.u32(f"type of tensor {name!r}")
        offset = s.u64(f"offset of tensor {name!r}")
        if ttype not in types:
            s.fail(f"tensor {name!r} has unknown ggml type {ttype}")
        infos.append((name, dims, ttype, offset))
    data_start = -(-s.pos // alignment) * alignment
    for name, dims, ttype, offset in infos:
        tname, (block, type_size) = types[ttype]
        if dims[0] % block:
            s.fail(f"tensor {name!r} ({tname}): row length {dims[0]} is not a multiple of the "
                   f"{block}-element block")
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block * type_size
        if offset % alignment:
            s.fail(f"tensor {name!r}: data offset {offset} is not aligned to {alignment} bytes")
        end = data_start + offset + nbytes
        if end > size:
            s.fail(f"tensor {name!r} ({tname}, shape {dims}) needs bytes "
                   f"[{data_start + offset}, {end}) but the file has only {size} bytes "
                   f"(truncated?)")
    return version, n_tensors, n_kv


# ------------------------------------------------------------------ metadata

def _read_metadata(reader, path):
    """Scalar and small-array metadata as Python values. Vocabulary arrays are read lazily."""
    from gguf.constants import GGUFValueType
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if f.types and f.types[0] == GGUFValueType.ARRAY and len(f.data) > 4096:
            continue  # tokens / merges / scores / token_type: see _array
        try:
            meta[key] = f.contents()
        except (UnicodeDecodeError, ValueError) as e:
            raise GGUFError(f"{path}: metadata {key!r} cannot be decoded ({e})") from None
    return meta


def _array(reader, key, path):
    f = reader.fields.get(key)
    if f is None:
        return None
    from gguf.constants import GGUFValueType
    if not f.types or f.types[0] != GGUFValueType.ARRAY:
        raise GGUFError(f"{path}: metadata {key!r} must be an array")
    if f.types[-1] == GGUFValueType.STRING:
        # tokens may hold invalid UTF-8 in rare files; llama.cpp keeps the bytes, we replace
        return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
    if not f.data:
        return []
    return np.concatenate([f.parts[i] for i in f.data]).tolist()


def _num(meta, key, path, kind=int, default=...):
    v = meta.get(key, default)
    if v is ...:
        raise ConfigError(f"{path}: required metadata {key!r} is missing")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{path}: metadata {key!r} must be a number, got {v!r}")
    if kind is int:
        if float(v) != int(v):
            raise ConfigError(f"{path}: metadata {key!r} must be an integer, got {v!r}")
        return int(v)
    return float(v)


def _rope_scaling(meta, p, path):
    kind = meta.get(p + "rope.scaling.type")
    factor = _num(meta, p + "rope.scaling.factor", path, float, None)
    if kind is None and p + "rope.scale_linear" in meta:          # older files
        return {"rope_type": "linear", "factor": _num(meta, p + "rope.scale_linear", path, float)}
    if kind in (None, "none") or (factor is not None and factor == 1.0 and kind == "linear"):
        return None
    if kind in ("linear", "yarn") and factor is None:
        raise ConfigError(f"{path}: RoPE scaling {kind!r} without {p}rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": factor,
               "original_max_position_embeddings": _num(
                   meta, p + "rope.scaling.original_context_length", path, int, None)}
        for k in ("beta_fast", "beta_slow", "ext_factor", "attn_factor", "log_multiplier"):
            if p + "rope.scaling.yarn_" + k in meta:
                out[k] = _num(meta, p + "rope.scaling.yarn_" + k, path, float)
        return out
    raise ConfigError(f"{path}: unsupported RoPE scaling type {kind!r}")


# ------------------------------------------------------------------ tensors

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
_MATRIX_QTYPES = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "F16": "f16", "BF16": "bf16"}


def hf_name(gguf_name):
    """The Hugging Face name of a llama GGUF tensor, or None."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    return None


def rope_unpermute_rows(n_rows, n_heads):
    """Row order that undoes llama.cpp's Q/K permutation: hf_row[r] = gguf_row[perm[r]].

    convert_hf_to_gguf.py stores W.reshape(heads, 2, hd/2, in).swapaxes(1, 2), i.e. the
    rotate-half pairs (i, i + hd/2) of each head become adjacent rows (2i, 2i + 1)."""
    if n_rows % n_heads or (n_rows // n_heads) % 2:
        raise ConfigError(f"cannot split {n_rows} rows into {n_heads} heads of even size")
    hd = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, hd // 2, 2).swapaxes(1, 2).reshape(-1)


def _to_float32(t):
    """F32 / F16 / BF16 / quantized tensor data as a float32 ndarray (numpy shape order)."""
    name = t.tensor_type.name
    data = np.asarray(t.data)
    if name == "F32":
        return data
    if name == "F16":
        return data.astype(np.float32)
    if name == "BF16":
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if name in _MATRIX_QTYPES:
        rows = int(np.prod([int(d) for d in t.shape[1:]])) if len(t.shape) > 1 else 1
        q = QTensor(_MATRIX_QTYPES[name], (rows, int(t.shape[0])), data.reshape(rows, -1))
        return q.dequantize().reshape(tuple(int(d) for d in reversed(t.shape)))
    raise ConfigError(f"unsupported type {name}")


def _convert_tensor(t, path):
    name = t.tensor_type.name
    dims = [int(d) for d in t.shape]          # ggml order: dims[0] is the row length
    if len(dims) == 1 or name == "F32":
        if name not in ("F32", "F16", "BF16") and name not in _MATRIX_QTYPES:
            raise GGUFError(f"{path}: tensor {t.name!r} has type {name}; llm_fast reads F32, F16, "
                            f"BF16, Q8_0, Q4_0 and Q4_1")
        arr = _to_float32(t)
        return np.array(arr, dtype=np.float32) if arr.ndim == 1 else arr
    if len(dims) != 2:
        raise GGUFError(f"{path}: tensor {t.name!r} has {len(dims)} dimensions, expected 2")
    qtype = _MATRIX_QTYPES.get(name)
    if qtype is None:
        raise GGUFError(f"{path}: tensor {t.name!r} has type {name}; llm_fast reads F32, F16, "
                        f"BF16, Q8_0, Q4_0 and Q4_1 (re-quantize the model, e.g. with "
                        f"llama-quantize ... Q8_0)")
    cols, rows = dims
    data = np.asarray(t.data)
    if name in ("F16", "BF16"):
        data = data.view(np.uint8)
    return QTensor(qtype, (rows, cols), data.reshape(rows, -1))


def _permute_rows(w, perm):
    return take_rows(w, perm) if isinstance(w, QTensor) else np.ascontiguousarray(w[perm])


def _shape(w):
    return tuple(w.shape)


# ------------------------------------------------------------------ tokenizer

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe), applied in order.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
              r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
             r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {}
for _names, _res, _ignore_merges in [
    (("default",), [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"], False),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
     [_LLAMA3_RE], True),
    (("dbrx", "smaug-bpe"), [_LLAMA3_RE], False),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
     [r"\p{N}", _GPT2_RE], False),
    (("gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "gigachat", "roberta-bpe",
      "trillion", "exaone4"), [_GPT2_RE], False),
    (("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez"), [_QWEN2_RE], False),
    (("falcon",), [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"[0-9][0-9][0-9]"], False),
]:
    for _n in _names:
        _PRE_TOKENIZERS[_n] = (_res, _ignore_merges)

# Token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp marks tokens with these texts as end-of-generation (llama-vocab.cpp, special_eog_ids)
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
              "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>")


def _merges_from_scores(tokens, scores):
    """SentencePiece BPE: a pair merges into the token it spells, higher score first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for tok, score in zip(tokens, scores):
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[tok], vocab[left], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def build_tokenizer(meta, tokens, merges, scores, token_types, path=""):
    """A tokenizers.Tokenizer equivalent to llama.cpp's tokenization of this vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if tokens is None:
        raise ConfigError(f"{path}: tokenizer.ggml.tokens is missing")
    if token_types is not None and len(token_types) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.token_type has {len(token_types)} entries for "
                        f"{len(tokens)} tokens")
    types = token_types if token_types is not None else [_NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        if kind == "gpt2":
            if merges is None:
                raise ConfigError(f"{path}: a 'gpt2' tokenizer needs tokenizer.ggml.merges")
            pre = meta.get("tokenizer.ggml.pre") or "default"
            if pre not in _PRE_TOKENIZERS:
                raise ConfigError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not "
                                  f"supported; known: {sorted(_PRE_TOKENIZERS)}")
            regexes, ignore_merges = _PRE_TOKENIZERS[pre]
            pairs = []
            for m in merges:
                pos = m.find(" ", 1)   # as llama.cpp: the separator is the first space after 0
                if pos < 0:
                    raise GGUFError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
                pairs.append((m[:pos], m[pos + 1:]))
            tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges,
                                      fuse_unk=False, byte_fallback=False))
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                            use_regex=False)])
            tk.decoder = decoders.ByteLevel()
        elif kind == "llama":
            if scores is None:
                raise ConfigError(f"{path}: a 'llama' tokenizer needs tokenizer.ggml.scores")
            if len(scores) != len(tokens):
                raise GGUFError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries for "
                                f"{len(tokens)} tokens")
            unk_id = _num(meta, "tokenizer.ggml.unknown_token_id", path, int, 0)
            unk = tokens[unk_id] if 0 <= unk_id < len(tokens) else None
            tk = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, scores),
                                      unk_token=unk, fuse_unk=True, byte_fallback=True))
            prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            tk.normalizer = normalizers.Sequence(
                ([normalizers.Prepend("\u2581")] if prefix else [])
                + [normalizers.Replace(" ", "\u2581")])
            tk.decoder = decoders.Sequence(
                [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        else:
            raise ConfigError(f"{path}: tokenizer model {kind!r} (tokenizer.ggml.model) is not "
                              f"supported; llm_fast builds 'gpt2' (byte-level BPE) and 'llama' "
                              f"(SentencePiece BPE) tokenizers")
    except (ConfigError, GGUFError):
        raise
    except Exception as e:   # tokenizers raises plain Exception for inconsistent vocab/merges
        raise GGUFError(f"{path}: the tokenizer in the metadata is inconsistent ({e})") from None

    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)
    return tk


def _special_ids(meta, tokens, path):
    n = len(tokens)
    kind = meta.get("tokenizer.ggml.model")

    def tid(key, default=None):
        v = _num(meta, "tokenizer.ggml." + key, path, int, None)
        if v is None:
            return default
        return v if 0 <= v < n else default   # llama.cpp ignores out-of-range ids

    bos = tid("bos_token_id", 1 if kind == "llama" else None)
    eos = tid("eos_token_id", 2 if kind == "llama" else None)
    eog = {i for i in (eos, tid("eot_token_id"), tid("eom_token_id")) if i is not None}
    eog |= {i for i, t in enumerate(tokens) if t in _EOG_TEXTS}
    pre = meta.get("tokenizer.ggml.pre")
    default_bos = kind == "llama" or pre in ("llama3", "llama-v3", "llama-bpe", "falcon3",
                                             "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    return bos, eos, eog, add_bos, add_eos


def _post_processor(tk, tokens, bos, eos, add_bos, add_eos):
    from tokenizers import processors
    if not (add_bos or add_eos):
        return
    single = ([f"{tokens[bos]}:0"] if add_bos else []) + ["$A:0"] + \
        ([f"{tokens[eos]}:0"] if add_eos else [])
    specials = ([(tokens[bos], bos)] if add_bos else []) + \
        ([(tokens[eos], eos)] if add_eos and (not add_bos or eos != bos) else [])
    tk.post_processor = processors.TemplateProcessing(single=" ".join(single),
                                                      special_tokens=specials)


# ------------------------------------------------------------------ loading

def load_gguf(path, with_tokenizer=True):
    """Read a llama-architecture GGUF file; see the module docstring."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    check_gguf_structure(path)
    from gguf import GGUFReader
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:   # the structure was checked; anything left is still the file's fault
        raise GGUFError(f"{path}: cannot be read as GGUF ({type(e).__name__}: {e})") from None
    try:
        return _build(path, reader, with_tokenizer)
    except (ConfigError, WeightsError):
        raise
    except Exception as e:   # content the checks above did not anticipate: still a file problem
        raise GGUFError(f"{path}: malformed GGUF content ({type(e).__name__}: {e})") from e


def _build(path, reader, with_tokenizer):
    meta = _read_metadata(reader, path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ConfigError(f"{path}: required metadata 'general.architecture' is missing")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"{path}: architecture {arch!r} is not supported; llm_fast runs "
                          f"{', '.join(repr(a) for a in SUPPORTED_ARCHITECTURES)} GGUF files")
    p = arch + "."
    n_layers = _num(meta, p + "block_count", path)
    hidden = _num(meta, p + "embedding_length", path)
    inter = _num(meta, p + "feed_forward_length", path)
    n_heads = _num(meta, p + "attention.head_count", path)
    n_kv = _num(meta, p + "attention.head_count_kv", path, int, n_heads)
    for k, v in (("block_count", n_layers), ("embedding_length", hidden),
                 ("feed_forward_length", inter), ("attention.head_count", n_heads),
                 ("attention.head_count_kv", n_kv)):
        if v <= 0:
            raise ConfigError(f"{path}: metadata {p + k!r} must be positive, got {v}")
    if n_heads % n_kv:
        raise ConfigError(f"{path}: {n_heads} query heads are not a multiple of {n_kv} KV heads")
    rot = _num(meta, p + "rope.dimension_count", path, int, None)
    head_dim = _num(meta, p + "attention.key_length", path, int, rot or hidden // n_heads)
    if rot is not None and rot != head_dim:
        raise ConfigError(f"{path}: partial rotary embeddings ({rot} of {head_dim} dims) are "
                          f"not supported")
    if _num(meta, p + "attention.value_length", path, int, head_dim) != head_dim:
        raise ConfigError(f"{path}: key and value head sizes differ")

    tensors = {}
    raw = {t.name: t for t in reader.tensors}
    for name, t in raw.items():
        hf = hf_name(name)
        if hf is None:
            raise GGUFError(f"{path}: unexpected tensor {name!r} for a dense llama model")
        tensors[hf] = _convert_tensor(t, path)

    tokens = _array(reader, "tokenizer.ggml.tokens", path)
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise GGUFError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab_size = _shape(embed)[0]
    declared = _num(meta, p + "vocab_size", path, int, None)
    if declared is not None and declared != vocab_size:
        raise GGUFError(f"{path}: {p}vocab_size is {declared} but token_embd.weight has "
                        f"{vocab_size} rows")

    expect = {"model.embed_tokens.weight": (vocab_size, hidden), "model.norm.weight": (hidden,)}
    if "lm_head.weight" in tensors:
        expect["lm_head.weight"] = (vocab_size, hidden)
    for i in range(n_layers):
        L = f"model.layers.{i}."
        expect.update({
            L + "input_layernorm.weight": (hidden,),
            L + "post_attention_layernorm.weight": (hidden,),
            L + "self_attn.q_proj.weight": (n_heads * head_dim, hidden),
            L + "self_attn.k_proj.weight": (n_kv * head_dim, hidden),
            L + "self_attn.v_proj.weight": (n_kv * head_dim, hidden),
            L + "self_attn.o_proj.weight": (hidden, n_heads * head_dim),
            L + "mlp.gate_proj.weight": (inter, hidden),
            L + "mlp.up_proj.weight": (inter, hidden),
            L + "mlp.down_proj.weight": (hidden, inter),
        })
    for k, shape in expect.items():
        if k not in tensors:
            raise GGUFError(f"{path}: tensor for {k!r} is missing")
        if _shape(tensors[k]) != shape:
            raise GGUFError(f"{path}: {k} has shape {_shape(tensors[k])}, expected {shape}")
    extra = set(tensors) - set(expect) - {"rope_freqs"}
    if extra:
        raise GGUFError(f"{path}: tensors beyond the {n_layers} layers the metadata declares: "
                        f"{sorted(extra)[:3]}")
    q_perm = rope_unpermute_rows(n_heads * head_dim, n_heads)
    k_perm = rope_unpermute_rows(n_kv * head_dim, n_kv)
    for i in range(n_layers):
        L = f"model.layers.{i}.self_attn."
        tensors[L + "q_proj.weight"] = _permute_rows(tensors[L + "q_proj.weight"], q_perm)
        tensors[L + "k_proj.weight"] = _permute_rows(tensors[L + "k_proj.weight"], k_perm)

    rope_scaling = _rope_scaling(meta, p, path)
    if "rope_freqs" in tensors:
        if _shape(tensors["rope_freqs"]) != (head_dim // 2,):
            raise GGUFError(f"{path}: rope_freqs.weight has shape {_shape(tensors['rope_freqs'])}, "
                            f"expected ({head_dim // 2},)")
        # llama3-style scaling stored as per-frequency divisors: inv_freq[i] /= rope_freqs[i]
        rope_scaling = {"rope_type": "gguf_freq_factors"}

    if tokens is not None and len(tokens) > vocab_size:
        raise GGUFError(f"{path}: {len(tokens)} tokens but token_embd.weight has only "
                        f"{vocab_size} rows")
    bos = eos = None
    eog, add_bos, add_eos, tk = set(), False, False, None
    if tokens is not None:
        bos, eos, eog, add_bos, add_eos = _special_ids(meta, tokens, path)
        if with_tokenizer:
            tk = build_tokenizer(meta, tokens, _array(reader, "tokenizer.ggml.merges", path),
                                 _array(reader, "tokenizer.ggml.scores", path),
                                 _array(reader, "tokenizer.ggml.token_type", path), path)
            _post_processor(tk, tokens, bos, eos, add_bos, add_eos)
    elif with_tokenizer:
        raise ConfigError(f"{path}: tokenizer.ggml.tokens is missing (the file has no tokenizer)")

    template = meta.get("tokenizer.chat_template")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": _num(meta, p + "context_length", path),
        "rms_norm_eps": _num(meta, p + "attention.layer_norm_rms_epsilon", path, float),
        "rope_theta": _num(meta, p + "rope.freq_base", path, float, 10000.0),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    return GGUFModel(path=path, config=config, tensors=tensors, tokenizer=tk,
                     bos_token_id=bos, eos_token_ids=eog, add_bos=add_bos,
                     chat_template=template if isinstance(template, str) else None,
                     metadata=meta, mapping=reader.data)
