"""edgepaged: an LLM inference runtime for edge boxes with a paged KV cache."""

from .errors import EdgepagedError, ModelLoadError, RequestError
from .llm import LLM
from .outputs import CompletionOutput, EngineStats, RequestOutput
from .sampling import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "EngineStats",
    "EdgepagedError",
    "ModelLoadError",
    "RequestError",
]
__version__ = "0.1.0"
