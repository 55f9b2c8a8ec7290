"""Rules of the code's shape, checked instead of remembered.

Data flows one way (profile → memory plan → block pool → scheduler → model runner → attention
backend → sampler, and the engine loop over them), so imports go one way: a module imports only
from its own layer or the layers below. Each piece of shared sequence state has one writer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edgepaged"
KERNELS = PACKAGE.parent / "kernels"

# Lowest first. A top-level module or subpackage of edgepaged, by name.
LAYERS = [
    {"errors", "profiles", "sampling", "outputs", "detokenizer", "tokenizer", "attention", "config"},
    {"cache", "sequence", "speculative", "kernels", "quant", "models", "memory"},
    {"scheduler", "backends", "cuda_graph", "input_processor", "output_processor", "beam_search"},
    {"model_runner", "planning"},
    {"overlap"},
    {"engine"},
    {"llm", "rag"},
    {"server"},
    {"cli", "__main__"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}

# attribute -> the one module allowed to assign it
WRITERS = {
    "num_computed_tokens": "scheduler.py",
    "num_pending": "overlap.py",
    "first_token_time": "output_processor.py",
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, path.relative_to(PACKAGE).parts
    for path in sorted(KERNELS.glob("*.py")):
        yield path, ("kernels", path.name)


def _imported_units(path: Path, parts: tuple[str, ...]) -> set[str]:
    """The top-level edgepaged modules `path` imports (the package root itself excluded)."""
    package = list(parts[:-1])
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                if not target:  # `from .. import name`: a submodule, or an attribute of the root
                    units.update(a.name for a in node.names if a.name in RANK)
                    continue
                units.add(target[0])
            elif node.module and node.module.startswith("edgepaged."):
                units.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            units.update(a.name.split(".")[1] for a in node.names if a.name.startswith("edgepaged."))
    return units


def test_every_module_has_a_layer():
    units = {parts[0].removesuffix(".py") for _, parts in _modules() if parts[0] != "__init__.py"}
    assert units <= set(RANK), f"give these a layer in LAYERS: {sorted(units - set(RANK))}"


@pytest.mark.parametrize("path,parts", list(_modules()), ids=lambda v: "/".join(v) if isinstance(v, tuple) else "")
def test_imports_point_down(path, parts):
    if parts == ("__init__.py",):
        return  # the package root re-exports (lazily) from everywhere
    own = "kernels" if parts[0] == "kernels" else parts[0].removesuffix(".py")
    upward = sorted(u for u in _imported_units(path, parts) if u in RANK and RANK[u] > RANK[own])
    assert not upward, f"{'/'.join(parts)} (layer {RANK[own]}) imports {upward} from above it"


def test_each_sequence_field_has_one_writer():
    offenders = []
    for path, parts in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in WRITERS and parts[-1] != WRITERS[target.attr]:
                    offenders.append(f"{'/'.join(parts)}:{node.lineno} writes {target.attr}")
    assert not offenders, offenders


def test_only_the_scheduler_appends_sampled_tokens():
    offenders = [
        f"{'/'.join(parts)}:{node.lineno}"
        for path, parts in _modules()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("append", "extend")
        and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "token_ids"
        and parts[-1] != "scheduler.py"
    ]
    assert not offenders, offenders


def test_the_engine_keeps_only_the_wiring_and_the_loop():
    assert len((PACKAGE / "engine.py").read_text().splitlines()) < 250
