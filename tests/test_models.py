"""Model loading: what loads, and the clear errors for what does not."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgepaged import ModelLoadError
from edgepaged.cli import app
from edgepaged.models.config import ModelConfig
from edgepaged.models.loader import resolve_model
from edgepaged.models.random_init import write_random_model


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*not supported"):
        ModelConfig.from_folder(tmp_path)


def test_unsupported_rope_scaling_is_named(tmp_path):
    folder = write_random_model(tmp_path / "m", vocab_size=64)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="'dynamic' is not supported"):
        ModelConfig.from_folder(folder)


@pytest.mark.parametrize("path, match", [("/no/such/model", "does not exist"), ("README.md", "not a .gguf")])
def test_bad_model_paths(path, match):
    with pytest.raises(ModelLoadError, match=match):
        resolve_model(path)


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model(tmp_path)
    folder = write_random_model(tmp_path / "m", vocab_size=64)
    (folder / "model.safetensors").unlink()
    from conftest import make_engine

    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        make_engine(folder)


def test_checkpoint_that_does_not_fit_the_config(tmp_path):
    folder = write_random_model(tmp_path / "m", vocab_size=64)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    from conftest import make_engine

    with pytest.raises(ModelLoadError, match="does not fit the config"):
        make_engine(folder)


def test_cli_generate_streams_an_answer(tiny_model_dir):
    result = CliRunner().invoke(app, ["generate", "Hello", "--model", str(tiny_model_dir), "--max-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.output.strip()
    bad = CliRunner().invoke(app, ["generate", "", "--model", str(tiny_model_dir)])
    assert bad.exit_code == 2 and "empty" in bad.output
    bad = CliRunner().invoke(app, ["generate", "hi", "--model", str(tiny_model_dir), "--temperature", "-1"])
    assert bad.exit_code == 2 and "temperature" in bad.output


@pytest.mark.parametrize("rotary_dim", [16, 12])
def test_rope_with_the_signed_sin_is_transformers_rotate_half(rotary_dim):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), over the leading rotary_dim
    dims of each head (12 of 16: partial rotary passes the rest through)."""
    import torch

    from edgepaged.models.llama import apply_rope, signed_sin
    from edgepaged.models.rope import rope_tables

    cos_t, sin_t = rope_tables(rotary_dim, 10000.0, None, 64, "cpu")
    positions = torch.tensor([0, 5, 63])
    cos, sin = cos_t[positions].unsqueeze(1), sin_t[positions].unsqueeze(1)
    x = torch.randn(3, 4, 16)
    r, half = x[..., :rotary_dim], rotary_dim // 2
    rotated = torch.cat((-r[..., half:], r[..., :half]), dim=-1)
    want = torch.cat((r * cos + rotated * sin, x[..., rotary_dim:]), dim=-1)
    got = apply_rope(x, cos, signed_sin(sin))
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])
