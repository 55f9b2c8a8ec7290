"""`edgepaged build`: the TensorRT engine for a model under a device profile, built once and cached.

When TensorRT is missing or too old, the advice is for the device the profile describes: a
Jetson gets TensorRT from JetPack, an x86 box with an RTX or datacenter card from NVIDIA's
wheels. `build` has no other backend to fall back to; `serve` and `generate` do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ..errors import EdgepagedError

if TYPE_CHECKING:
    from ..profiles import DeviceProfile


def build(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder or .gguf file (default: SmolLM2-135M-Instruct)."),
    profile: str = typer.Option(..., "--profile", "-p", help="Device profile name or YAML path (a CUDA profile)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where engines are kept (default: $EDGEPAGED_CACHE/engines)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when a matching engine is cached."),
) -> None:
    """Build (or find in the cache) the TensorRT engine for MODEL under PROFILE; prints its folder."""
    from ..backends.tensorrt import TensorRTUnavailable, install_hint, is_jetson
    from ..backends.tensorrt.build import build_engine
    from ..profiles import load_profile

    def log(line: str) -> None:
        typer.echo(line, err=True)

    try:
        prof = load_profile(profile)
        engine_dir = build_engine(model, prof, cache_dir=cache_dir, force=force, log=log)
    except TensorRTUnavailable as exc:
        # The import's advice is for this machine; the engine is for the profile's device.
        reason = str(exc).removesuffix(install_hint(is_jetson())).rstrip("; ")
        typer.secho(f"error: {reason}; {tensorrt_advice(prof)}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    except (EdgepagedError, ValueError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    typer.echo(str(engine_dir))


def tensorrt_advice(profile: DeviceProfile) -> str:
    """How to get a TensorRT that can build for `profile`'s device, and what runs without it."""
    from ..backends.tensorrt import MIN_TENSORRT_VERSION

    need = ".".join(map(str, MIN_TENSORRT_VERSION))
    if profile.device.kind == "cpu":
        return f"{profile.name} is a CPU profile and TensorRT engines run on CUDA GPUs; pick one (edgepaged profile list)"
    without = (
        f"until then `edgepaged serve --profile {profile.name}` and `generate` run without TensorRT "
        f"(their --backend triton)"
    )
    if profile.device.kind == "cuda" and profile.device.unified_memory:
        return (
            f"{profile.name} is a Jetson, where TensorRT comes with JetPack (the python3-libnvinfer "
            f"package, seen from a venv made with --system-site-packages); edgepaged needs TensorRT >= {need}, "
            f"which JetPack 7 has (10.13) and JetPack 6.x does not (10.3); {without}"
        )
    return (
        f'{profile.name} is a discrete GPU: on its x86 box install NVIDIA\'s wheels, pip install "tensorrt>={need}" '
        f"(they fetch the libraries from https://pypi.nvidia.com); {without}"
    )
