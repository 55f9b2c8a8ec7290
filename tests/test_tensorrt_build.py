"""Engine cache keying, every refusal path, and the plugin kernels' AOT form, without TensorRT or a GPU.

TensorRT itself is faked where it is needed (a module with a version; the compile step replaced
by one that writes bytes): what is under test is what edgepaged decides around it. The plugin
kernels are real: Triton compiles them to PTX for sm_90 and sm_87 on the CPU, and Triton's
bundled ptxas assembles the rewritten PTX.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from edgepaged.backends.tensorrt import TensorRTUnavailable, import_tensorrt, parse_version
from edgepaged.backends.tensorrt import build as trt_build
from edgepaged.backends.tensorrt.build import (
    ENGINE_FILE,
    META_FILE,
    BuildTarget,
    EngineMeta,
    EngineMismatch,
    EngineShapes,
    build_engine,
    load_engine,
    model_fingerprint,
)
from edgepaged.backends.tensorrt.export import (
    BLOCK_TABLES,
    HIDDEN_IN,
    HIDDEN_OUT,
    QUERY_START_LOC,
    StepInputs,
    k_cache_input,
    k_cache_output,
    v_cache_input,
)
from edgepaged.backends.tensorrt.runtime import TensorRTModel
from edgepaged.cli.build import build
from edgepaged.cli.doctor import Machine, collect, doctor
from edgepaged.models.config import ModelConfig
from edgepaged.models.random_init import write_random_model
from edgepaged.profiles import load_profile

H100 = BuildTarget("10.13.0", "9.0", "NVIDIA H100 80GB HBM3")
ORIN = BuildTarget("10.13.0", "8.7", "Orin")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("trt-build-model"), "tiny-llama", vocab_size=128)


@pytest.fixture
def fake_build(monkeypatch):
    """TensorRT present (as a version string) on a given GPU; compiling writes a stamp and is counted."""
    state = types.SimpleNamespace(target=H100, compiled=[], log=[])

    def compile_engine(trt, folder, cfg, shapes, out, work, say):
        state.compiled.append(shapes)
        out.write_bytes(b"engine for " + state.target.compute_capability.encode())

    monkeypatch.setattr(trt_build, "current_target", lambda trt: state.target)
    monkeypatch.setattr(trt_build, "compile_engine", compile_engine)
    state.run = lambda folder, profile="rtx-4090-24gb", **kw: build_engine(
        folder, profile, trt=types.SimpleNamespace(__version__=state.target.tensorrt_version), log=state.log.append, **kw
    )
    return state


def _meta(**changes) -> EngineMeta:
    shapes = EngineShapes("float16", 16, 4096, 64, 1024, 100_000)
    base = EngineMeta("m", "abc123", "rtx", shapes, H100, 1, "3.6.0")
    return dataclasses.replace(base, **changes)


def test_key_covers_model_profile_tensorrt_gpu_and_kernels_but_not_names():
    base = _meta()
    changed = [
        _meta(model_hash="def456"),
        _meta(shapes=dataclasses.replace(base.shapes, dtype="bfloat16")),
        _meta(shapes=dataclasses.replace(base.shapes, max_num_seqs=128)),
        _meta(target=dataclasses.replace(H100, tensorrt_version="10.9.0")),
        _meta(target=ORIN),
        _meta(graph_version=2),
        _meta(triton_version="3.7.0"),
    ]
    assert len({m.key for m in [base, *changed]}) == len(changed) + 1
    same = [_meta(model_name="other"), _meta(profile_name="other"), _meta(target=dataclasses.replace(H100, gpu_name="H100 PCIe"))]
    assert {m.key for m in same} == {base.key}
    assert EngineMeta.from_json(base.to_json()) == base


def test_shapes_and_optimization_profiles_come_from_the_device_profile(folder):
    cfg = ModelConfig.from_folder(folder)
    profile = load_profile("jetson-orin-nano-8gb")
    shapes = EngineShapes.from_profile(profile, cfg)
    sched = profile.scheduler
    assert (shapes.dtype, shapes.block_size, shapes.max_num_seqs) == ("float16", 16, sched.max_num_seqs)
    assert shapes.max_model_len == min(sched.max_model_len, cfg.max_context)
    assert shapes.max_num_blocks * 16 * cfg.num_kv_heads * cfg.head_dim < 2**31  # one layer's pool, in elements
    decode, mixed = shapes.optimization_profiles(cfg)
    assert decode[HIDDEN_IN][2] == (sched.max_num_seqs, cfg.hidden_size)
    assert mixed[HIDDEN_IN][2] == (sched.max_num_batched_tokens, cfg.hidden_size)
    assert mixed[QUERY_START_LOC] == ((2,), (sched.max_num_seqs + 1,), (sched.max_num_seqs + 1,))
    assert mixed[BLOCK_TABLES][2] == (sched.max_num_seqs, -(-shapes.max_model_len // 16))
    pools = {k_cache_input(i) for i in range(cfg.num_layers)} | {v_cache_input(i) for i in range(cfg.num_layers)}
    assert pools <= decode.keys()
    assert decode[k_cache_input(0)][2] == (shapes.max_num_blocks, 16, cfg.num_kv_heads, cfg.head_dim)
    with pytest.raises(ValueError, match="CUDA"):
        EngineShapes.from_profile(load_profile("cpu"), cfg)


def test_model_fingerprint_follows_the_weights_and_remembers_digests(tmp_path):
    folder = write_random_model(tmp_path / "m", "tiny-llama", vocab_size=128, seed=1)
    memo = tmp_path / "hashes.json"
    first = model_fingerprint(folder, memo)
    assert model_fingerprint(folder, memo) == first
    assert len(json.loads(memo.read_text())) == 2  # config.json and the one safetensors file
    write_random_model(folder, "tiny-llama", vocab_size=128, seed=2)
    assert model_fingerprint(folder, memo) != first


def test_engine_is_built_once_then_served_from_the_cache(folder, fake_build, tmp_path):
    first = fake_build.run(folder, cache_dir=tmp_path)
    assert (first / ENGINE_FILE).read_bytes() == b"engine for 9.0" and len(fake_build.compiled) == 1
    meta = EngineMeta.from_json((first / META_FILE).read_text())
    assert (meta.target, meta.profile_name, meta.shapes.dtype) == (H100, "rtx-4090-24gb", "float16")
    assert fake_build.run(folder, cache_dir=tmp_path) == first
    assert len(fake_build.compiled) == 1 and "using the cached engine" in fake_build.log[-1]
    assert fake_build.run(folder, cache_dir=tmp_path, force=True) == first
    assert len(fake_build.compiled) == 2
    other_profile = fake_build.run(folder, "h100-80gb", cache_dir=tmp_path)
    assert other_profile != first and len(fake_build.compiled) == 3


def test_a_tensorrt_upgrade_or_new_weights_build_a_new_engine_and_say_why(tmp_path, fake_build):
    folder = write_random_model(tmp_path / "m", "tiny-llama", vocab_size=128, seed=3)
    first = fake_build.run(folder, cache_dir=tmp_path / "engines")
    fake_build.target = dataclasses.replace(H100, tensorrt_version="10.14.1")
    upgraded = fake_build.run(folder, cache_dir=tmp_path / "engines")
    assert upgraded != first
    assert any("built with TensorRT 10.13.0 and this is TensorRT 10.14.1" in line for line in fake_build.log)
    write_random_model(folder, "tiny-llama", vocab_size=128, seed=4)
    retrained = fake_build.run(folder, cache_dir=tmp_path / "engines")
    assert retrained not in (first, upgraded) and len(fake_build.compiled) == 3
    assert "weights changed" in " ".join(fake_build.log)


def test_a_foreign_engine_in_the_cache_is_rebuilt(folder, fake_build, tmp_path):
    engine_dir = fake_build.run(folder, cache_dir=tmp_path)
    meta = EngineMeta.from_json((engine_dir / META_FILE).read_text())
    (engine_dir / META_FILE).write_text(dataclasses.replace(meta, target=ORIN).to_json())  # copied from a Jetson
    assert fake_build.run(folder, cache_dir=tmp_path) == engine_dir
    assert len(fake_build.compiled) == 2
    assert any("compute capability 8.7 (Orin) and this GPU is 9.0" in line for line in fake_build.log)
    assert EngineMeta.from_json((engine_dir / META_FILE).read_text()).target == H100


def test_a_failed_build_leaves_no_engine_behind(folder, fake_build, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("TensorRT could not parse the exported graph")

    monkeypatch.setattr(trt_build, "compile_engine", broken)
    with pytest.raises(RuntimeError, match="parse"):
        fake_build.run(folder, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model-hashes.json"]


def test_loading_an_engine_for_another_gpu_or_model_is_refused(folder, fake_build, tmp_path, monkeypatch):
    engine_dir = fake_build.run(folder, cache_dir=tmp_path)
    trt = types.SimpleNamespace(__version__=H100.tensorrt_version)
    monkeypatch.setattr(trt_build, "current_target", lambda trt: ORIN)
    with pytest.raises(EngineMismatch) as refusal:
        load_engine(trt, engine_dir, folder, cache_dir=tmp_path)
    message = str(refusal.value)
    assert "compute capability 9.0 (NVIDIA H100 80GB HBM3) and this GPU is 8.7 (Orin)" in message
    assert f"edgepaged build --model {folder} --profile rtx-4090-24gb" in message
    monkeypatch.setattr(trt_build, "current_target", lambda trt: H100)
    other = write_random_model(tmp_path / "other", "tiny-llama", vocab_size=128, seed=9)
    with pytest.raises(EngineMismatch, match="weights changed"):
        load_engine(trt, engine_dir, other, cache_dir=tmp_path)
    (engine_dir / ENGINE_FILE).unlink()
    with pytest.raises(EngineMismatch, match="not a complete edgepaged engine"):
        load_engine(trt, engine_dir, folder, cache_dir=tmp_path)


def test_missing_or_old_tensorrt_is_refused_with_how_to_install(folder, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    with pytest.raises(TensorRTUnavailable, match=r"not installed.*pip install \"tensorrt>=10.9\""):
        build_engine(folder, "rtx-4090-24gb", cache_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT 10.3.0 is too old.*>= 10.9"):
        build_engine(folder, "rtx-4090-24gb", cache_dir=tmp_path)
    def missing(name):
        raise ImportError(f"No module named {name!r}")

    with pytest.raises(TensorRTUnavailable, match="JetPack"):
        import_tensorrt(missing, jetson=True)
    assert import_tensorrt(lambda name: types.SimpleNamespace(__version__="10.13.0.35")).__version__ == "10.13.0.35"
    assert parse_version("10.13.0.35") == (10, 13, 0, 35) and parse_version("10.9.0a1") == (10, 9, 0)


def test_build_command_reports_refusals_and_exits_2(monkeypatch):
    app = typer.Typer()
    app.command()(build)
    app.command("other")(lambda: None)  # two commands, so `build` is a subcommand as when mounted
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = CliRunner().invoke(app, ["build", "--profile", "rtx-4090-24gb"])
    assert result.exit_code == 2
    assert "TensorRT is not installed" in result.output


def test_doctor_without_gpu_or_tensorrt_names_what_can_run_and_how_to_install(tmp_path):
    real = __import__("importlib").import_module

    def importer(name):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real(name)

    tegra = tmp_path / "nv_tegra_release"
    tegra.write_text("# R36 (release), REVISION: 4.3\n")
    machine = Machine(importer=importer, nvidia_driver=tmp_path / "none", tegra_release=tegra, cuda_driver_version=lambda: None)
    found = {f.name: f for f in collect(machine)}
    assert found["jetson"].detail == "L4T R36 (release), REVISION: 4.3"
    assert not found["tensorrt"].ok and "JetPack" in found["tensorrt"].detail
    assert not found["driver"].ok
    assert found["backends"].detail.startswith("torch; not here: triton")
    driver = tmp_path / "nvidia-version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  560.35.03  Fri Aug 16 21:39:15 UTC 2024\n")
    machine = Machine(importer=importer, nvidia_driver=driver, tegra_release=tmp_path / "none", cuda_driver_version=lambda: "12.6")
    found = {f.name: f for f in collect(machine)}
    assert found["driver"].detail == "NVIDIA 560.35.03, supports CUDA 12.6"
    assert "pypi.nvidia.com" in found["tensorrt"].detail and "jetson" not in found
    app = typer.Typer()
    app.command()(doctor)
    app.command("other")(lambda: None)
    shown = CliRunner().invoke(app, ["doctor", "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)[-1]["name"] == "backends"


# -- the runtime against a fake engine ---------------------------------------------------------------


class _FakeContext:
    """Records what the runtime binds; refuses token counts past its profile like TensorRT."""

    def __init__(self, max_tokens: int):
        self.max_tokens, self.shapes, self.addresses, self.address_calls, self.runs = max_tokens, {}, {}, 0, 0

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_device_memory(self, pointer, size):
        self.memory = (pointer, size)

    def set_input_shape(self, name, shape):
        if name == HIDDEN_IN and shape[0] > self.max_tokens:
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer
        self.address_calls += 1
        return True

    def execute_async_v3(self, stream):
        self.runs += 1
        return True


class _FakeEngine:
    device_memory_size_v2 = 4096
    num_optimization_profiles = 2

    def __init__(self, hidden: int, max_tokens: tuple[int, int]):
        self.hidden, self.max_tokens, self.contexts = hidden, max_tokens, []

    def create_execution_context(self, strategy):
        self.contexts.append(_FakeContext(self.max_tokens[len(self.contexts)]))
        return self.contexts[-1]

    def get_tensor_profile_shape(self, name, index):
        most = self.max_tokens[index]
        return [(1, self.hidden), (most, self.hidden), (most, self.hidden)]


def _step(num_tokens: int, decode_only: bool) -> StepInputs:
    return StepInputs(
        slot_mapping=torch.arange(num_tokens), block_tables=torch.zeros(num_tokens, 2, dtype=torch.int32),
        context_lens=torch.ones(num_tokens, dtype=torch.int32),
        query_start_loc=torch.arange(num_tokens + 1, dtype=torch.int32), decode_only=decode_only,
    )


def test_runtime_binds_pools_in_place_and_picks_the_profile_per_step(folder, monkeypatch):
    stream = types.SimpleNamespace(cuda_stream=0, synchronize=lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    cfg = ModelConfig.from_folder(folder)
    engine = _FakeEngine(cfg.hidden_size, (4, 16))
    meta = _meta(shapes=dataclasses.replace(_meta().shapes, dtype="float32"))
    model = TensorRTModel(engine, meta, folder, torch.device("cpu"), "user-managed")
    decode, mixed = engine.contexts
    assert (decode.profile, mixed.profile) == (0, 1) and decode.memory == mixed.memory  # one shared buffer
    assert model.resident_bytes == cfg.vocab_size * cfg.hidden_size * 4 + 4096  # tied embedding + that buffer
    pool = torch.zeros(cfg.num_layers, 2, 8, 16, cfg.num_kv_heads, cfg.head_dim)
    caches = [(pool[i, 0], pool[i, 1]) for i in range(cfg.num_layers)]

    def run(n: int, decode_only: bool, kv=caches) -> torch.Tensor:
        return model(torch.arange(n), torch.arange(n, dtype=torch.int32), kv, _step(n, decode_only))

    hidden = run(3, True)
    assert hidden.shape == (3, cfg.hidden_size) and decode.runs == 1 and mixed.runs == 0
    assert decode.addresses[k_cache_output(1)] == decode.addresses[k_cache_input(1)] == caches[1][0].data_ptr()
    assert decode.shapes[k_cache_input(0)] == tuple(caches[0][0].shape)
    assert decode.addresses[HIDDEN_OUT] == hidden.data_ptr()
    calls = decode.address_calls
    run(2, True)
    assert decode.address_calls - calls == 7  # six step inputs and the output: the pools stay bound
    run(6, True)  # decode-only but past the decode profile: the mixed one serves it
    run(9, False)
    assert (decode.runs, mixed.runs) == (2, 2)
    with pytest.raises(ValueError, match="exceeds the engine's 16"):
        run(17, False)
    fresh = pool.clone()
    fresh_caches = [(fresh[i, 0], fresh[i, 1]) for i in range(cfg.num_layers)]
    run(2, True, fresh_caches)
    assert decode.addresses[v_cache_input(0)] == fresh_caches[0][1].data_ptr()
    shifted = torch.zeros(pool.numel() + 1)[1:].view(pool.shape)  # 4 bytes past an aligned allocation
    misaligned = [(shifted[i, 0], shifted[i, 1]) for i in range(cfg.num_layers)]
    with pytest.raises(ValueError, match="16-byte aligned"):
        run(2, True, misaligned)
    states = torch.randn(3, cfg.hidden_size)
    torch.testing.assert_close(model.compute_logits(states), states @ model.embed_tokens.T)


# -- the plugin kernels in TensorRT's AOT form ------------------------------------------------------


def _entry_params(ptx: str, name: str) -> list[str]:
    head = ptx[ptx.index(f".entry {name}(") :]
    return [p.strip() for p in head[head.index("(") + 1 : head.index(")")].split(",")]


@pytest.mark.parametrize("arch", [90, 87])
def test_plugin_kernels_take_tensorrt_argument_order_and_assemble(arch, tmp_path):
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    from edgepaged.backends.tensorrt.plugin import compile_paged_attend, compile_write_kv, ptx_version_for

    target = GPUTarget("cuda", arch, 32)
    ptx_version = ptx_version_for("12.6", arch)  # a JetPack 6 driver: older than Triton's ptxas
    write = compile_write_kv(torch.float16, torch.int64, 2, 64, 16, target, ptx_version).kernel
    attend_launch = compile_paged_attend(torch.float16, 6, 2, 64, 16, 0.125, target, ptx_version)
    attend = attend_launch.kernel
    assert attend_launch.grid(100, 3) == (3, -(-100 // attend_launch.block_q), 2)
    assert attend_launch.extra_args(7) == (7,)
    for kernel, expected in (
        # key, value, k_cache, v_cache, slot_mapping | no extra args | the two aliased pool outputs (unused)
        (write, [".u64"] * 5 + [".u64 _write_kv_kernel_abi_5", ".u64 _write_kv_kernel_abi_6"]),
        # q, k_cache, v_cache, block_tables, query_start_loc, context_lens | block-table width | out
        (attend, [".u64"] * 6 + [".u32"] + [".u64"]),
    ):
        params = _entry_params(kernel.ptx, kernel.name)
        assert len(params) == len(expected) == len(kernel.abi)  # no hidden scratch pointers
        for param, kind in zip(params, expected):
            assert param.startswith(f".param {kind}")
        assert f".version {ptx_version // 10}.{ptx_version % 10}" in kernel.ptx
        assert kernel.num_threads in (32, 128, 256) and kernel.shared_mem <= 48 * 1024
        source = tmp_path / f"{kernel.name}.ptx"
        source.write_text(kernel.ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        done = subprocess.run([get_ptxas(arch).path, f"--gpu-name={gpu}", str(source), "-o", str(tmp_path / "k.cubin")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    # The attention output (the kernel's first parameter) is passed last, after the width argument.
    params = _entry_params(attend.ptx, attend.name)
    assert params[-1].endswith("_param_0") and params[-2].endswith("_param_7")


def test_a_parameter_the_kernel_reads_cannot_be_dropped():
    from triton.backends.compiler import GPUTarget

    from edgepaged.backends.tensorrt.plugin import compile_write_kv, rewrite_params

    kernel = compile_write_kv(torch.float32, torch.int32, 1, 16, 8, GPUTarget("cuda", 90, 32)).kernel
    name = kernel.name
    original = [int(m) for m in re.findall(rf"{name}_param_(\d+)", "".join(_entry_params(kernel.ptx, name)))]
    with pytest.raises(ValueError, match="used by the kernel"):
        rewrite_params(kernel.ptx, name, [i for i in original if i != 4])  # slot_mapping is read


def test_a_quantized_checkpoint_builds_dequantized_and_says_so(fake_build, tmp_path):
    from gguf_models import RECIPES, write_gguf_model

    folder = write_gguf_model(tmp_path / "q4", RECIPES["q4_0"])
    fake_build.run(folder, cache_dir=tmp_path / "engines")
    assert "q4 is quantized: the engine holds its weights dequantized to float16" in " ".join(fake_build.log)
    assert len(fake_build.compiled) == 1
