"""Model weights as explicit records, loaded from safetensors (memory-mapped) or GGUF tensors.

Q/K/V projections are fused into one (q_dim + 2 kv_dim, hidden) matrix and gate/up into one
(2 intermediate, hidden) matrix at load: one pass over the activations instead of three / two.
Every matrix is stored (out_features, in_features), the Hugging Face layout, either as a float32
ndarray or as a quantized QTensor (llm_fast.quant) with the same row semantics.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from .config import ModelConfig
from .errors import WeightsError
from .safetensors_file import SafetensorsFile

Matrix = Any  # float32 ndarray (out, in) or llm_fast.quant.QTensor


@dataclass
class LayerWeights:
    input_layernorm: np.ndarray           # (hidden,)
    qkv_proj: Matrix                      # (q_dim + 2 kv_dim, hidden): rows [q; k; v]
    o_proj: Matrix                        # (hidden, q_dim)
    post_attention_layernorm: np.ndarray  # (hidden,)
    gate_up_proj: Matrix                  # (2 intermediate, hidden): rows [gate; up]
    down_proj: Matrix                     # (hidden, intermediate)


@dataclass
class Weights:
    embed_tokens: Matrix                  # (vocab, hidden)
    layers: list
    norm: np.ndarray                      # (hidden,)
    lm_head: Matrix                       # (vocab, hidden); the same object as embed_tokens when tied

    def arrays(self) -> list:
        """Every weight matrix and vector once (a tied lm_head is the embedding object)."""
        seen, out = set(), []
        mats = [self.embed_tokens, self.lm_head, self.norm]
        for lw in self.layers:
            mats += [lw.input_layernorm, lw.qkv_proj, lw.o_proj, lw.post_attention_layernorm,
                     lw.gate_up_proj, lw.down_proj]
        for m in mats:
            if id(m) not in seen:
                seen.add(id(m))
                out.append(m)
        return out

    def nbytes(self) -> int:
        """Bytes of weights read per decoded token (the lm_head counted once even when tied)."""
        return sum(int(m.nbytes) for m in self.arrays())


def _is_float_matrix(m) -> bool:
    return isinstance(m, np.ndarray)


def _shape(m) -> tuple:
    return tuple(m.shape)


def _concat_rows(mats: list) -> Matrix:
    if all(_is_float_matrix(m) for m in mats):
        return np.ascontiguousarray(np.concatenate(mats, axis=0), dtype=np.float32)
    if any(_is_float_matrix(m) for m in mats) or len({m.qtype for m in mats}) != 1:
        from .quant import QTensor  # noqa: F401  (mixed types: bring all to float32)
        return np.concatenate([_to_float(m) for m in mats], axis=0)
    from .quant import concat_rows
    return concat_rows(mats)


def _to_float(m) -> np.ndarray:
    return m if _is_float_matrix(m) else m.dequantize()


def expected_shapes(config: ModelConfig) -> dict:
    c = config
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
              "lm_head.weight": (c.vocab_size, c.hidden_size),
              "model.norm.weight": (c.hidden_size,)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (c.q_dim, c.hidden_size),
            p + "self_attn.k_proj.weight": (c.kv_dim, c.hidden_size),
            p + "self_attn.v_proj.weight": (c.kv_dim, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, c.q_dim),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        })
    return shapes


# Tensors Hugging Face checkpoints may carry that the forward pass does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_weights(config: ModelConfig, get, names, source: str, release=None) -> Weights:
    """Assemble Weights from a tensor source.

    get(name) -> float32 ndarray or QTensor; names: the set of tensor names present;
    release(name): optional, called after a tensor was copied into a fused matrix.
    Every name and shape is validated against the config first, and all problems are reported
    together.
    """
    shapes = expected_shapes(config)
    names = set(names)
    problems = []
    has_embed = "model.embed_tokens.weight" in names
    has_head = "lm_head.weight" in names
    if not has_embed and not has_head:
        problems.append("missing model.embed_tokens.weight (and no lm_head.weight to tie it to)")
    if not has_head and not config.tie_word_embeddings and has_embed:
        problems.append("missing lm_head.weight (tie_word_embeddings is false)")
    if not has_embed and has_head and not config.tie_word_embeddings:
        problems.append("missing model.embed_tokens.weight (tie_word_embeddings is false)")
    for name, shape in shapes.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            continue
        if name not in names:
            problems.append(f"missing {name} (expected shape {list(shape)})")
    for name in sorted(names):
        if name in shapes:
            got = tuple(get.shape(name)) if hasattr(get, "shape") else None
            if got is not None and got != shapes[name]:
                problems.append(f"{name} has shape {list(got)}, config expects {list(shapes[name])}")
        elif not name.endswith(_IGNORED_SUFFIXES):
            problems.append(f"unexpected tensor {name} (not part of a "
                            f"{config.num_hidden_layers}-layer {config.architecture})")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise WeightsError(f"{source}: {shown}")

    def load(name):
        t = get(name)
        if _shape(t) != shapes[name]:
            raise WeightsError(f"{source}: {name} has shape {list(_shape(t))}, config expects "
                               f"{list(shapes[name])}")
        return t

    def fused(parts):
        mats = [load(n) for n in parts]
        out = _concat_rows(mats)
        if release is not None:
            for n in parts:
                release(n)
        return out

    def vector(name):
        return np.array(load(name), dtype=np.float32)  # small: own copy, mapping can be dropped

    embed = load("model.embed_tokens.weight") if has_embed else None
    head = load("lm_head.weight") if has_head else None
    if config.tie_word_embeddings or head is None:
        head = embed if embed is not None else head
    if embed is None:
        embed = head  # the story model stores only lm_head.weight
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(
            input_layernorm=vector(p + "input_layernorm.weight"),
            qkv_proj=fused([p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                            p + "self_attn.v_proj.weight"]),
            o_proj=load(p + "self_attn.o_proj.weight"),
            post_attention_layernorm=vector(p + "post_attention_layernorm.weight"),
            gate_up_proj=fused([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
            down_proj=load(p + "mlp.down_proj.weight"),
        ))
    return Weights(embed_tokens=embed, layers=layers, norm=vector("model.norm.weight"),
                   lm_head=head)


class _SafetensorsSource:
    """The tensors of one or more .safetensors shards, by name."""

    def __init__(self, files: list):
        self.files = files
        self.where = {}
        for f in files:
            for name in f.keys():
                if name in self.where:
                    raise WeightsError(f"tensor {name} appears in both {self.where[name].path} "
                                       f"and {f.path}")
                self.where[name] = f

    def __call__(self, name):
        return self.where[name].to_float32(name)

    def shape(self, name):
        return self.where[name].shape(name)

    def release(self, name):
        self.where[name].release(name)


def load_safetensors_weights(model_dir: str, config: ModelConfig, quantize: str | None = None) -> Weights:
    paths = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                shard_names = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{index}: malformed index ({e})") from None
        paths = [os.path.join(model_dir, s) for s in shard_names]
        for p in paths:
            if not os.path.exists(p):
                raise WeightsError(f"{index}: lists shard {os.path.basename(p)}, which is missing")
    if not paths:
        raise WeightsError(f"{model_dir}: no .safetensors file found")
    source = _SafetensorsSource([SafetensorsFile(p) for p in paths])
    get = source
    if quantize is not None:
        get = _QuantizingSource(source, quantize)
    return build_weights(config, get, source.where.keys(), model_dir, release=source.release)


class _QuantizingSource:
    """Wraps a float source: 2-D projection matrices come back quantized (embedding too)."""

    def __init__(self, source, qtype: str):
        from .quant import quantize  # imported here: float-only users never need it
        self.source, self.qtype, self._quantize = source, qtype, quantize

    def __call__(self, name):
        t = self.source(name)
        if isinstance(t, np.ndarray) and t.ndim == 2 and t.shape[1] % 32 == 0:
            return self._quantize(np.ascontiguousarray(t, dtype=np.float32), self.qtype)
        return t

    def shape(self, name):
        return self.source.shape(name)


class _DictSource:
    """Tensors already in memory (GGUF loader output), by Hugging Face name."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __call__(self, name):
        return self.tensors[name]

    def shape(self, name):
        return tuple(self.tensors[name].shape)


def build_weights_from_dict(config: ModelConfig, tensors: dict, source: str,
                            quantize: str | None = None) -> Weights:
    get = _DictSource(tensors)
    if quantize is not None:
        get = _QuantizingSource(get, quantize)
    return build_weights(config, get, tensors.keys(), source)
