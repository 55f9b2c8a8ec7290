"""edgepaged: an LLM inference runtime for edge boxes with a paged KV cache.

`LLM` and `SamplingParams` are loaded on first use (PEP 562), so importing a light module
(`edgepaged.profiles`, the CLI for `--help`) does not import torch, the engine and the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import EdgepagedError, ModelLoadError, RequestError
from .outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob

if TYPE_CHECKING:
    from .llm import LLM
    from .sampling import SamplingParams

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
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'edgepaged' has no attribute {name!r}")
