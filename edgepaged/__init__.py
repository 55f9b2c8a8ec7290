"""edgepaged: an LLM inference runtime for edge boxes with a paged KV cache.

`LLM` is loaded on first use (PEP 562), so importing a light module (`edgepaged.sampling`,
`edgepaged.profiles`) does not import the engine, the model and torch's CUDA stack with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import EdgepagedError, ModelLoadError, RequestError
from .outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .llm import LLM

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "TokenLogprob",
    "EngineStats",
    "EdgepagedError",
    "ModelLoadError",
    "RequestError",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(f"module 'edgepaged' has no attribute {name!r}")
