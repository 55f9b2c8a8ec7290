"""`edgepaged profile`: list the shipped profiles, check a profile file, show the memory plan.

`show` measures the plan when the profile's device is here (the engine loads the model and runs
its largest step). For a device that is not here it still answers, from the profile's own
figures: exact weight bytes from the checkpoint's headers (safetensors, or a GGUF's tensor table with
quantized tensors counted packed), KV bytes per token from
config.json, an analytic activation estimate, and it says which figures were estimated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:  # imported in the commands, so `edgepaged --help` does not load torch
    from ..memory.planner import MemoryPlan
    from ..profiles import DeviceProfile

app = typer.Typer(help="Device profiles and the memory plan they give.", no_args_is_help=True)


@app.command("list")
def list_command() -> None:
    """List the shipped profiles."""
    from ..profiles import list_profiles, load_profile

    for name in list_profiles():
        p = load_profile(name)
        memory = "unified" if p.device.unified_memory else "discrete"
        typer.echo(
            f"{name:<22} {p.device.kind:<4} {p.device.total_memory_gb:>6g} GiB {memory:<8} "
            f"{p.model.dtype:<8} {p.backend:<8} {p.description}"
        )


@app.command("validate")
def validate_command(file: Path = typer.Argument(..., help="profile YAML to check")) -> None:
    """Check a profile file (and whatever it extends); exit 1 with every problem found."""
    profile = _load(str(file))
    typer.echo(f"{file}: ok (profile {profile.name}, {profile.device.kind}, backend {profile.backend})")


@app.command("show")
def show_command(
    name: str = typer.Argument(..., help="shipped profile name or YAML path"),
    model: Optional[str] = typer.Option(None, "--model", help="model folder or .gguf (default: the default model)"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """Show how the profile's budget is spent on a model: weights, activations, KV pool, sequences."""
    from ..memory.planner import MemoryPlanError
    from ..memory.probe import device_matches

    profile = _load(name)
    try:
        if device_matches(profile):
            plan = measure_plan(model, profile)
        else:
            from ..models.loader import resolve_model

            plan = plan_from_figures(profile, resolve_model(model))
    except MemoryPlanError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(plan.to_json(), indent=2) if as_json else plan.format_table())


def measure_plan(model: str | Path | None, profile: str | Path | DeviceProfile) -> MemoryPlan:
    """The uncapped memory plan for `model` on this device under `profile`."""
    from ..engine import LLMEngine
    from ..planning import plan_for

    engine = LLMEngine.from_model(model, profile, max_kv_blocks=1, cuda_graphs=False)
    return plan_for(
        engine.runner, engine.config, engine.model_config, engine.profile,
        weights_bytes=engine.weights_bytes, max_model_len=engine.max_model_len, cap_blocks=None,
    )


def plan_from_figures(profile: DeviceProfile, folder: Path) -> MemoryPlan:
    """The plan on the device the profile describes, for a machine that does not have it."""
    from ..memory.planner import (
        ESTIMATED_CUDA_OVERHEAD_BYTES,
        dtype_bytes,
        estimate_activation_bytes,
        kv_token_bytes,
        plan_memory,
    )
    from ..memory.probe import facts_from_profile
    from ..models.config import ModelConfig
    from ..profiles import GIB

    cfg = ModelConfig.from_folder(folder)
    plan = plan_memory(
        profile,
        facts_from_profile(profile),
        weights_bytes=checkpoint_bytes(
            folder, dtype_bytes(profile.model.dtype), profile.model.quantization == "keep" and profile.backend != "tensorrt"
        ),
        activation_bytes=estimate_activation_bytes(cfg, profile),
        overhead_bytes=ESTIMATED_CUDA_OVERHEAD_BYTES,
        kv_bytes_per_token=kv_token_bytes(cfg, profile.kv_cache.dtype, profile.model.dtype),
        max_model_len=cfg.max_context,
        kv_bytes_per_token_16bit=kv_token_bytes(cfg, "float16", profile.model.dtype),
    )
    notes = (
        f"computed from the profile's figures ({profile.device.total_memory_gb:g} GiB); the device is not here to measure",
        f"weights are exact ({profile.model.dtype} parameter bytes, quantized ones packed, from {folder.name}'s checkpoint headers)",
        f"activations are an analytic estimate for {profile.scheduler.max_num_batched_tokens} batched tokens",
        f"runtime overhead is an estimate ({ESTIMATED_CUDA_OVERHEAD_BYTES / GIB:.2f} GiB for the CUDA context)",
    )
    return dataclasses.replace(plan, notes=notes)


def checkpoint_bytes(folder: Path, float_bytes: int, keep_quantized: bool = True) -> int:
    """Weight bytes of a checkpoint once loaded: float tensors cast to `float_bytes`, and a GGUF's
    or a GPTQ/AWQ folder's quantized tensors in their packed layout (unless `keep_quantized` is off).

    Reads only the headers, so a checkpoint of many GB costs nothing to size. Integer tensors are
    buffers (position ids and the like), not weights the model loads, so they are not counted.
    """
    from safetensors import safe_open

    from ..models.loader import gguf_source

    gguf = gguf_source(folder)
    if gguf is not None:
        from ..quant import GGUFFile

        return GGUFFile(gguf).tensor_bytes(float_bytes, keep_quantized)
    from ..quant.hf_int4 import checkpoint_quantization, int4_checkpoint_bytes

    int4 = checkpoint_quantization(folder) if keep_quantized else None
    if int4 is not None:  # a GPTQ/AWQ folder: its qweight/qzeros are packed, not buffers
        return int4_checkpoint_bytes(folder, int4, float_bytes)

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise typer.BadParameter(f"{folder} holds no *.safetensors weights", param_hint="--model")
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                if tensor.get_dtype().startswith(("F", "BF")):
                    total += math.prod(tensor.get_shape()) * float_bytes
    return total


def _load(name: str) -> DeviceProfile:
    from ..profiles import ProfileError, load_profile

    try:
        return load_profile(name)
    except ProfileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
