"""Seeded random-weight Llama models at real shapes, built in memory (no files, no downloads).

They exist so every model size can be benchmarked on any machine: the speed of a forward pass
depends on the shapes, not on the values. Weights are float32 N(0, 1) / sqrt(fan_in), norms 1.

    config, weights = synthetic.build("110m", seed=0)
    model = Model(config, weights)

Shapes (parameters counted with the embedding, lm_head once more when untied):
- story-656k:   the TinyStories-656K story model: hidden 128, 2 layers, 8 heads / 4 KV,
                MLP 384, vocab 2048, tied (0.66 M).
- 15m, 42m, 110m: llama2.c's TinyStories family (dim / layers / heads / hidden):
                288/6/6/768, 512/8/8/1376, 768/12/12/2048, vocab 32000, tied classifier as in
                llama2.c, context 1024 (15.2 M, 41.7 M, 109.5 M).
- 32m:          a llama2.c-style shape between those two, chosen to total ~32 M: dim 512,
                6 layers, 8 heads (head_dim 64), hidden 1024, vocab 32000, tied (32.1 M).
- smollm2-135m: SmolLM2-135M: hidden 576, 30 layers, 9 heads / 3 KV, MLP 1536, vocab 49152,
                tied, rope_theta 100000 (134.5 M).
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .memory import aligned_empty
from .weights import LayerWeights, Weights

# name -> (hidden, layers, heads, kv_heads, intermediate, vocab, tied, context, rope_theta, eps)
SHAPES = {
    "story-656k": (128, 2, 8, 4, 384, 2048, True, 512, 10000.0, 1e-6),
    "15m": (288, 6, 6, 6, 768, 32000, True, 1024, 10000.0, 1e-5),
    "32m": (512, 6, 8, 8, 1024, 32000, True, 1024, 10000.0, 1e-5),
    "42m": (512, 8, 8, 8, 1376, 32000, True, 1024, 10000.0, 1e-5),
    "110m": (768, 12, 12, 12, 2048, 32000, True, 1024, 10000.0, 1e-5),
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152, True, 8192, 100000.0, 1e-5),
}


def names() -> list:
    return list(SHAPES)


def config(name: str) -> ModelConfig:
    """The ModelConfig of a synthetic shape (ValueError naming the known shapes otherwise)."""
    if name not in SHAPES:
        raise ValueError(f"unknown synthetic model {name!r} (known: {', '.join(SHAPES)})")
    hidden, layers, heads, kv, inter, vocab, tied, ctx, theta, eps = SHAPES[name]
    return ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "intermediate_size": inter, "vocab_size": vocab, "tie_word_embeddings": tied,
        "max_position_embeddings": ctx, "rope_theta": theta, "rms_norm_eps": eps,
        "bos_token_id": 1, "eos_token_id": 2,
    }, source=f"synthetic:{name}")


def n_params(cfg: ModelConfig) -> int:
    c = cfg
    per_layer = (2 * c.hidden_size + (c.q_dim + 2 * c.kv_dim) * c.hidden_size
                 + c.hidden_size * c.q_dim + 3 * c.intermediate_size * c.hidden_size)
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.vocab_size * c.hidden_size + head + c.num_hidden_layers * per_layer + c.hidden_size


def build(name: str, seed: int = 0) -> tuple:
    """(ModelConfig, Weights) of a synthetic shape, deterministic in (name, seed)."""
    cfg = config(name)
    c = cfg
    rng = np.random.default_rng(seed)

    def mat(rows, cols):
        # (out, in) float32 with variance 1 / fan_in: activations stay O(1) through the layers.
        m = aligned_empty((rows, cols))   # 2 MiB aligned: Model uses it without a copy
        rng.standard_normal(out=m, dtype=np.float32)
        m *= np.float32(1.0 / np.sqrt(cols))
        return m

    embed = mat(c.vocab_size, c.hidden_size)
    head = embed if c.tie_word_embeddings else mat(c.vocab_size, c.hidden_size)
    layers = []
    for _ in range(c.num_hidden_layers):
        layers.append(LayerWeights(
            input_layernorm=np.ones(c.hidden_size, np.float32),
            qkv_proj=mat(c.q_dim + 2 * c.kv_dim, c.hidden_size),
            o_proj=mat(c.hidden_size, c.q_dim),
            post_attention_layernorm=np.ones(c.hidden_size, np.float32),
            gate_up_proj=mat(2 * c.intermediate_size, c.hidden_size),
            down_proj=mat(c.hidden_size, c.intermediate_size),
        ))
    weights = Weights(embed_tokens=embed, layers=layers, norm=np.ones(c.hidden_size, np.float32),
                      lm_head=head)
    return cfg, weights
