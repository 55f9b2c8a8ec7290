"""The one-shot CLI as a user meets it: a light `--help`, one-line errors, a KV pool sized to
the job, the plan measured once, the raw-prompt note, device-fitting advice, and `rag ask` /
`rag chat` streaming locally and from a running server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_server import LiveServer, live_server
from typer.testing import CliRunner
from wheel_build import clean_env

from edgepaged.cli import app
from edgepaged.cli import rag as rag_cli
from edgepaged.cli.build import tensorrt_advice
from edgepaged.cli.device import profile_here
from edgepaged.engine import LLMEngine
from edgepaged.errors import RequestError
from edgepaged.llm import engine_for_job
from edgepaged.memory.probe import probe_device
from edgepaged.models.loader import (
    _default_gguf,
    _file_key,
    convert_gguf,
    load_tokenizer,
    resolve_model,
)
from edgepaged.profiles import load_profile
from edgepaged.rag import ChunkOrder, Embedder, RagStore, index_directory
from edgepaged.rag.pipeline import DEFAULT_SPECULATIVE
from edgepaged.sampling import MAX_SPECULATIVE
from edgepaged.rag.store import DEFAULT_MAX_FILE_BYTES
from edgepaged.sampling import SamplingParams
from edgepaged.server import open_rag
from edgepaged.server.async_engine import AdmissionLimits

CORPUS = Path(__file__).parent / "fixtures" / "rag_corpus"
QUESTION = "Who was the first keeper of the lighthouse?"


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgepaged", *args], capture_output=True, text=True, timeout=300, check=False, env=clean_env(**env)
    )


def test_help_and_version_load_neither_torch_nor_transformers():
    probe = "import sys, edgepaged.cli; print(sorted({'torch', 'transformers', 'numpy'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "[]"
    version = CliRunner().invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"edgepaged {__import__('edgepaged').__version__}"


def test_an_expected_error_is_one_line_with_exit_status_2(tmp_path):
    result = run_cli("profile", "show", "cpu", "--model", str(tmp_path / "missing"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: model path '{tmp_path / 'missing'}' does not exist (give a model folder or a .gguf file)"]


def test_the_rag_cli_spells_the_library_values():
    assert typing.get_args(rag_cli.Order) == tuple(o.value for o in ChunkOrder)
    assert rag_cli.MAX_FILE_MB * 2**20 == DEFAULT_MAX_FILE_BYTES
    assert rag_cli.SPECULATIVE == DEFAULT_SPECULATIVE
    assert rag_cli.MAX_SPECULATIVE == MAX_SPECULATIVE


@pytest.fixture()
def plan_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGEPAGED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "plans"


def test_a_one_shot_pool_holds_the_job_and_the_plan_is_measured_once(tiny_model_dir, plan_cache, monkeypatch):
    engine = engine_for_job(str(tiny_model_dir), "cpu", max_request_tokens=100)
    assert engine.kv.pool.num_blocks == 7 and engine.memory_plan.capped_by_max_kv_blocks  # ceil(100 / 16)
    assert engine.max_model_len == 100 and engine.config.max_num_seqs == 1
    with pytest.raises(RequestError, match="context holds 100"):
        engine.add_request("long", list(range(1, 101)), SamplingParams(max_tokens=1))
    (kept,) = plan_cache.glob("*.json")

    def measure(*args):
        raise AssertionError("a second start with the same model, profile and limits ran the profile step")

    monkeypatch.setattr("edgepaged.planning.measure_activation_and_overhead", measure)
    again = engine_for_job(str(tiny_model_dir), "cpu", max_request_tokens=100)
    assert again.memory_plan.activation_bytes == engine.memory_plan.activation_bytes
    assert again.memory_plan.overhead_bytes == engine.memory_plan.overhead_bytes
    record = json.loads(kept.read_text())
    assert record["key"]["engine"]["max_model_len"] == 100 and record["key"]["profile"]["name"] == "cpu"
    with pytest.raises(AssertionError, match="profile step"):  # other limits: another key, measured anew
        engine_for_job(str(tiny_model_dir), "cpu", max_request_tokens=200)


def test_an_unreadable_plan_file_is_measured_again(tiny_model_dir, plan_cache):
    engine_for_job(str(tiny_model_dir), "cpu", max_request_tokens=64)
    (kept,) = plan_cache.glob("*.json")
    kept.write_text("{not json")
    engine_for_job(str(tiny_model_dir), "cpu", max_request_tokens=64)
    assert json.loads(kept.read_text())["activation_bytes"] > 0


def test_generate_notes_a_raw_prompt_that_ends_at_once(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "eos-first")
    prompt = "The capital of France is"
    ids = load_tokenizer(model)(prompt, add_special_tokens=True).input_ids
    engine = LLMEngine.from_model(str(model), "cpu", max_kv_blocks=8)
    engine.add_request("probe", ids, SamplingParams(max_tokens=1, temperature=0))
    first = engine.run_to_completion(["probe"])["probe"].outputs[0].token_ids[0]
    # Make the greedy first token the model's end-of-sequence.
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": first}))
    result = CliRunner().invoke(app, ["generate", prompt, "--no-chat", "--model", str(model), "--max-tokens", "4"])
    assert result.exit_code == 0, result.output
    # (The token is an ordinary one here, so its text shows; a real end-of-sequence is special.)
    assert "first token was end-of-sequence" in result.stderr
    chat = CliRunner().invoke(app, ["generate", prompt, "--model", str(model), "--max-tokens", "4"])
    assert "end-of-sequence" not in chat.stderr  # a chat answer may end at once for its own reasons


def test_the_default_gguf_given_by_path_is_not_converted_again(tmp_path, monkeypatch):
    gguf = _default_gguf()
    assert resolve_model(str(gguf)) == resolve_model(None)
    # Any copy of a converted file is known by its content.
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(b"\0" * 4096)
    monkeypatch.setenv("EDGEPAGED_CACHE", str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "models" / f"first-name-{_file_key(copy)}"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert convert_gguf(copy) == converted


def test_build_advice_fits_the_profile_device():
    jetson = tensorrt_advice(load_profile("jetson-orin-nano-8gb"))
    assert "JetPack" in jetson and "pip install" not in jetson and "--backend triton" in jetson
    desktop = tensorrt_advice(load_profile("rtx-4090-24gb"))
    assert 'pip install "tensorrt>=' in desktop and "JetPack" not in desktop


def test_emulate_plans_from_the_profile_and_a_foreign_device_is_warned_about(monkeypatch):
    heard: list[str] = []
    emulated = profile_here("jetson-orin-nano-8gb", True, heard.append)
    assert emulated.device.emulate and not heard
    facts = probe_device(emulated, torch.device("cpu"))
    assert facts.total_bytes == 8 * 2**30 and facts.source.startswith("emulated from profile jetson-orin-nano-8gb")
    # An 80 GB card running the Orin Nano's profile, as the H200 did in the issue.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (79 * 2**30, 80 * 2**30))
    monkeypatch.setattr("edgepaged.memory.probe.device_matches", lambda profile: False)
    profile_here("jetson-orin-nano-8gb", False, heard.append)
    (warning,) = heard
    assert "8 GiB of unified memory" in warning and "NVIDIA H100 80GB HBM3 with 80.0 GiB" in warning
    assert "--emulate" in warning


# ---- rag ask / rag chat ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def index_db(tmp_path_factory, tiny_model_dir) -> Path:
    db = tmp_path_factory.mktemp("rag-cli") / "corpus.db"
    store = RagStore(db, create=True)
    try:
        index_directory(store, CORPUS, Embedder(), load_tokenizer(tiny_model_dir), chunk_tokens=64, overlap=8)
    finally:
        store.close()
    return db


def local_args(db: Path, model: Path) -> list[str]:
    return ["--db", str(db), "--model", str(model), "--top-k", "2", "--max-tokens", "6"]


def test_rag_ask_streams_the_answer_then_the_sources(index_db, tiny_model_dir):
    result = CliRunner().invoke(app, ["rag", "ask", QUESTION, *local_args(index_db, tiny_model_dir)])
    assert result.exit_code == 0, result.output
    answer, sources = result.stdout.split("\n\nSources:\n")
    assert answer.strip() and "lighthouse.html" in sources.splitlines()[0]


def test_rag_chat_loads_the_models_once_for_every_question(index_db, tiny_model_dir, monkeypatch):
    built = []
    real = rag_cli.LocalAnswerer.load

    def counting(self, *args):
        built.append(args)
        real(self, *args)

    monkeypatch.setattr(rag_cli.LocalAnswerer, "load", counting)
    questions = f"{QUESTION}\nWhat is the capital of Mongolia?\n\nWhat is the bakery's sourdough starter called?\n"
    result = CliRunner().invoke(app, ["rag", "chat", *local_args(index_db, tiny_model_dir)], input=questions)
    assert result.exit_code == 0, result.output
    assert len(built) == 1
    assert result.stdout.count("Sources:") == 2  # the question no passage is relevant to is told on stderr
    assert "no indexed chunk is relevant to 'What is the capital of Mongolia?'" in result.stderr


@pytest.fixture(scope="module")
def rag_server(tiny_model_dir, index_db) -> Iterator[LiveServer]:
    engine = LLMEngine.from_model(str(tiny_model_dir), "cpu", max_kv_blocks=256)
    collections = open_rag(engine, {"docs": index_db}, (), Embedder())
    with live_server(engine, AdmissionLimits(64, 1 << 20), rag=collections) as server:
        yield server


def test_rag_ask_server_answers_as_the_local_command(rag_server, index_db, tiny_model_dir):
    local = CliRunner().invoke(app, ["rag", "ask", QUESTION, "--json", *local_args(index_db, tiny_model_dir)])
    remote = CliRunner().invoke(
        app, ["rag", "ask", QUESTION, "--json", "--server", rag_server.url, "--collection", "docs", "--top-k", "2", "--max-tokens", "6"]
    )
    assert local.exit_code == 0 and remote.exit_code == 0, local.output + remote.output
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    streamed = CliRunner().invoke(app, ["rag", "ask", QUESTION, "--server", rag_server.url, "--collection", "docs"])
    assert streamed.exit_code == 0 and "Sources:\n  [1] lighthouse.html" in streamed.stdout
    missing = CliRunner().invoke(app, ["rag", "ask", QUESTION, "--server", rag_server.url, "--collection", "nope"])
    assert missing.exit_code == 1 and "404" in missing.stderr and "docs" in missing.stderr


def test_rag_chat_reads_every_question_from_stdin_through_the_server(rag_server):
    args = ["rag", "chat", "--server", rag_server.url, "--collection", "docs", "--top-k", "1", "--max-tokens", "3"]
    result = CliRunner().invoke(app, args, input=f"{QUESTION}\n{QUESTION}\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Sources:\n  [1] lighthouse.html") == 2
