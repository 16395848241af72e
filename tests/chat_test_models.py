"""Test models for the chat tests (tests/test_chat.py, tests/test_chat_cli.py); no downloads.

build_tiny_chatml_model(dir): a real Llama folder that llm_fast.load() reads like any Hugging
Face checkpoint: a byte-level BPE tokenizer (trained here on a few sentences, so an emoji or a
CJK character spans several tokens) with the ChatML special tokens, tokenizer_config.json
carrying the ChatML chat_template and eos_token <|im_end|>, and seeded random weights (hidden 64,
2 layers) in model.safetensors. The weights are random except for one trick that keeps replies
printable: hidden dimension 0 is a constant "bias" feature (every embedding has BIAS there and
no layer writes to it), and lm_head gives that feature a large negative weight for every token
that is not made of ASCII letters and spaces. So the model only ever emits letters and spaces,
never <|im_end|>: replies run to max_new_tokens, which keeps CLI transcripts deterministic and
free of control characters.

ScriptedModel: a fake model (forward/new_cache, one-hot logits) that replies with chosen token
ids, to drive generation through end-of-turn tokens, stop strings and split UTF-8 characters.
"""
from __future__ import annotations

import json
import os

import numpy as np

from llm_fast.cache import KVCache
from llm_fast.chat_template import CHATML_TEMPLATE
from llm_fast.config import ModelConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "You are a helpful assistant.",
    "Hello! How are you today? I am fine, thank you.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a story about a cat and a dog who are friends.",
    "Once upon a time there was a little girl who liked to play in the garden.",
    "user assistant system",
]
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 64, 2, 4, 2, 128
CONTEXT = 32768
BIAS = 2.0
EMBED_SCALE = 8.0
HEAD_SCALE = 2.0


def _train_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tk


def _printable_mask(tk) -> np.ndarray:
    """True for tokens that decode to ASCII letters and spaces only (and are not special)."""
    n = tk.get_vocab_size(with_added_tokens=True)
    ok = np.zeros(n, bool)
    for i in range(n):
        if tk.id_to_token(i) in SPECIAL_TOKENS:
            continue
        text = tk.decode([i])
        ok[i] = bool(text) and all(ch == " " or ("a" <= ch.lower() <= "z") for ch in text)
    return ok


def build_tiny_chatml_model(path, seed: int = 0, context: int = CONTEXT) -> str:
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tk = _train_tokenizer()
    tk.save(os.path.join(path, "tokenizer.json"))
    vocab = tk.get_vocab_size(with_added_tokens=True)
    im_end = tk.token_to_id("<|im_end|>")
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>",
                   "bos_token": None, "add_bos_token": False}, f, indent=2)
    config = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "intermediate_size": INTERMEDIATE, "vocab_size": vocab,
        "max_position_embeddings": context, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": None,
        "eos_token_id": im_end, "torch_dtype": "float32",
    }
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)

    rng = np.random.default_rng(seed)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    head_dim = HIDDEN // HEADS
    embed = mat(vocab, HIDDEN) * np.float32(EMBED_SCALE)
    embed[:, 0] = BIAS                      # the constant bias feature
    lm_head = mat(vocab, HIDDEN) * np.float32(HEAD_SCALE)
    lm_head[:, 0] = np.where(_printable_mask(tk), 0.0, -100.0)
    tensors = {"model.embed_tokens.weight": embed, "model.norm.weight": np.ones(HIDDEN, np.float32),
               "lm_head.weight": lm_head}
    for l in range(LAYERS):
        p = f"model.layers.{l}."
        o_proj, down = mat(HIDDEN, HEADS * head_dim), mat(HIDDEN, INTERMEDIATE)
        o_proj[0] = 0.0                     # nothing writes to the bias feature
        down[0] = 0.0
        tensors.update({
            p + "input_layernorm.weight": np.ones(HIDDEN, np.float32),
            p + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float32),
            p + "self_attn.q_proj.weight": mat(HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": mat(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": mat(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": o_proj,
            p + "mlp.gate_proj.weight": mat(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": mat(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": down,
        })
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path


class ScriptedModel:
    """A stand-in for llm_fast.Model whose logits are one-hot: it replies with `reply_ids`.

    The next token is a pure function of the context, as for a real model: the k-th token
    after the last "<|im_start|>assistant\\n" header is reply_ids[k] (then `end_id` forever).
    It keeps llm_fast's KVCache bookkeeping (length, tokens) so prefix reuse works as usual.
    """

    def __init__(self, tokenizer, reply_ids, end_id=None, context: int = 512):
        self.tokenizer = tokenizer
        self.reply_ids = [int(i) for i in reply_ids]
        self.end_id = tokenizer.tk.token_to_id("<|im_end|>") if end_id is None else end_id
        self.header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.config = ModelConfig.from_dict({
            "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
            "num_key_value_heads": 1, "intermediate_size": 8, "vocab_size": tokenizer.vocab_size,
            "max_position_embeddings": context}, source="scripted")
        self.forward_tokens = 0  # tokens computed, to check prefix reuse
        self._logits = np.zeros(tokenizer.vocab_size, np.float32)

    def new_cache(self, max_len=None) -> KVCache:
        return KVCache(self.config, max_len)

    def _next(self, tokens) -> int:
        h = len(self.header)
        for start in range(len(tokens) - h, -1, -1):
            if tokens[start:start + h] == self.header:
                k = len(tokens) - (start + h)
                return self.reply_ids[k] if k < len(self.reply_ids) else self.end_id
        return self.end_id

    def forward(self, token_ids, cache: KVCache, logits: str = "last"):
        ids = [int(t) for t in np.asarray(token_ids).reshape(-1)]
        if len(ids) > cache.remaining:
            raise ValueError("forward: tokens do not fit the cache")
        cache.tokens.extend(ids)
        cache.length += len(ids)
        self.forward_tokens += len(ids)
        self._logits[:] = 0.0
        self._logits[self._next(cache.tokens)] = 1.0
        return self._logits
