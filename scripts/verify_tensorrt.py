"""On a machine with TensorRT >= 10.9 and a CUDA GPU: build an engine for a small random model and
generate greedily with it, token for token against the torch backend.

The engine is built in this process (the plugins' Python is needed only to build); generation
runs in a child process that never imports the plugin module, which shows the engine carries its
kernels. In the child, the engine's model and planner are swapped into an LLMEngine built with
the torch backend, so the real scheduler and model runner drive it (chunked prefill, prefix
hits, decode batches), and the largest steps of the profile run first. Without TensorRT, a GPU,
triton or onnx it exits 1 saying what is missing and how to get it.

    python scripts/verify_tensorrt.py --profile rtx-4090-24gb --out trt-verify.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PLUGIN_MODULE = "edgepaged.backends.tensorrt.plugin"


def missing_requirements() -> list[str]:
    from edgepaged.backends.tensorrt import TensorRTUnavailable, import_tensorrt

    problems = []
    try:
        import_tensorrt()
    except TensorRTUnavailable as exc:
        problems.append(str(exc))
    import torch

    if not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible to torch (a CUDA build of torch and a GPU are needed)")
    for module, extra in (("triton", "gpu"), ("onnx", "trt")):
        try:
            __import__(module)
        except ImportError:
            problems.append(f'{module} is not installed: pip install "edgepaged[{extra}]"')
    return problems


def write_inputs(work: Path, base_profile: str, dtype: str) -> tuple[Path, Path]:
    """A 4-layer random Llama (GQA, head dim 64) and a small profile derived from `base_profile`."""
    from edgepaged.models.random_init import write_random_model

    folder = write_random_model(
        work / "model", "tiny-llama", vocab_size=2048, hidden_size=256, intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    )
    profile = work / "verify.yaml"
    profile.write_text(yaml.safe_dump({
        "extends": base_profile,
        "name": "verify-tensorrt",
        "model": {"dtype": dtype},
        "kv_cache": {"block_size": 16, "dtype": "auto"},
        "scheduler": {"max_model_len": 512, "max_num_seqs": 8, "max_num_batched_tokens": 64},
        "backend": "torch",
    }))
    return folder, profile


def prompts() -> dict[str, list[int]]:
    import random

    rng = random.Random(0)
    shared = [rng.randrange(2048) for _ in range(40)]
    return {
        "long": [rng.randrange(2048) for _ in range(150)],  # three chunks at 64 tokens a step
        "shared-a": shared + [5, 6, 7, 8, 9],
        "shared-b": shared + [rng.randrange(2048) for _ in range(9)],
        **{f"short-{i}": [rng.randrange(2048) for _ in range(3 + 4 * i)] for i in range(5)},
    }


def generate(folder: Path, profile: Path) -> dict:
    """Child process: torch-backend tokens, then engine tokens, through the same LLMEngine code."""
    import torch

    from edgepaged import SamplingParams
    from edgepaged.backends.tensorrt.build import build_engine
    from edgepaged.backends.tensorrt.runtime import StepPlanner, TensorRTModel
    from edgepaged.engine import LLMEngine

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    engine_dir = build_engine(folder, profile)  # cached by the parent: nothing is compiled
    results = {}
    for name in ("torch", "tensorrt"):
        engine = LLMEngine.from_model(folder, profile, max_kv_blocks=256, backend="torch")
        if name == "tensorrt":
            model = TensorRTModel.load(engine_dir, folder, engine.config.device)
            engine.runner.model = engine.model = model
            engine.runner.backend = StepPlanner()
            cfg = engine.config
            engine.runner.profile_run(cfg.max_num_batched_tokens, cfg.max_num_seqs, engine.max_model_len)
        start = time.perf_counter()
        final = {}
        for wave in (["long", "shared-a"], [p for p in prompts() if p not in ("long", "shared-a")]):
            for rid in wave:
                engine.add_request(rid, prompts()[rid], params)
            final.update(engine.run_to_completion(wave))
        torch.cuda.synchronize()
        results[name] = {
            "seconds": time.perf_counter() - start,
            "tokens": {rid: out.outputs[0].token_ids for rid, out in final.items()},
            "prefix_hit_tokens": engine.stats().prefix_hit_tokens,
        }
    results["plugin_module_loaded"] = PLUGIN_MODULE in sys.modules
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="rtx-4090-24gb", help="CUDA profile to derive the test profile from")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PROFILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(generate(*map(Path, args.child))))
        return

    problems = missing_requirements()
    if problems:
        print("cannot verify the TensorRT backend here:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        sys.exit(1)

    import tensorrt
    import torch

    from edgepaged.backends.tensorrt.build import build_engine

    with tempfile.TemporaryDirectory(prefix="edgepaged-verify-") as tmp:
        work = Path(tmp)
        os.environ["EDGEPAGED_CACHE"] = str(work / "cache")  # engines and digests stay in the temp folder
        folder, profile = write_inputs(work, args.profile, args.dtype)
        start = time.perf_counter()
        build_engine(folder, profile, log=lambda line: print(line, file=sys.stderr))
        build_seconds = time.perf_counter() - start
        child = subprocess.run([sys.executable, __file__, "--child", str(folder), str(profile)],
                               capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            sys.exit(f"generation with the engine failed (exit {child.returncode})")
        runs = json.loads(child.stdout.strip().splitlines()[-1])

    expected, got = runs["torch"]["tokens"], runs["tensorrt"]["tokens"]
    mismatched = {}
    for rid, tokens in expected.items():
        if got[rid] != tokens:
            first = next(i for i, (a, b) in enumerate(zip(tokens + [None], got[rid] + [None])) if a != b)
            mismatched[rid] = {"first_difference": first, "torch": tokens, "tensorrt": got[rid]}
    result = {
        "device": torch.cuda.get_device_name(),
        "tensorrt": tensorrt.__version__,
        "dtype": args.dtype,
        "base_profile": args.profile,
        "build_seconds": round(build_seconds, 1),
        "generate_seconds": {k: round(runs[k]["seconds"], 2) for k in ("torch", "tensorrt")},
        "prefix_hit_tokens": {k: runs[k]["prefix_hit_tokens"] for k in ("torch", "tensorrt")},
        "requests": len(expected),
        "tokens_compared": sum(len(t) for t in expected.values()),
        "mismatched": mismatched,
        "plugin_module_loaded_at_run_time": runs["plugin_module_loaded"],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if mismatched or runs["plugin_module_loaded"]:
        sys.exit(1)
    print(f"ok: {result['tokens_compared']} greedy tokens over {len(expected)} requests match the torch backend", file=sys.stderr)


if __name__ == "__main__":
    main()
