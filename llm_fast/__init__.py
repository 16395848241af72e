"""llm_fast: a small, torch-free, fast CPU runtime for Llama-family language models."""
from .config import ModelConfig
from .cache import KVCache
from .errors import ConfigError, LLMFastError, ModelNotFoundError, WeightsError
from .kernels import get_num_threads, set_num_threads, simd_level
from .loader import default_model_path, load, load_model, load_tokenizer
from .model import Model
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer
from .generate import generate, stream_generate, generate_step, GenerationResult, GenerationChunk
from .chat import ChatSession
from . import reference

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "KVCache", "Model", "load", "load_model", "load_tokenizer",
    "default_model_path", "Sampler", "SamplingParams", "Tokenizer", "generate",
    "stream_generate", "generate_step", "GenerationResult", "GenerationChunk", "ChatSession", "set_num_threads", "get_num_threads", "simd_level", "reference",
    "LLMFastError", "ConfigError", "WeightsError", "ModelNotFoundError",
]
