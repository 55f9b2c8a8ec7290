"""Build the TensorRT engine for a model under a device profile, once, and keep it on disk.

An engine is specific to four things: the model's weights, the profile's shapes and precision,
the TensorRT release that built it and the GPU architecture it was tuned for. The cache key is a
digest of all four (plus the graph's version and Triton's, since the plugin kernels are Triton
PTX), so a changed model, profile, TensorRT upgrade or different GPU simply gets its own engine
and never a stale one; the build says why a new engine is needed when an older one for the same
model and profile exists. An engine directory carries `meta.json`, and loading checks it against
the machine: an engine copied from another GPU or TensorRT release is refused with what to run.

The engine's shapes come from the profile: one optimization profile for decode steps (up to
`max_num_seqs` tokens, one per sequence) and one for steps with prefill chunks (up to
`max_num_batched_tokens`); block tables up to `max_model_len` tokens; pools of any size up to
2**31 elements per layer, since the memory plan sizes them at run time. The network
is strongly typed, so the exported graph's dtype (the profile's fp16/bf16) is what runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from ...config import DTYPES
from ...errors import EdgepagedError
from ...models.config import ModelConfig
from ...models.loader import cache_root, display_name, packed_checkpoint, resolve_model
from ...profiles import DeviceProfile, load_profile
from . import TensorRTUnavailable, import_tensorrt
from .export import (
    BLOCK_TABLES,
    CONTEXT_LENS,
    GRAPH_VERSION,
    HIDDEN_IN,
    POSITIONS,
    QUERY_START_LOC,
    SLOT_MAPPING,
    check_exportable,
    k_cache_input,
    v_cache_input,
)

ENGINE_FILE = "model.engine"
META_FILE = "meta.json"
_HASHES_FILE = "model-hashes.json"

Log = Callable[[str], None]

# One layer's K or V pool stays under 2**31 elements: most TensorRT layers take larger tensors only
# since 10.10, and 4 GiB of fp16 per pool already lets a 16-layer model's pools fill 128 GiB.
_MAX_POOL_ELEMENTS = 2**31 - 1


class EngineMismatch(EdgepagedError, RuntimeError):
    """An engine that cannot run here (other GPU, other TensorRT, other model) or is incomplete."""


@dataclass(frozen=True, slots=True)
class BuildTarget:
    """The machine side of an engine's identity."""

    tensorrt_version: str
    compute_capability: str  # "8.7"
    gpu_name: str


def current_target(trt: ModuleType) -> BuildTarget:
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need a CUDA GPU and none is visible here")
    major, minor = torch.cuda.get_device_capability()
    return BuildTarget(trt.__version__, f"{major}.{minor}", torch.cuda.get_device_name())


@dataclass(frozen=True, slots=True)
class EngineShapes:
    """What the engine's shapes and precision are fixed to, from the profile and the model."""

    dtype: str
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_num_blocks: int  # the most blocks one layer's pool may have (the memory plan decides at run time)

    @classmethod
    def from_profile(cls, profile: DeviceProfile, cfg: ModelConfig) -> EngineShapes:
        if profile.device.kind != "cuda":
            raise ValueError(f"profile {profile.name!r} is for a {profile.device.kind} device; TensorRT engines run on CUDA GPUs")
        if profile.kv_dtype != profile.model.dtype:
            raise ValueError(f"profile {profile.name!r}: a KV dtype other than the model dtype is not supported")
        sched = profile.scheduler
        block_elements = profile.kv_cache.block_size * cfg.num_kv_heads * cfg.head_dim
        return cls(
            dtype=profile.model.dtype,
            block_size=profile.kv_cache.block_size,
            max_model_len=min(sched.max_model_len, cfg.max_context),
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            max_num_blocks=_MAX_POOL_ELEMENTS // block_elements,
        )

    def optimization_profiles(self, cfg: ModelConfig) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
        """(min, opt, max) shape of every dynamic input, for the decode and the mixed profile.

        Only the token count differs between the two; TensorRT tunes its GEMMs for the largest
        step each profile covers.
        """
        seqs = self.max_num_seqs
        width = -(-self.max_model_len // self.block_size)
        pool = (self.block_size, cfg.num_kv_heads, cfg.head_dim)
        profiles = []
        for max_tokens in (self.max_num_seqs, self.max_num_batched_tokens):
            shapes = {
                HIDDEN_IN: ((1, cfg.hidden_size), (max_tokens, cfg.hidden_size), (max_tokens, cfg.hidden_size)),
                POSITIONS: ((1,), (max_tokens,), (max_tokens,)),
                SLOT_MAPPING: ((1,), (max_tokens,), (max_tokens,)),
                BLOCK_TABLES: ((1, 1), (seqs, width), (seqs, width)),
                CONTEXT_LENS: ((1,), (seqs,), (seqs,)),
                QUERY_START_LOC: ((2,), (seqs + 1,), (seqs + 1,)),
            }
            for layer in range(cfg.num_layers):
                for name in (k_cache_input(layer), v_cache_input(layer)):
                    shapes[name] = ((1, *pool), (self.max_num_blocks, *pool), (self.max_num_blocks, *pool))
            profiles.append(shapes)
        return profiles


@dataclass(frozen=True, slots=True)
class EngineMeta:
    """What an engine was built from and for; written beside it as meta.json."""

    model_name: str
    model_hash: str
    profile_name: str
    shapes: EngineShapes
    target: BuildTarget
    graph_version: int
    triton_version: str

    @property
    def key(self) -> str:
        """The cache key: everything an engine depends on except the names."""
        identity = dataclasses.asdict(self)
        del identity["model_name"], identity["profile_name"]
        identity["target"].pop("gpu_name")  # same architecture, same engine
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def dtype(self) -> str:
        return self.shapes.dtype

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EngineMeta:
        raw = json.loads(text)
        return cls(**{**raw, "shapes": EngineShapes(**raw["shapes"]), "target": BuildTarget(**raw["target"])})


def engines_root(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir) if cache_dir is not None else cache_root() / "engines"


def model_fingerprint(folder: Path, memo: Path) -> str:
    """sha256 over config.json and the safetensors files, each file's digest remembered in
    `memo` by (path, size, mtime) so a multi-GB checkpoint is read once, not at every start."""
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    digests = []
    for file in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        stat = file.stat()
        ident = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if ident not in known:
            h = hashlib.sha256()
            with file.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            known[ident] = h.hexdigest()
        digests.append(f"{file.name}:{known[ident]}")
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps(known, indent=1, sort_keys=True))
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


