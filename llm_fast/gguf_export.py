"""Write a loaded model as a llama GGUF file, as llama.cpp's convert_hf_to_gguf.py would.

Used by `llm-fast bench --compare llama-cpp` to run llama.cpp on exactly the weights llm_fast
runs (synthetic models, safetensors folders), and useful on its own to hand a model to GGUF
tools. Float32 matrices are written as F32 (or converted to F16 with qtype="f16"); QTensor
matrices keep their blocks byte for byte. Q and K rows are permuted for llama.cpp's interleaved
RoPE (the inverse of gguf_file.rope_unpermute_rows), so a round trip through load_gguf gives
back the same weights.

The vocabulary: a tokenizer's own tokens when one is given (written as a llama/SentencePiece
style list of pieces with scores 0, enough for id-level use), else placeholder pieces
"<tok_i>" — llama.cpp loads either and runs token ids; text in and out needs the real
tokenizer.
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .weights import Weights

_LAYER = {
    "input_layernorm": "attn_norm.weight",
    "post_attention_layernorm": "ffn_norm.weight",
    "o_proj": "attn_output.weight",
    "down_proj": "ffn_down.weight",
}


def _permute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """gguf_row[r] = hf_row[perm[r]]: rotate-half pairs (i, i + hd/2) -> rows (2i, 2i + 1)."""
    hd = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, 2, hd // 2).swapaxes(1, 2).reshape(-1)


def write_gguf(path: str, config: ModelConfig, weights: Weights, qtype: str = "f32",
               tokens: list | None = None, name: str = "llm_fast export") -> str:
    """Write (config, weights) to `path` as a llama GGUF file; returns path."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from .quant import QTensor, take_rows

    if qtype not in ("f32", "f16"):
        raise ValueError(f"qtype must be 'f32' or 'f16' for float matrices, got {qtype!r}")
    c = config
    if c.rope_scaling:
        raise ValueError("write_gguf: rope_scaling is not written yet; export a model without it")
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name(name)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(1 if qtype == "f16" else 0)
    if tokens is None:
        tokens = [f"<tok_{i}>" for i in range(c.vocab_size)]
    if len(tokens) != c.vocab_size:
        raise ValueError(f"write_gguf: {len(tokens)} tokens for a vocabulary of {c.vocab_size}")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    w.add_bos_token_id(min(1, c.vocab_size - 1))
    w.add_eos_token_id(min(2, c.vocab_size - 1))
    w.add_add_bos_token(False)

    def put(gname, m):
        if isinstance(m, QTensor):
            if m.qtype in ("f16", "bf16"):
                raw = m.data.view(np.float16 if m.qtype == "f16" else np.uint16)
                w.add_tensor(gname, raw, raw_shape=raw.shape,
                             raw_dtype=T.F16 if m.qtype == "f16" else T.BF16)
            else:
                w.add_tensor(gname, m.data, raw_shape=m.data.shape, raw_dtype=getattr(T, m.qtype.upper()))
            return
        a = np.ascontiguousarray(m, dtype=np.float32)
        if a.ndim == 2 and qtype == "f16":
            a = a.astype(np.float16)
        w.add_tensor(gname, a)

    def rows(m, lo, hi, perm=None):
        idx = np.arange(lo, hi) if perm is None else lo + perm
        if isinstance(m, QTensor):
            return take_rows(m, idx)
        return np.asarray(m)[idx]

    q, kv, inter = c.q_dim, c.kv_dim, c.intermediate_size
    put("token_embd.weight", weights.embed_tokens)
    for i, lw in enumerate(weights.layers):
        b = f"blk.{i}."
        put(b + "attn_q.weight", rows(lw.qkv_proj, 0, q, _permute_rows(q, c.num_attention_heads)))
        put(b + "attn_k.weight", rows(lw.qkv_proj, q, q + kv, _permute_rows(kv, c.num_key_value_heads)))
        put(b + "attn_v.weight", rows(lw.qkv_proj, q + kv, q + 2 * kv))
        put(b + "ffn_gate.weight", rows(lw.gate_up_proj, 0, inter))
        put(b + "ffn_up.weight", rows(lw.gate_up_proj, inter, 2 * inter))
        for attr, gname in _LAYER.items():
            put(b + gname, getattr(lw, attr))
    put("output_norm.weight", weights.norm)
    if not c.tie_word_embeddings:
        put("output.weight", weights.lm_head)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
