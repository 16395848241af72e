"""Exceptions raised at the library's boundary. Each names the file, tensor or value at fault."""


class LLMFastError(Exception):
    """Base class of llm_fast's own errors."""


class ConfigError(LLMFastError, ValueError):
    """config.json (or GGUF metadata) is missing, malformed, or asks for something unsupported."""


class WeightsError(LLMFastError, ValueError):
    """A weight file is malformed, or a tensor is missing or has the wrong shape or dtype."""


class ModelNotFoundError(LLMFastError, FileNotFoundError):
    """The model path does not exist or holds no model this library can load."""
