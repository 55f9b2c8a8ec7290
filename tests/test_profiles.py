"""Device profiles: the shipped files, every validation error, extends/overrides, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import save_file
from typer.testing import CliRunner

from edgepaged.cli.profile import app, checkpoint_bytes
from edgepaged.profiles import PROFILES_DIR, ProfileError, list_profiles, load_profile

SHIPPED = {
    "cpu",
    "jetson-orin-nano-4gb",
    "jetson-orin-nano-8gb",
    "jetson-orin-nano-8gb-3b-q4",  # an example: a 3B 4-bit model at 16K (tests/test_example_profile.py)
    "jetson-orin-nx-16gb",
    "jetson-agx-orin-32gb",
    "jetson-agx-orin-64gb",
    "jetson-thor",
    "rtx-3060-12gb",
    "rtx-4060-8gb",
    "rtx-4070-12gb",
    "rtx-4090-24gb",
    "rtx-5090-32gb",
    "h100-80gb",
    "h200-141gb",
}

# Bandwidths and capacities from the vendors' data sheets (DESIGN.md, "Numbers worth knowing").
FIGURES = {
    "jetson-orin-nano-8gb": (8, True, 68),
    "jetson-orin-nx-16gb": (16, True, 102.4),
    "jetson-agx-orin-64gb": (64, True, 204.8),
    "jetson-thor": (128, True, 273),
    "rtx-3060-12gb": (12, False, 360),
    "rtx-4060-8gb": (8, False, 272),
    "rtx-4090-24gb": (24, False, 1008),
    "rtx-5090-32gb": (32, False, 1792),
    "h100-80gb": (80, False, 3350),
    "h200-141gb": (141, False, 4800),
}


def write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_all_shipped_profiles_load_and_are_named_by_their_file():
    assert set(list_profiles()) == SHIPPED
    for name in SHIPPED:
        profile = load_profile(name)
        assert profile.name == name
        assert profile == load_profile(PROFILES_DIR / f"{name}.yaml")


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_shipped_figures_match_the_data_sheets(name):
    total, unified, bandwidth = FIGURES[name]
    device = load_profile(name).device
    assert (device.total_memory_gb, device.unified_memory, device.memory_bandwidth_gbps) == (total, unified, bandwidth)


def test_unified_profiles_reserve_memory_for_the_os_and_discrete_ones_do_not():
    for name in SHIPPED:
        p = load_profile(name)
        assert (p.budget.os_reserve_gb > 0) == p.device.unified_memory, name
        # Jetson profiles move to tensorrt once LLMEngine can run a TensorRT engine (issue 5).
        assert p.backend == ("torch" if name == "cpu" else "triton")


def test_cpu_profile_is_the_documented_dev_path():
    p = load_profile("cpu")
    assert (p.device.kind, p.model.dtype, p.backend, p.kv_cache.block_size) == ("cpu", "float32", "torch", 16)
    assert (p.scheduler.max_model_len, p.scheduler.max_num_seqs, p.scheduler.max_num_batched_tokens) == (8192, 32, 512)
    assert p.budget.max_gb is not None and p.budget.max_gb <= 8
    assert p.kv_dtype == "float32"


def test_profile_is_frozen_and_a_loaded_profile_passes_through():
    p = load_profile("rtx-4060-8gb")
    with pytest.raises(ValidationError):
        p.backend = "torch"
    assert load_profile(p) is p


# (yaml overrides on top of a shipped profile, dotted key, phrase the message must contain)
BAD = [
    ({"colour": "red"}, "colour", "unknown key; expected one of: extends, name"),
    ({"kv_cache": {"block_sise": 16}}, "kv_cache.block_sise", "expected one of: block_size, dtype"),
    ({"scheduler": {"max_num_seqs": "16"}}, "scheduler.max_num_seqs", "expected a valid integer, got '16'"),
    ({"scheduler": {"enable_prefix_caching": "yes"}}, "scheduler.enable_prefix_caching", "valid boolean"),
    ({"scheduler": {"overlap_steps": 1}}, "scheduler.overlap_steps", "valid boolean"),
    ({"scheduler": {"max_model_len": 0}}, "scheduler.max_model_len", "greater than 0"),
    ({"budget": {"fraction": 0}}, "budget.fraction", "expected greater than 0, got 0"),
    ({"budget": {"fraction": 1.5}}, "budget.fraction", "less than or equal to 1, got 1.5"),
    ({"budget": {"max_gb": 9.0}}, "budget.max_gb", "at most device.total_memory_gb (8), got 9"),
    ({"budget": {"os_reserve_gb": -1.0}}, "budget.os_reserve_gb", "greater than or equal to 0"),
    ({"budget": {"os_reserve_gb": 8.0}}, "budget.os_reserve_gb", "less than device.total_memory_gb (8), got 8"),
    ({"budget": {"safety_margin_gb": 6.0}}, "budget.safety_margin_gb", "less than the budget it is taken from (6 GiB"),
    ({"kv_cache": {"block_size": 12}}, "kv_cache.block_size", "power of two"),
    ({"kv_cache": {"block_size": 0}}, "kv_cache.block_size", "greater than 0"),
    ({"kv_cache": {"dtype": "float8"}}, "kv_cache.dtype", "'bfloat16', 'int8' or 'fp8_e4m3', got 'float8'"),
    ({"model": {"dtype": "int4"}}, "model.dtype", "'float32', 'float16' or 'bfloat16', got 'int4'"),
    ({"device": {"kind": "tpu"}}, "device.kind", "expected 'cpu' or 'cuda', got 'tpu'"),
    ({"device": {"total_memory_gb": -8}}, "device.total_memory_gb", "greater than 0"),
    ({"device": {"kind": "cpu"}}, "backend", "'torch' on a cpu device"),
    ({"backend": "vulkan"}, "backend", "'torch', 'triton' or 'tensorrt'"),
    ({"budget": 5}, "budget", "expected a mapping of keys, got 5"),
    ({"scheduler": {"max_num_batched_tokens": 64}}, "scheduler.max_num_batched_tokens", "at least scheduler.max_num_seqs (128)"),
    ({"scheduler": {"max_waiting_tokens": 100}}, "scheduler.max_waiting_tokens", "at least scheduler.max_model_len (8192)"),
    ({"name": ""}, "name", "expected a string with at least 1 character, got ''"),
]


@pytest.mark.parametrize("overrides, key, phrase", BAD, ids=[case[1] for case in BAD])
def test_each_invalid_value_names_file_key_and_expectation(tmp_path, overrides, key, phrase):
    path = write(tmp_path / "bad.yaml", {"extends": "jetson-orin-nano-8gb", **overrides})
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert f"{path}: {key}: " in message
    assert phrase in message


@pytest.mark.parametrize(
    "base, overrides, key, phrase",
    [
        ("rtx-4060-8gb", {"budget": {"os_reserve_gb": 1.0}}, "budget.os_reserve_gb", "0 on a device without unified memory"),
        ("cpu", {"device": {"unified_memory": False}}, "device.unified_memory", "true for a cpu device"),
    ],
)
def test_contradictions_between_keys_are_rejected(tmp_path, base, overrides, key, phrase):
    path = write(tmp_path / "bad.yaml", {"extends": base, **overrides})
    with pytest.raises(ProfileError, match=rf"{path}: {key}: expected {phrase}"):
        load_profile(str(path))


def test_missing_required_keys_are_each_reported(tmp_path):
    path = write(tmp_path / "thin.yaml", {"name": "thin", "backend": "torch"})
    message = str(pytest.raises(ProfileError, load_profile, str(path)).value)
    for key in ("device", "budget", "model", "scheduler"):
        assert f"{path}: {key}: expected a value (this key is required)" in message
    assert "backend:" not in message


@pytest.mark.parametrize(
    "text, phrase",
    [
        ("device: [unclosed\n", "expected valid YAML"),
        ("- a\n- b\n", "expected a mapping of keys at the top level, got list"),
        ("extends: 7\n", "extends: expected a shipped profile name or a path, got 7"),
        ("extends: no-such-box\n", "extends: no-such-box: no such profile file, and not a shipped profile name"),
    ],
)
def test_file_level_errors_name_the_file(tmp_path, text, phrase):
    path = write(tmp_path / "broken.yaml", text)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    assert str(info.value).startswith(f"{path}: ")
    assert phrase in str(info.value)


def test_unknown_name_lists_the_shipped_profiles():
    with pytest.raises(ProfileError, match="no-such-box: no such profile file.*jetson-orin-nano-8gb"):
        load_profile("no-such-box")


def test_extends_cycle_is_rejected(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ProfileError, match=r"extends: expected no cycle, got .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_profile(str(tmp_path / "a.yaml"))


def test_extends_deep_merges_overrides_and_names_the_profile_by_its_file(tmp_path):
    path = write(tmp_path / "my-nano.yaml", {"extends": "jetson-orin-nano-8gb", "budget": {"os_reserve_gb": 2.5}})
    base, mine = load_profile("jetson-orin-nano-8gb"), load_profile(str(path))
    assert mine.name == "my-nano"
    assert mine.budget.os_reserve_gb == 2.5
    assert mine.budget.fraction == base.budget.fraction  # sibling keys of an override survive
    assert mine.scheduler == base.scheduler and mine.device == base.device


def test_extends_chains_through_relative_paths(tmp_path):
    (tmp_path / "site").mkdir()
    write(tmp_path / "site" / "base.yaml", {"extends": "rtx-4090-24gb", "name": "site-base", "scheduler": {"max_num_seqs": 64}})
    path = write(tmp_path / "box.yaml", {"extends": "site/base.yaml", "name": "box-7", "kv_cache": {"block_size": 32}})
    p = load_profile(str(path))
    assert (p.name, p.scheduler.max_num_seqs, p.kv_cache.block_size) == ("box-7", 64, 32)
    assert p.device.memory_bandwidth_gbps == 1008
    assert p.scheduler.max_model_len == load_profile("rtx-4090-24gb").scheduler.max_model_len


def test_overlap_steps_reaches_the_engine_config(tmp_path):
    from edgepaged.engine import config_from_profile

    assert config_from_profile(load_profile("cpu")).overlap_steps is False
    path = write(tmp_path / "o.yaml", {"extends": "cpu", "name": "cpu-overlap", "scheduler": {"overlap_steps": True}})
    assert config_from_profile(load_profile(str(path))).overlap_steps is True


def test_a_standalone_file_needs_no_extends(tmp_path):
    data = yaml.safe_load((PROFILES_DIR / "rtx-3060-12gb.yaml").read_text())
    data.update(name="standalone", kv_cache={"block_size": 8, "dtype": "float32"})
    p = load_profile(str(write(tmp_path / "s.yaml", data)))
    assert (p.name, p.kv_cache.block_size, p.kv_dtype, p.model.dtype) == ("standalone", 8, "float32", "float16")


# -- CLI ----------------------------------------------------------------------------------------

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    """A two-layer Llama folder: config.json plus one float32 safetensors file."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    h, i, kv = 64, 128, 2 * 16
    tensors = {"model.embed_tokens.weight": torch.zeros(256, h), "model.norm.weight": torch.ones(h)}
    for layer in range(2):
        pre = f"model.layers.{layer}."
        tensors |= {
            pre + "self_attn.q_proj.weight": torch.zeros(h, h),
            pre + "self_attn.k_proj.weight": torch.zeros(kv, h),
            pre + "self_attn.v_proj.weight": torch.zeros(kv, h),
            pre + "self_attn.o_proj.weight": torch.zeros(h, h),
            pre + "mlp.gate_proj.weight": torch.zeros(i, h),
            pre + "mlp.up_proj.weight": torch.zeros(i, h),
            pre + "mlp.down_proj.weight": torch.zeros(h, i),
            pre + "input_layernorm.weight": torch.ones(h),
            pre + "post_attention_layernorm.weight": torch.ones(h),
        }
    tensors["position_ids"] = torch.arange(512)  # an integer buffer: not a weight
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def tiny_params() -> int:
    h, i, kv = 64, 128, 32
    layer = 2 * h * h + 2 * kv * h + 3 * i * h + 2 * h
    return 256 * h + h + 2 * layer


