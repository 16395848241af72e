"""ModelConfig: the hyperparameters of a Llama-family model, from config.json or GGUF metadata."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Hugging Face LlamaConfig defaults, used for keys a config.json leaves out.
_HF_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict] = field(default=None, compare=False)
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = ()
    architecture: str = "LlamaForCausalLM"

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        def get(key):
            return d.get(key) if d.get(key) is not None else _HF_DEFAULTS.get(key)

        def as_int(key, value, minimum=1):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{source}: {key} must be an integer >= {minimum}, got {value!r}")
            return value

        def as_float(key, value, positive=True):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and not value > 0):
                raise ConfigError(f"{source}: {key} must be a positive number, got {value!r}")
            return float(value)

        archs = d.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0] if isinstance(archs, list) and archs else archs
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"{source}: architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        act = get("hidden_act")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ConfigError(f"{source}: {flag}=true is not supported")

        hidden = as_int("hidden_size", get("hidden_size"))
        heads = as_int("num_attention_heads", get("num_attention_heads"))
        kv = d.get("num_key_value_heads")
        kv = heads if kv is None else as_int("num_key_value_heads", kv)
        if heads % kv:
            raise ConfigError(f"{source}: num_attention_heads ({heads}) is not a multiple of "
                              f"num_key_value_heads ({kv})")
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{source}: hidden_size ({hidden}) is not divisible by "
                                  f"num_attention_heads ({heads}) and head_dim is not given")
            head_dim = hidden // heads
        head_dim = as_int("head_dim", head_dim)
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even for RoPE, got {head_dim}")

        max_pos = as_int("max_position_embeddings", get("max_position_embeddings"))
        window = d.get("sliding_window")
        if d.get("use_sliding_window", True) and isinstance(window, int) and 0 < window < max_pos:
            # Full attention equals sliding-window attention while the context fits the window,
            # so the usable context is the window: exact, never silently different.
            max_pos = window

        # transformers >= 5 writes rope_parameters; older files write rope_theta + rope_scaling.
        rope = d.get("rope_parameters")
        if isinstance(rope, dict):
            theta = rope.get("rope_theta", d.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
            scaling = dict(rope)
        else:
            theta = get("rope_theta")
            scaling = d.get("rope_scaling")
        theta = as_float("rope_theta", theta)
        if scaling is not None:
            if not isinstance(scaling, dict):
                raise ConfigError(f"{source}: rope_scaling must be an object or null, got {scaling!r}")
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            if rtype not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(f"{source}: rope_scaling type {rtype!r} is not supported "
                                  f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            scaling["rope_type"] = rtype
            if rtype == "default":
                scaling = None
            else:
                as_float("rope_scaling.factor", scaling.get("factor"))
                if rtype == "llama3":
                    for key in ("low_freq_factor", "high_freq_factor",
                                "original_max_position_embeddings"):
                        as_float(f"rope_scaling.{key}", scaling.get(key))

        eos = d.get("eos_token_id", _HF_DEFAULTS["eos_token_id"])
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        for e in eos_ids:
            as_int("eos_token_id", e, minimum=0)
        bos = d.get("bos_token_id", _HF_DEFAULTS["bos_token_id"])
        if bos is not None:
            as_int("bos_token_id", bos, minimum=0)

        return cls(
            vocab_size=as_int("vocab_size", get("vocab_size")),
            hidden_size=hidden,
            intermediate_size=as_int("intermediate_size", get("intermediate_size")),
            num_hidden_layers=as_int("num_hidden_layers", get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=as_float("rms_norm_eps", get("rms_norm_eps")),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            architecture=arch,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "architectures": [self.architecture], "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": list(self.eos_token_ids),
        }