def _triton_version() -> str:
    import triton

    return triton.__version__


def mismatches(meta: EngineMeta, target: BuildTarget, model_hash: str | None = None) -> list[str]:
    """Why an engine cannot run on `target` (and, given one, with the model of `model_hash`)."""
    built = meta.target
    reasons = []
    if built.compute_capability != target.compute_capability:
        reasons.append(
            f"it was built for compute capability {built.compute_capability} ({built.gpu_name}) and this GPU is "
            f"{target.compute_capability} ({target.gpu_name})"
        )
    if built.tensorrt_version != target.tensorrt_version:
        reasons.append(f"it was built with TensorRT {built.tensorrt_version} and this is TensorRT {target.tensorrt_version}")
    if model_hash is not None and meta.model_hash != model_hash:
        reasons.append(f"the model's weights changed since (engine {meta.model_hash}, model now {model_hash})")
    return reasons


def read_meta(engine_dir: Path) -> EngineMeta:
    meta_path, engine_path = engine_dir / META_FILE, engine_dir / ENGINE_FILE
    if not meta_path.is_file() or not engine_path.is_file():
        raise EngineMismatch(f"{engine_dir} is not a complete edgepaged engine (expected {META_FILE} and {ENGINE_FILE})")
    try:
        return EngineMeta.from_json(meta_path.read_text())
    except (ValueError, TypeError, KeyError) as exc:
        raise EngineMismatch(f"{meta_path} is unreadable ({exc}); rebuild with `edgepaged build`") from None


def load_engine(trt: ModuleType, engine_dir: Path, folder: Path, cache_dir: Path | None = None):
    """Deserialize an engine after checking it was built for this GPU, TensorRT and model."""
    meta = read_meta(engine_dir)
    model_hash = model_fingerprint(folder, engines_root(cache_dir) / _HASHES_FILE)
    reasons = mismatches(meta, current_target(trt), model_hash)
    if reasons:
        raise EngineMismatch(
            f"refusing engine {engine_dir}: {'; '.join(reasons)}. Rebuild it on this machine with "
            f"`edgepaged build --model {folder} --profile {meta.profile_name}`"
        )
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((engine_dir / ENGINE_FILE).read_bytes())
    if engine is None:
        raise EngineMismatch(f"TensorRT could not deserialize {engine_dir / ENGINE_FILE} (see its log above)")
    return engine, meta


def _stale_note(root: Path, meta: EngineMeta) -> str | None:
    """Why the newest other engine for the same model name and profile does not serve any more."""
    older = []
    for meta_path in root.glob(f"*/{META_FILE}"):
        try:
            other = EngineMeta.from_json(meta_path.read_text())
        except (ValueError, TypeError, KeyError):
            continue
        if (other.model_name, other.profile_name) == (meta.model_name, meta.profile_name) and other.key != meta.key:
            older.append((meta_path.stat().st_mtime, other, meta_path.parent))
    if not older:
        return None
    _, other, where = max(older, key=lambda item: item[0])
    reasons = mismatches(other, meta.target, meta.model_hash)
    if other.shapes != meta.shapes:
        reasons.append("the profile's shapes or dtype changed")
    if (other.graph_version, other.triton_version) != (meta.graph_version, meta.triton_version):
        reasons.append("edgepaged's graph or Triton kernels changed")
    return f"the engine in {where} no longer serves: {'; '.join(reasons)}"


