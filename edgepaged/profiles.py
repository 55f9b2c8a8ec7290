"""Device profiles: the figures and limits of one box, loaded from YAML and checked up front.

A profile is the user's contract with the runtime: how much of the device edgepaged may take,
how the KV cache is cut, how large a step may be. Every mistake in it is caught when it is
loaded, with the file, the dotted key and what was expected, because the alternative is an
out-of-memory kill minutes later on a box the user may not be watching.

Memory figures are GiB (2**30 bytes, as vendors size memory); bandwidth is GB/s (10**9).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import EdgepagedError

GIB = 1 << 30


def _shipped_dir() -> Path:
    """Where the shipped YAML files are: the `edgepaged.profiles_data` package (profiles/ in the
    repository, package data in a wheel). A checkout used without installing it (PYTHONPATH=.)
    has no such package, only the repository's profiles/ beside edgepaged/."""
    spec = importlib.util.find_spec("edgepaged.profiles_data")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "profiles"


PROFILES_DIR = _shipped_dir()

_MAX_EXTENDS_DEPTH = 8


class ProfileError(EdgepagedError, ValueError):
    """A profile that cannot be used; the message names the file, the key and what is expected."""


class _Inconsistent(ValueError):
    """A value that contradicts another key; carries the dotted key it should be reported under."""

    def __init__(self, key: str, expected: str):
        super().__init__(expected)
        self.key = key
        self.expected = expected


class _Spec(BaseModel):
    # strict: YAML already yields typed values, so "16" for an int is a mistake, not a string to coerce.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DeviceSpec(_Spec):
    kind: Literal["cpu", "cuda"]
    total_memory_gb: float = Field(gt=0)
    unified_memory: bool  # memory shared with the OS (Jetson, a CPU): the OS figure is the truth
    memory_bandwidth_gbps: float = Field(gt=0)  # for reports: batch-1 decode roofline
    emulate: bool = False  # plan from these figures on whatever device runs (benchmarking a small box on a big card)


class BudgetSpec(_Spec):
    fraction: float = Field(gt=0, le=1)  # of the device's total memory
    max_gb: float | None = Field(default=None, gt=0)  # absolute cap, whatever the fraction says
    os_reserve_gb: float = Field(default=0.0, ge=0)  # unified memory: left to the OS and other processes
    safety_margin_gb: float = Field(default=0.25, ge=0)  # headroom for allocator fragmentation


# The 8-bit KV pools: per-(token, head) scales beside the codes (edgepaged/attention.py says
# why), about half the bytes of a 16-bit pool, so about twice the tokens in the same budget.
KV_8BIT_DTYPES = ("int8", "fp8_e4m3")
# fp8 e4m3 conversions are hardware instructions from Ada (sm_89) on: Hopper, Blackwell, Thor.
# Orin (sm_87) and the RTX 30s (sm_86) have none, so their profiles take int8.
FP8_MIN_CAPABILITY = (8, 9)


class KVCacheSpec(_Spec):
    block_size: int = Field(default=16, gt=0)
    # auto: the model's dtype. int8: absmax-scaled codes, any GPU or the CPU. fp8_e4m3: the same
    # with e4m3 codes, on GPUs of compute capability 8.9+ (refused elsewhere when the engine starts).
    dtype: Literal["auto", "float32", "float16", "bfloat16", "int8", "fp8_e4m3"] = "auto"

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"expected a power of two such as 16 or 32, got {value}")
        return value


class ModelSpec(_Spec):
    dtype: Literal["float32", "float16", "bfloat16"]
    # A quantized checkpoint's weights: kept as shipped (packed, 4-8 bits) or dequantized to dtype.
    # The tensorrt backend always dequantizes.
    quantization: Literal["keep", "dequantize"] = "keep"


class SchedulerSpec(_Spec):
    max_model_len: int = Field(gt=0)
    max_num_seqs: int = Field(gt=0)
    max_num_batched_tokens: int = Field(gt=0)
    enable_prefix_caching: bool = True
    max_waiting_requests: int = Field(gt=0)  # the server refuses requests past these two
    max_waiting_tokens: int = Field(gt=0)
    # Launch each step before reading the previous one's tokens (overlap.py). Unset: on for a
    # CUDA device, where the host's work then hides behind the GPU's (timed on the H200 in
    # docs/benchmarks/steploop-h200-2026-12-02.md), off on a CPU, where it only delays every
    # token by a step.
    overlap_steps: bool | None = None


