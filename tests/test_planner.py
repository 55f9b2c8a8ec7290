"""Planner arithmetic on injected device facts, its errors, and the memory benchmark's plumbing."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from edgepaged.memory.planner import MemoryPlanError, estimate_activation_bytes, plan_memory
from edgepaged.memory.probe import DeviceFacts, HostPaths, probe_device
from edgepaged.profiles import GIB, load_profile

MIB = 1 << 20
KV_PER_TOKEN = 1024  # 16 KiB blocks at block_size 16: round numbers to check by hand


def profile_file(tmp_path: Path, base: str, **sections) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"extends": base, "name": "p", **sections}))
    return str(path)


@pytest.fixture
def discrete(tmp_path):
    """A 10 GiB card, budget half of it, 8 running sequences of at most 1024 tokens."""
    return load_profile(
        profile_file(
            tmp_path,
            "rtx-4060-8gb",
            device={"total_memory_gb": 10.0},
            budget={"fraction": 0.5, "safety_margin_gb": 0.25},
            scheduler={"max_model_len": 1024, "max_num_seqs": 8, "max_num_batched_tokens": 1024},
        )
    )


def plan(profile, facts, **kw):
    sizes = dict(weights_bytes=GIB, activation_bytes=GIB // 2, overhead_bytes=GIB // 4, kv_bytes_per_token=KV_PER_TOKEN)
    return plan_memory(profile, facts, **{**sizes, **kw})


def test_discrete_budget_by_fraction(discrete):
    p = plan(discrete, DeviceFacts(10 * GIB, 9 * GIB, False, "card"))
    assert (p.budget_bytes, p.budget_limited_by) == (5 * GIB, "fraction 0.5 of device memory")
    # 5 GiB - 1 (weights) - 0.5 (activations) - 0.25 (overhead) - 0.25 (margin) = 3 GiB of 16 KiB blocks
    assert p.kv_pool_bytes == 3 * GIB
    assert p.num_blocks == 196_608 and p.block_size == 16 and p.kv_tokens == 3_145_728
    assert p.max_seqs_at_max_len == 3072 and p.contiguous_max_seqs == 3072
    assert (p.safety_margin_bytes, p.source, p.unified, p.capped_by_max_kv_blocks) == (GIB // 4, "card", False, False)


def test_budget_by_absolute_cap(tmp_path):
    profile = load_profile(profile_file(tmp_path, "rtx-4060-8gb", budget={"fraction": 1.0, "max_gb": 4.0}))
    p = plan(profile, DeviceFacts(8 * GIB, 8 * GIB, False, "card"))
    assert (p.budget_bytes, p.budget_limited_by) == (4 * GIB, "max_gb 4")
    assert p.kv_pool_bytes == 4 * GIB - GIB - GIB // 2 - GIB // 4 - GIB // 4


def test_budget_by_what_is_available_counts_this_process_back(discrete):
    # 3 GiB free now, 1 GiB of it already ours (the weights loaded before the probe): 4 GiB budget.
    p = plan(discrete, DeviceFacts(10 * GIB, 3 * GIB, False, "card", process_bytes=GIB))
    assert (p.budget_bytes, p.budget_limited_by) == (4 * GIB, "memory available now")
    assert p.num_blocks == 2 * GIB // (16 * KV_PER_TOKEN)


def meminfo_host(tmp_path: Path, available_gib: float) -> HostPaths:
    (tmp_path / "meminfo").write_text(f"MemTotal: {8 * 1024 * 1024} kB\nMemAvailable: {int(available_gib * 1024 * 1024)} kB\n")
    (tmp_path / "release").write_text("# R36 (release)\n")
    return HostPaths(meminfo=tmp_path / "meminfo", self_status=tmp_path / "status", tegra_release=tmp_path / "release")


def jetson_facts(tmp_path, available_gib):
    from edgepaged.memory.probe import CudaDriver

    fake = CudaDriver(
        is_integrated=lambda _d: True, reserved_bytes=lambda _d: 0, device_name=lambda _d: "Orin", mem_get_info=None
    )
    return probe_device(load_profile("jetson-orin-nano-8gb"), "cuda", paths=meminfo_host(tmp_path, available_gib), cuda=fake)


def test_unified_budget_is_mem_available_less_the_os_reserve(tmp_path):
    profile = load_profile("jetson-orin-nano-8gb")  # fraction 0.75 of 8 GiB, 1.5 GiB reserved for the OS
    busy = plan(profile, jetson_facts(tmp_path, available_gib=5.0))
    assert (busy.budget_bytes, busy.budget_limited_by, busy.unified) == (int(3.5 * GIB), "memory available now", True)
    assert busy.kv_pool_bytes == int(1.5 * GIB)  # 3.5 - 1 - 0.5 - 0.25 - 0.25
    idle = plan(profile, jetson_facts(tmp_path, available_gib=7.9))
    assert (idle.budget_bytes, idle.budget_limited_by) == (6 * GIB, "fraction 0.75 of device memory")


def test_pool_rounds_down_to_whole_blocks(discrete):
    p = plan(discrete, DeviceFacts(10 * GIB, 9 * GIB, False, "card"), kv_bytes_per_token=1000)
    assert p.num_blocks == 3 * GIB // 16_000 == 201_326
    assert p.kv_pool_bytes == 201_326 * 16_000 < 3 * GIB


def test_max_kv_blocks_caps_the_pool_not_the_budget(discrete):
    facts = DeviceFacts(10 * GIB, 9 * GIB, False, "card")
    capped = plan(discrete, facts, max_kv_blocks=100)
    assert (capped.num_blocks, capped.kv_pool_bytes, capped.capped_by_max_kv_blocks) == (100, 100 * 16 * KV_PER_TOKEN, True)
    assert capped.budget_bytes == 5 * GIB and capped.max_seqs_at_max_len == 1 and capped.contiguous_max_seqs == 1
    assert "capped by max_kv_blocks" in capped.format_table()
    roomy = plan(discrete, facts, max_kv_blocks=10**9)
    assert (roomy.num_blocks, roomy.capped_by_max_kv_blocks) == (196_608, False)
    with pytest.raises(ValueError, match="max_kv_blocks must be at least 1"):
        plan(discrete, facts, max_kv_blocks=0)


def test_model_limit_shortens_max_model_len(discrete):
    p = plan(discrete, DeviceFacts(10 * GIB, 9 * GIB, False, "card"), max_model_len=512)
    assert p.max_model_len == 512 and p.contiguous_max_seqs == 6144 and p.max_seqs_at_max_len == 6144
    assert plan(discrete, DeviceFacts(10 * GIB, 9 * GIB, False, "card"), max_model_len=4096).max_model_len == 1024


def test_budget_too_small_for_the_weights_gives_the_numbers(discrete):
    with pytest.raises(MemoryPlanError) as info:
        plan(discrete, DeviceFacts(10 * GIB, 9 * GIB, False, "card"), weights_bytes=5 * GIB)
    message = str(info.value)
    assert "the budget of 5.00 GiB (limited by fraction 0.5 of device memory) cannot hold weights 5.00 GiB" in message
    assert "activations 512.0 MiB + runtime overhead 256.0 MiB + safety margin 256.0 MiB" in message
    assert "one KV block for each of 8 running sequences (8 x 16.0 KiB)" in message
    assert "= 6.00 GiB; short by 1.00 GiB" in message


def test_room_for_a_block_per_sequence_but_not_one_full_length_sequence(discrete):
    # Exactly the fixed costs plus 8 blocks: every sequence can start, but none can reach 1024 tokens.
    fixed = GIB + GIB // 2 + GIB // 4 + GIB // 4
    facts = DeviceFacts(10 * GIB, fixed + 8 * 16 * KV_PER_TOKEN, False, "card")
    with pytest.raises(MemoryPlanError, match="holds 128 tokens, less than one sequence of max_model_len 1,024 .*at most 128"):
        plan(discrete, facts)


def test_plan_reports_json_and_a_table(discrete):
    p = plan(discrete, DeviceFacts(10 * GIB, 9 * GIB, False, "card"))
    data = json.loads(json.dumps(p.to_json()))
    for key in ("budget_bytes", "weights_bytes", "activation_bytes", "overhead_bytes", "kv_pool_bytes", "num_blocks",
                "block_size", "kv_tokens", "max_seqs_at_max_len", "contiguous_max_seqs", "safety_margin_bytes",
                "kv_bytes_per_token", "max_model_len", "source"):
        assert data[key] == getattr(p, key)
    table = p.format_table()
    lines = dict(re.match(r"\s*(.+?)\s{2,}(.*)", line).groups() for line in table.splitlines())
    assert lines["budget"] == "5.00 GiB (limited by fraction 0.5 of device memory)"
    assert lines["KV pool"] == "3.00 GiB = 196,608 blocks x 16 tokens x 1,024 B/token"
    assert lines["contiguous cache"] == "3,072 seqs (each reserves max model len)"


def test_activation_estimate_counts_the_widest_layer_and_the_sampler_rows(tmp_path):
    profile = load_profile(
        profile_file(tmp_path, "rtx-4060-8gb", scheduler={"max_num_batched_tokens": 1024, "max_num_seqs": 8})
    )
    shape = SimpleNamespace(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=256)
    stream, mlp, logits = 2 * 1024 * 64 * 2, 3 * 1024 * 128 * 2, 8 * 256 * (2 + 8)  # float16; the MLP beats attention
    assert estimate_activation_bytes(shape, profile) == stream + mlp + logits


# -- scripts/bench_memory.py: arguments and the report (the run itself needs a GPU) --------------


@pytest.fixture(scope="module")
def bench():
    scripts = Path(__file__).resolve().parent.parent / "scripts"
    spec = importlib.util.spec_from_file_location("bench_memory", scripts / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module
    sys.path.insert(0, str(scripts))  # its sibling helpers, as when it runs from scripts/
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(scripts))
        del sys.modules["bench_memory"]


def test_bench_arguments(bench):
    args = bench.parse_args([])
    assert args.profiles == ["jetson-orin-nano-8gb", "rtx-4060-8gb", "h100-80gb"]
    assert (args.requests, tuple(args.prompt_len), tuple(args.output_len), args.backend) == (300, (32, 2048), (16, 512), "triton")
    args = bench.parse_args(["--profiles", "cpu", "--requests", "5", "--prompt-len", "4", "8"])
    assert (args.profiles, args.requests, args.prompt_len) == (["cpu"], 5, [4, 8])
    for bad in (["--prompt-len", "9", "3"], ["--output-len", "0", "4"], ["--requests", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_bench_requests_are_seeded_and_in_range(bench):
    work = bench.make_requests(50, (32, 2048), (16, 512), vocab=1000, seed=3)
    assert work == bench.make_requests(50, (32, 2048), (16, 512), vocab=1000, seed=3)
    assert work != bench.make_requests(50, (32, 2048), (16, 512), vocab=1000, seed=4)
    assert all(32 <= len(p) <= 2048 and 16 <= n <= 512 and all(0 <= t < 1000 for t in p) for p, n in work)


def test_bench_report_files(bench, tmp_path):
    ok = bench.ProfileResult(
        profile="jetson-orin-nano-8gb", emulated=True, budget_bytes=6 * GIB, kv_pool_bytes=5 * GIB, num_blocks=14_563,
        block_size=16, allocator_peak_bytes=5 * GIB, non_allocator_bytes=GIB // 2, measured_peak_bytes=5 * GIB + GIB // 2,
        max_concurrent_seqs=128, contiguous_max_seqs=27, peak_blocks_used=12_000, requests=300, finished_complete=300,
    )
    over = bench.ProfileResult(profile="rtx-4060-8gb", emulated=True, budget_bytes=GIB, measured_peak_bytes=2 * GIB, requests=300,
                               finished_complete=299)
    failed = bench.ProfileResult(profile="h100-80gb", emulated=False, error="RuntimeError: boom")
    meta = {"card": "NVIDIA H100 80GB HBM3", "card_memory_gib": 79.6, "date": "2026-11-26", "torch": "2.x",
            "command": "python scripts/bench_memory.py --requests 300", "model": "default", "backend": "triton",
            "requests": 300, "prompt_len": [32, 2048], "output_len": [16, 512], "seed": 0}
    md, js = bench.write_report([ok, over, failed], meta, tmp_path / "out")
    assert md.name == "memory-h100-80gb-hbm3-2026-11-26.md" and js.name == "memory-h100-80gb-hbm3-2026-11-26.json"
    text = md.read_text()
    assert "Command: `python scripts/bench_memory.py --requests 300`" in text
    assert "| jetson-orin-nano-8gb | yes | 6.00 GiB | 5.00 GiB | 14,563 x 16 | 5.50 GiB | yes | 128 | 27 | 4.7x | 300 / 300 |" in text
    assert "| rtx-4060-8gb | yes | 1.00 GiB |" in text and "| NO |" in text
    assert "| h100-80gb | | run failed: RuntimeError: boom |" in text
    data = json.loads(js.read_text())
    assert data["command"] == meta["command"]
    assert [(r["within_budget"], r["lost"]) for r in data["results"]] == [(True, 0), (False, 1), (False, 0)]
    assert data["results"][0]["contiguous_ratio"] == pytest.approx(128 / 27)
    assert data["results"][2]["contiguous_ratio"] is None


def test_card_slug(bench):
    assert bench.card_slug("NVIDIA GeForce RTX 4060") == "rtx-4060"
    assert bench.card_slug("NVIDIA H200") == "h200"