def build_engine(
    model: str | Path | None,
    profile: str | Path | DeviceProfile,
    *,
    cache_dir: Path | None = None,
    force: bool = False,
    log: Log | None = None,
    trt: ModuleType | None = None,
) -> Path:
    """The engine directory for `model` under `profile`, built unless a matching one is cached."""
    say = log or (lambda _: None)
    folder = resolve_model(model)
    prof = load_profile(profile)
    cfg = ModelConfig.from_folder(folder)
    check_exportable(cfg, display_name(model, folder), quantized=False)  # compile_engine loads float weights
    trt = trt or import_tensorrt()
    target = current_target(trt)
    if packed_checkpoint(folder) and prof.model.quantization == "keep":
        say(f"{display_name(model, folder)} is quantized: the engine holds its weights dequantized to "
            f"{EngineShapes.from_profile(prof, cfg).dtype} (the TensorRT graph has float layers only)")
    root = engines_root(cache_dir)
    meta = EngineMeta(
        model_name=folder.name,
        model_hash=model_fingerprint(folder, root / _HASHES_FILE),
        profile_name=prof.name,
        shapes=EngineShapes.from_profile(prof, cfg),
        target=target,
        graph_version=GRAPH_VERSION,
        triton_version=_triton_version(),
    )
    engine_dir = root / f"{meta.model_name}--{meta.profile_name}--{meta.key}"
    if force:
        say(f"rebuilding {engine_dir} as asked")
    elif engine_dir.exists():
        try:
            reasons = mismatches(read_meta(engine_dir), target, meta.model_hash)
        except EngineMismatch as exc:
            reasons = [str(exc)]
        if not reasons:
            say(f"using the cached engine {engine_dir}")
            return engine_dir
        say(f"rebuilding {engine_dir}: {'; '.join(reasons)}")
    else:
        say(_stale_note(root, meta) or f"no engine for {meta.model_name} under {meta.profile_name} on this GPU and TensorRT yet")
    say(f"building for {target.gpu_name} (compute capability {target.compute_capability}), TensorRT {target.tensorrt_version}")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        staging = Path(tmp) / "engine"
        staging.mkdir()
        compile_engine(trt, folder, cfg, meta.shapes, staging / ENGINE_FILE, Path(tmp), say)
        (staging / META_FILE).write_text(meta.to_json())
        if engine_dir.exists():
            shutil.rmtree(engine_dir)
        os.replace(staging, engine_dir)  # a complete engine appears at once or not at all
    say(f"engine ready: {engine_dir}")
    return engine_dir


def compile_engine(trt: ModuleType, folder: Path, cfg: ModelConfig, shapes: EngineShapes, out: Path, work: Path, say: Log) -> None:
    """Export, lower, parse and build; writes the serialized engine to `out`."""
    import onnx

    from ...models.llama import LlamaForCausalLM
    from ...models.weights import load_weights
    from ..torch_ref import TorchRefBackend
    from .export import export_onnx
    from .plugin import lower_for_tensorrt, register_plugins

    say(f"exporting {folder.name} to ONNX ({shapes.dtype})")
    # The backend is never run here: the export reads its softmax scale and nothing else.
    scale_source = TorchRefBackend(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)
    model = LlamaForCausalLM(cfg, scale_source, DTYPES[shapes.dtype], torch.device("cpu"), shapes.max_model_len)
    load_weights(model, folder)
    exported = export_onnx(model, work / "decoder.onnx", shapes.block_size, folder.name)
    del model
    lowered = work / "decoder.trt.onnx"  # shares decoder.onnx.data, which sits in the same folder
    onnx.save_model(lower_for_tensorrt(onnx.load(str(exported), load_external_data=False)), str(lowered))

    say("parsing the graph with the paged-attention plugins")
    register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(lowered)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse the exported graph: {errors}")
    config = builder.create_builder_config()
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)  # the pools update in place
    for shape_set in shapes.optimization_profiles(cfg):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shape_set.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    config.progress_monitor = _progress_bars(trt)

    say("building the engine (TensorRT times its tactics; minutes on a Jetson)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    out.write_bytes(bytes(serialized))


def _progress_bars(trt: ModuleType):
    """TensorRT's build phases as nested progress bars."""
    from tqdm import tqdm

    class ProgressBars(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, tqdm] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, position=len(self.bars), leave=parent_phase is None)

        def step_complete(self, phase_name, step):
            bar = self.bars[phase_name]
            bar.update(step + 1 - bar.n)
            return True  # never cancel

        def phase_finish(self, phase_name):
            self.bars.pop(phase_name).close()

    return ProgressBars()