class DeviceProfile(_Spec):
    name: str = Field(min_length=1)
    description: str = ""
    device: DeviceSpec
    budget: BudgetSpec
    kv_cache: KVCacheSpec = KVCacheSpec()
    model: ModelSpec
    scheduler: SchedulerSpec
    backend: Literal["torch", "triton", "tensorrt"]

    @property
    def kv_dtype(self) -> str:
        """The KV cache dtype with "auto" resolved to the model's dtype ("int8", "fp8_e4m3" as is)."""
        return self.model.dtype if self.kv_cache.dtype == "auto" else self.kv_cache.dtype

    def check_kv_dtype_on(self, capability: tuple[int, int], gpu_name: str) -> None:
        """Refuse a KV dtype this GPU cannot run (fp8 e4m3 below FP8_MIN_CAPABILITY)."""
        if self.kv_cache.dtype == "fp8_e4m3" and tuple(capability) < FP8_MIN_CAPABILITY:
            need = ".".join(map(str, FP8_MIN_CAPABILITY))
            raise ProfileError(
                f"profile {self.name}: kv_cache.dtype: fp8_e4m3 needs a GPU of compute capability {need} or newer "
                f"(Ada, Hopper, Blackwell), and {gpu_name} is compute capability {capability[0]}.{capability[1]} "
                f"(sm_{capability[0]}{capability[1]}); use int8"
            )

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        device, budget, sched = self.device, self.budget, self.scheduler
        total = device.total_memory_gb
        if budget.max_gb is not None and budget.max_gb > total:
            raise _Inconsistent("budget.max_gb", f"at most device.total_memory_gb ({total:g}), got {budget.max_gb:g}")
        if device.kind == "cpu" and not device.unified_memory:
            raise _Inconsistent("device.unified_memory", "true for a cpu device (its memory is the OS's own)")
        if budget.os_reserve_gb and not device.unified_memory:
            raise _Inconsistent(
                "budget.os_reserve_gb",
                f"0 on a device without unified memory (the driver's free figure already excludes the OS), "
                f"got {budget.os_reserve_gb:g}",
            )
        if budget.os_reserve_gb >= total:
            raise _Inconsistent(
                "budget.os_reserve_gb",
                f"less than device.total_memory_gb ({total:g}), got {budget.os_reserve_gb:g}",
            )
        limit = min(budget.fraction * total, budget.max_gb or total, total - budget.os_reserve_gb)
        if budget.safety_margin_gb >= limit:
            raise _Inconsistent(
                "budget.safety_margin_gb",
                f"less than the budget it is taken from ({limit:g} GiB by fraction, max_gb and reserve), "
                f"got {budget.safety_margin_gb:g}",
            )
        if self.kv_cache.dtype in KV_8BIT_DTYPES and self.backend == "tensorrt":
            raise _Inconsistent(
                "kv_cache.dtype",
                f"'auto' with the tensorrt backend (its attention plugin reads 16-bit pools), got {self.kv_cache.dtype!r}",
            )
        if device.kind == "cpu" and self.backend != "torch":
            raise _Inconsistent("backend", f"'torch' on a cpu device (triton and tensorrt need CUDA), got {self.backend!r}")
        if sched.max_num_batched_tokens < sched.max_num_seqs:
            raise _Inconsistent(
                "scheduler.max_num_batched_tokens",
                f"at least scheduler.max_num_seqs ({sched.max_num_seqs}) so every running sequence can decode "
                f"in one step, got {sched.max_num_batched_tokens}",
            )
        if sched.max_waiting_tokens < sched.max_model_len:
            raise _Inconsistent(
                "scheduler.max_waiting_tokens",
                f"at least scheduler.max_model_len ({sched.max_model_len}) so a full-length prompt can queue, "
                f"got {sched.max_waiting_tokens}",
            )
        return self


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path | DeviceProfile) -> DeviceProfile:
    """A shipped profile by name, or a YAML file (which may `extends:` another and override keys).

    An already-loaded DeviceProfile is returned as is, so callers can pass either along.
    """
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    path = _locate(str(name_or_path), base_dir=Path.cwd())
    raw = _merged(path, chain=())
    raw.setdefault("name", path.stem)
    try:
        return DeviceProfile.model_validate(raw)
    except ValidationError as exc:
        raise ProfileError(_describe(path, exc)) from None


def _locate(ref: str, base_dir: Path) -> Path:
    """A profile reference as a file: a path (relative to `base_dir`) or a shipped name."""
    candidate = Path(ref).expanduser()
    if not candidate.is_absolute():
        candidate = base_dir / candidate
    if candidate.is_file():
        return candidate
    shipped = PROFILES_DIR / f"{ref}.yaml"
    if "/" not in ref and shipped.is_file():
        return shipped
    raise ProfileError(
        f"{ref}: no such profile file, and not a shipped profile name; expected a .yaml path or one of: "
        f"{', '.join(list_profiles())}"
    )


def _merged(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The file's keys deep-merged over whatever it extends (the file wins)."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ProfileError(f"{path}: extends: expected no cycle, got {cycle}")
    if len(chain) >= _MAX_EXTENDS_DEPTH:
        raise ProfileError(f"{path}: extends: expected at most {_MAX_EXTENDS_DEPTH} levels of extends")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: expected valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent:
        raise ProfileError(f"{path}: extends: expected a shipped profile name or a path, got {parent!r}")
    try:
        parent_path = _locate(parent, base_dir=path.parent)
    except ProfileError as exc:
        raise ProfileError(f"{path}: extends: {exc}") from None
    base = _merged(parent_path, chain=(*chain, resolved))
    base.pop("name", None)  # a derived profile is its own profile, named by its file unless it says
    return _deep_merge(base, raw)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(path: Path, exc: ValidationError) -> str:
    """Pydantic's errors as `file: key: expected ...` lines, one per problem."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(part) for part in err["loc"]]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _Inconsistent):
            key, expected = ".".join([*loc, cause.key]), f"expected {cause.expected}"
        else:
            key, expected = ".".join(loc) or "(top level)", _expectation(err)
        lines.append(f"{path}: {key}: {expected}")
    return "\n".join(lines)


def _expectation(err: dict[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        allowed = _fields_at(tuple(err["loc"][:-1]))
        return f"unknown key; expected one of: {', '.join(allowed)}"
    if kind == "missing":
        return "expected a value (this key is required)"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping of keys, got {err['input']!r}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    expected = msg.removeprefix("Input should be ").replace("String should have ", "a string with ")
    return f"expected {expected}, got {err['input']!r}"


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema allows at `loc` (for the unknown-key message)."""
    model: type[BaseModel] = DeviceProfile
    for part in loc:
        model = model.model_fields[part].annotation  # every nested key is a plain _Spec model
    names = list(model.model_fields)
    return ["extends", *names] if model is DeviceProfile else names
