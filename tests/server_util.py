"""Helpers for the server tests and the load test: a tiny random ChatML model written to disk,
and the server running in-process (uvicorn in a thread) on a free loopback port."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import numpy as np

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = """Once upon a time there was a little robot who loved to read books about the sea.
Hello! How are you today? I am fine, thank you. What is the capital of France? Paris.
The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100.
Python is a programming language. Servers answer requests; clients send messages.
Café, naïve, über, 東京, 😀 — unicode text appears too."""


def make_tiny_chat_model(path, seed: int = 0, vocab_target: int = 384, context: int = 512) -> str:
    """A seeded random Llama (hidden 64, 2 layers, GQA 4/2, untied head) with a byte-level BPE tokenizer
    that has ChatML special tokens and a chat_template; written as a Hugging Face folder."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.makedirs(path, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    # The alphabet is the corpus's bytes only (not all 256), so random text stays readable.
    trainer = trainers.BpeTrainer(vocab_size=vocab_target, special_tokens=SPECIALS,
                                  show_progress=False)
    tk.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    tk.save(os.path.join(path, "tokenizer.json"))
    vocab = tk.get_vocab_size(with_added_tokens=True)
    eos = tk.token_to_id("<|im_end|>")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None,
                   "add_bos_token": False}, f)
    hidden, inter, layers, heads, kv = 64, 128, 2, 4, 2
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "max_position_embeddings": context, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "vocab_size": vocab, "tie_word_embeddings": False,
        "eos_token_id": eos, "bos_token_id": None,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    rng = np.random.default_rng(seed)

    def w(*shape, scale=None):
        s = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * s).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, hidden, scale=1.0),
         "model.norm.weight": np.ones(hidden, np.float32),
         "lm_head.weight": w(vocab, hidden, scale=3.0 / np.sqrt(hidden))}  # logits std ~3
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
        t[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        t[p + "self_attn.k_proj.weight"] = w(kv * head_dim, hidden)
        t[p + "self_attn.v_proj.weight"] = w(kv * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
        t[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        t[p + "mlp.up_proj.weight"] = w(inter, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, inter)
    save_file(t, os.path.join(path, "model.safetensors"))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread (with a pre-bound socket, so the
    port cannot be taken between choosing and binding it)."""

    def __init__(self, app, log_level: str = "warning"):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
