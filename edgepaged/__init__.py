"""edgepaged: an LLM inference runtime for edge boxes with a paged KV cache.

`LLM`, `SamplingParams` and `OutputKind` are loaded on first use (PEP 562), so importing a light module
(`edgepaged.profiles`, the CLI for `--help`) does not import torch, the engine and the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import EdgepagedError, ModelLoadError, RequestError
from .outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob

if TYPE_CHECKING:
    from .llm import LLM
    from .sampling import OutputKind, SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "OutputKind",
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
    if name in ("SamplingParams", "OutputKind"):
        from . import sampling

        return getattr(sampling, name)
    raise AttributeError(f"module 'edgepaged' has no attribute {name!r}")
