"""systemd integration: sd_notify on a socket the test binds, the watchdog, the unit file, and
a real `edgepaged serve` process that reports READY=1, drains on SIGTERM and exits 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import typer
from wheel_build import built_wheel

from edgepaged.cli.serve import serve
from edgepaged.profiles import load_profile
from edgepaged.server import systemd

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


class NotifyListener:
    """Binds a datagram socket like systemd's and records every message sent to it."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def wait_for(self, line: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line in m.splitlines() for m in self.messages):
                return True
            time.sleep(0.05)
        return False

    def count(self, line: str) -> int:
        return sum(line in m.splitlines() for m in self.messages)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_reaches_the_socket(tmp_path, monkeypatch, abstract):
    address = f"@edgepaged-test-{os.getpid()}" if abstract else str(tmp_path / "notify.sock")
    listener = NotifyListener(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    try:
        assert systemd.notify_ready("serving tiny")
        assert systemd.notify_stopping("draining")
        assert listener.wait_for("STOPPING=1", 5)
        ready = listener.messages[0].splitlines()
        assert ready == ["READY=1", "STATUS=serving tiny", f"MAINPID={os.getpid()}"]
    finally:
        listener.close()


def test_notify_without_systemd_is_a_no_op(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize(
    "usec,pid,expected",
    [
        ("4000000", None, 2.0),
        ("4000000", "self", 2.0),
        ("4000000", "other", None),
        (None, None, None),
        ("0", None, None),
        ("garbage", None, None),
    ],
)
def test_watchdog_period(monkeypatch, usec, pid, expected):
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", {"self": str(os.getpid()), "other": "1"}.get(pid))):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert systemd.watchdog_period() == expected


def test_watchdog_pings_only_while_healthy(tmp_path, monkeypatch):
    address = str(tmp_path / "wd.sock")
    listener = NotifyListener(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    healthy = threading.Event()
    healthy.set()
    dog = systemd.Watchdog(0.02, healthy.is_set)
    dog.start()
    try:
        assert listener.wait_for("WATCHDOG=1", 5)
        healthy.clear()
        time.sleep(0.1)  # let a ping already in flight land
        before = listener.count("WATCHDOG=1")
        time.sleep(0.3)
        assert listener.count("WATCHDOG=1") == before
    finally:
        dog.stop()
        listener.close()


def test_memory_max_is_the_profile_budget_plus_overhead():
    cpu = load_profile("cpu")
    device = cpu.device.model_copy(update={"total_memory_gb": 16.0})

    def with_budget(**budget) -> str:
        profile = cpu.model_copy(update={"device": device, "budget": cpu.budget.model_copy(update=budget)})
        return systemd.memory_max(profile)

    overhead = systemd.RUNTIME_OVERHEAD_GIB
    assert with_budget(fraction=0.5, max_gb=3.0, os_reserve_gb=2.0) == f"{int((3 + overhead) * 1024)}M"  # the cap
    assert with_budget(fraction=0.5, max_gb=None, os_reserve_gb=10.0) == f"{int((6 + overhead) * 1024)}M"  # the reserve
    assert (
        with_budget(fraction=0.25, max_gb=None, os_reserve_gb=0.0) == f"{int((4 + overhead) * 1024)}M"
    )  # the fraction


# ---- deploy/ -------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_file_is_hardened_notify_service():
    unit = unit_settings((DEPLOY / "edgepaged.service").read_text())
    assert unit["Type"] == ["notify"] and unit["Restart"] == ["on-failure"]
    assert unit["WatchdogSec"] and unit["MemoryMax"] and unit["User"] == ["edgepaged"]
    for key, value in (
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
    ):
        assert unit[key] == [value], key
    assert unit["ExecStart"][0].split()[-1] == "serve"


def test_env_example_names_only_real_serve_options():
    app = typer.Typer()
    app.command()(serve)
    envvars = {p.envvar for p in typer.main.get_command(app).params}
    example = (DEPLOY / "edgepaged.env.example").read_text().splitlines()
    names = {line.split("=", 1)[0] for line in example if line and not line.startswith("#")}
    assert names and names <= envvars, names - envvars


def test_install_script_parses():
    subprocess.run(["bash", "-n", str(DEPLOY / "install.sh")], check=True, timeout=30)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(DEPLOY / "install.sh")], check=True, timeout=60)


# ---- deploy/install.sh into a temporary root, and the unit's ExecStart run from it ---------

# What systemd gives a service besides the unit's own settings (no inherited environment).
SYSTEMD_BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


@pytest.fixture(scope="module")
def staged(tmp_path_factory, tiny_model_dir) -> Path:
    """The service as install.sh stages it (non-editable, from the wheel), with the tiny model."""
    root = tmp_path_factory.mktemp("staged-root")
    result = subprocess.run(
        ["bash", str(DEPLOY / "install.sh"), "--root", str(root), "--package", str(built_wheel(tmp_path_factory)),
         "--model", str(tiny_model_dir), "--profile", "cpu", "--system-site-packages"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(package:" in result.stdout, "each step reports how long it took"
    return root


def in_root(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def test_install_stages_the_whole_service(staged, tiny_model_dir):
    unit_dir = in_root(staged, "/etc/systemd/system")
    unit = unit_settings((unit_dir / "edgepaged.service").read_text())
    assert unit == unit_settings((DEPLOY / "edgepaged.service").read_text())
    drop_in = unit_settings((unit_dir / "edgepaged.service.d" / "memory.conf").read_text())
    assert drop_in["MemoryMax"] == [systemd.memory_max(load_profile("cpu"))]
    env_file = in_root(staged, unit["EnvironmentFile"][0])
    assert env_file.stat().st_mode & 0o777 == 0o640
    settings = read_environment_file(env_file)
    assert settings["EDGEPAGED_MODEL"] == str(tiny_model_dir) and settings["EDGEPAGED_PROFILE"] == "cpu"
    assert (staged / "usr/lib/sysusers.d/edgepaged.conf").read_text().startswith("u edgepaged ")
    python = in_root(staged, unit["ExecStart"][0].split()[0])
    where = subprocess.run(
        [str(python), "-c", "import edgepaged.profiles as p; print(p.PROFILES_DIR)"],
        env={**SYSTEMD_BASE_ENV}, cwd=staged, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # cwd: `python -c` puts it first on the path, and the checkout's would win
    assert Path(where).is_relative_to(staged / "opt"), f"the service would run {where}, not the installed package"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_installed_unit_passes_systemd_analyze_verify(staged, tmp_path):
    # verify checks that ExecStart is executable, so it reads the staged interpreter's path;
    # the drop-in beside the unit is verified with it.
    installed = in_root(staged, "/etc/systemd/system")
    text = (installed / "edgepaged.service").read_text().replace("/opt/edgepaged/", f"{staged}/opt/edgepaged/")
    (tmp_path / "edgepaged.service").write_text(text)
    shutil.copytree(installed / "edgepaged.service.d", tmp_path / "edgepaged.service.d")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "edgepaged.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


def read_environment_file(path: Path) -> dict[str, str]:
    """systemd's EnvironmentFile= syntax, as far as the settings file uses it."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value for key, value in pairs}


def seconds(value: str) -> float:
    units = {"s": 1, "min": 60, "ms": 0.001}
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    return float(number) * units[value[len(number):] or "s"]


def test_installed_service_starts_answers_and_stops_as_the_unit_runs_it(staged, tmp_path):
    """ExecStart with the unit's environment and working directory, its paths under the staged
    root; runs as the test's user, since the unit's user exists only after a live install."""
    unit = unit_settings(in_root(staged, "/etc/systemd/system/edgepaged.service").read_text())
    env_file = in_root(staged, unit["EnvironmentFile"][0])
    port = _free_port()
    # What an administrator edits for this box: a free port, and a pool capped for a test.
    text = env_file.read_text().replace("EDGEPAGED_PORT=8000", f"EDGEPAGED_PORT={port}")
    env_file.write_text(text + "EDGEPAGED_MAX_KV_BLOCKS=256\n")
    owned = [in_root(staged, f"/var/lib/{unit['StateDirectory'][0]}"), in_root(staged, f"/var/cache/{unit['CacheDirectory'][0]}")]
    for directory in owned:  # StateDirectory= and CacheDirectory=, which systemd creates
        directory.mkdir(parents=True, exist_ok=True)

    def staged_path(value: str) -> str:
        return str(in_root(staged, value)) if value.startswith(("/var/lib/edgepaged", "/var/cache/edgepaged")) else value

    env = dict(SYSTEMD_BASE_ENV)
    for assignment in unit["Environment"]:
        key, value = assignment.split("=", 1)
        env[key] = staged_path(value)
    env.update(read_environment_file(env_file))
    address = str(tmp_path / "notify.sock")
    listener = NotifyListener(address)
    env["NOTIFY_SOCKET"] = address
    env["WATCHDOG_USEC"] = str(int(seconds(unit["WatchdogSec"][0]) * 1e6))
    argv = unit["ExecStart"][0].split()
    log = tmp_path / "journal.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(in_root(staged, argv[0])), *argv[1:]], env=env, cwd=staged_path(unit["WorkingDirectory"][0]),
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        if not listener.wait_for("READY=1", 240):
            proc.kill()
            pytest.fail(f"no READY=1; the journal:\n{log.read_text()}")
        assert listener.wait_for("WATCHDOG=1", 5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        served = client.models.list().data[0].id
        answer = client.chat.completions.create(
            model=served, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0
        )
        assert answer.usage.completion_tokens >= 1
        journal = log.read_text()
        # The start-up report: what runs, the memory plan with its KV pool, and where.
        for expected in ("model ", "profile cpu", "float32 weights", "torch backend", "memory plan:", "KV pool", f"http://127.0.0.1:{port}"):
            assert expected in journal, expected
        assert list(Path(env["EDGEPAGED_CACHE"]).glob("plans/*.json")), "the plan is kept in the unit's cache"

        stop_timeout = seconds(unit["TimeoutStopSec"][0])
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=stop_timeout) == 0
        assert time.monotonic() - started < stop_timeout
        assert listener.wait_for("STOPPING=1", 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()


# ---- a real serve process ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(url: str, result: dict) -> None:
    body = {
        "model": "tiny",
        "prompt": "drain me",
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        result["status"] = r.status_code
        for line in r.iter_lines():
            if line.startswith("data: "):
                result.setdefault("events", []).append(line.removeprefix("data: "))


def test_serve_process_notifies_and_drains_on_sigterm(tiny_model_dir, tmp_path):
    address = str(tmp_path / "notify.sock")
    listener = NotifyListener(address)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    cmd = [
        sys.executable,
        "-c",
        "import typer; from edgepaged.cli.serve import serve; typer.run(serve)",
        "--model",
        str(tiny_model_dir),
        "--served-model-name",
        "tiny",
        "--port",
        str(port),
        "--max-kv-blocks",
        "256",
        "--drain-timeout",
        "60",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if not listener.wait_for("READY=1", 180):
            proc.kill()
            pytest.fail(f"no READY=1; server output:\n{proc.communicate()[0]}")
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
        assert listener.wait_for("WATCHDOG=1", 5)

        results = [{} for _ in range(6)]
        threads = [threading.Thread(target=_stream, args=(url, r), daemon=True) for r in results]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while not all(r.get("events") for r in results):
            assert time.monotonic() < deadline, "streams did not start"
            time.sleep(0.01)

        proc.send_signal(signal.SIGTERM)
        assert listener.wait_for("STOPPING=1", 10)
        try:
            late = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "late"}, timeout=10)
            assert late.status_code == 503  # refused while draining, if the listener was still open
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            # Or the listener is closed (refused), or closed while this connection sat
            # in its backlog (reset before any request was read): either way nothing
            # was accepted, so nothing is lost.
            pass
        for t in threads:
            t.join(timeout=120)
        for r in results:
            assert r["status"] == 200 and r["events"][-1] == "[DONE]"
            assert json.loads(r["events"][-2])["usage"]["completion_tokens"] == 200, "a request was cut short"
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