def test_checkpoint_bytes_counts_float_tensors_at_the_target_width(tiny_model):
    assert checkpoint_bytes(tiny_model, 2) == tiny_params() * 2
    assert checkpoint_bytes(tiny_model, 4) == tiny_params() * 4


def test_cli_list_names_every_shipped_profile():
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.stdout.splitlines()}
    assert listed == SHIPPED


def test_cli_validate_accepts_a_good_file_and_reports_a_bad_one(tmp_path):
    good = write(tmp_path / "good.yaml", {"extends": "rtx-4060-8gb", "scheduler": {"max_num_seqs": 64}})
    result = CliRunner().invoke(app, ["validate", str(good)])
    assert result.exit_code == 0 and "ok (profile good" in result.stdout

    bad = write(tmp_path / "bad.yaml", {"extends": "rtx-4060-8gb", "kv_cache": {"block_size": 24}})
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: kv_cache.block_size: expected a power of two" in result.stderr


def test_cli_show_json_plans_a_gpu_profile_from_its_figures(tiny_model):
    # No machine the suite runs on (CPU, H100, H200) has a 4 GB Orin Nano, so this is always the figures path.
    result = CliRunner().invoke(app, ["show", "jetson-orin-nano-4gb", "--model", str(tiny_model), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["source"] == "profile figures (no such device here)"
    assert plan["weights_bytes"] == tiny_params() * 2  # float16
    assert plan["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    assert plan["budget_bytes"] == int(0.7 * 4 * 2**30)
    assert plan["max_model_len"] == 512  # the model's own limit, below the profile's 4096
    pool = plan["budget_bytes"] - plan["weights_bytes"] - plan["activation_bytes"] - plan["overhead_bytes"] - plan["safety_margin_bytes"]
    assert plan["num_blocks"] == pool // (16 * plan["kv_bytes_per_token"])
    assert plan["kv_tokens"] == plan["num_blocks"] * 16
    assert plan["contiguous_max_seqs"] == plan["kv_pool_bytes"] // (512 * plan["kv_bytes_per_token"])
    assert any("analytic estimate" in note for note in plan["notes"])


def test_cli_show_table_says_the_figures_are_not_measured(tiny_model):
    result = CliRunner().invoke(app, ["show", "jetson-orin-nano-4gb", "--model", str(tiny_model)])
    assert result.exit_code == 0, result.output
    assert "profile figures (no such device here)" in result.stdout
    assert "note: activations are an analytic estimate" in result.stdout
    assert "KV pool" in result.stdout and "contiguous cache" in result.stdout


def test_cli_show_reports_a_budget_that_cannot_hold_the_model(tmp_path, tiny_model):
    greedy = write(
        tmp_path / "greedy.yaml",
        {"extends": "jetson-orin-nano-4gb", "scheduler": {"max_num_batched_tokens": 20_000_000}},
    )
    result = CliRunner().invoke(app, ["show", str(greedy), "--model", str(tiny_model)])
    assert result.exit_code == 1
    assert "the budget of 2.80 GiB (limited by fraction 0.7 of device memory) cannot hold" in result.stderr
    assert "short by" in result.stderr


def test_cli_show_rejects_an_invalid_profile(tmp_path):
    bad = write(tmp_path / "bad.yaml", {"extends": "h100-80gb", "backend": "cuda"})
    result = CliRunner().invoke(app, ["show", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: backend: expected 'torch', 'triton' or 'tensorrt', got 'cuda'" in result.stderr
