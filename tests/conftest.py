"""Shared fixtures for live tests: a real vLLM server and real Pipelines servers.

tests/run builds the venvs, the tiny model and the encoder folder, and passes
their paths in SLR_VLLM_PYTHON, SLR_TINY_MODEL_DIR and SLR_ENCODER_DIR. Run
outside tests/run without them, the fixtures that need them skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
from livechat import get_valves, live_valves_env, update_valves

from servers import (
    RUNNING,
    PipelinesServer,
    StartPipelinesServer,
    VLLMServer,
    start_pipelines,
    start_vllm,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGIN_PATH = REPO_ROOT / "pipelines" / "semantic_lora_router.py"

# Lines for the terminal summary, filled when vllm_server stops.
VLLM_SUMMARY: list[str] = []


def _folder_from_env(variable: str, what: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        pytest.skip(
            f"{variable} is not set: run the tests with tests/run, which builds {what}"
        )
    path = Path(value)
    if not path.is_dir():
        pytest.skip(
            f"{variable}={value} is not a folder: run tests/run to rebuild {what}"
        )
    return path


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Folder with base/, doctor/ and dcot/ from tests/fixtures/make_tiny_model.py."""
    return _folder_from_env("SLR_TINY_MODEL_DIR", "the tiny model")


@pytest.fixture(scope="session")
def encoder_dir() -> Path:
    """Folder with an int8 ONNX all-MiniLM-L6-v2 and its tokenizer files, for
    fastembed's `specific_model_path`."""
    return _folder_from_env("SLR_ENCODER_DIR", "the encoder folder")


@pytest.fixture(scope="session")
def vllm_python() -> str:
    python = os.environ.get("SLR_VLLM_PYTHON")
    if not python or not Path(python).is_file():
        pytest.skip(
            "SLR_VLLM_PYTHON is not set: run the tests with tests/run, which builds the vLLM venv"
        )
    return python


@pytest.fixture(scope="session")
def vllm_server(
    tiny_model_dir: Path, vllm_python: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMServer]:
    """vLLM serving `tiny-base` with the LoRA adapters `doctor` and `dcot`,
    started once per test session (about 20-40 s on 2 cores)."""
    log_dir = tmp_path_factory.mktemp("vllm")
    server = start_vllm(tiny_model_dir, log_dir, python=vllm_python)
    yield server
    rss_mib = server.rss_bytes() / 2**20
    server.stop()
    VLLM_SUMMARY.append(
        f"vLLM: healthy after {server.startup_seconds:.1f} s, "
        f"{rss_mib:.0f} MiB RSS with its child processes at teardown"
    )


@pytest.fixture
def start_pipelines_server(
    tmp_path: Path,
) -> Iterator[StartPipelinesServer]:
    """Factory that starts a real Pipelines server on a copy of the plugin.

    `start_pipelines_server(valves_env)` copies pipelines/semantic_lora_router.py
    into a new PIPELINES_DIR, starts the server with a random API key and
    `valves_env` in its environment, and returns the running server. Pass
    `plugin_path=` to load another file. Every server is stopped at teardown.
    Raises ServerStartError with the log tail if the server does not become
    healthy or could not load the plugin.
    """
    started: list[PipelinesServer] = []

    def start(
        valves_env: Mapping[str, str] | None = None,
        *,
        plugin_path: Path = PLUGIN_PATH,
        api_key: str | None = None,
    ) -> PipelinesServer:
        if not plugin_path.is_file():
            pytest.fail(f"plugin not found at {plugin_path}")
        pipelines_dir = tmp_path / f"pipelines-{len(started)}"
        pipelines_dir.mkdir()
        shutil.copy(plugin_path, pipelines_dir / plugin_path.name)

        server = start_pipelines(pipelines_dir, valves_env, api_key=api_key)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the log tail of every running server to a failed test's report."""
    report = yield
    if report.failed:
        for server in RUNNING:
            report.sections.append(
                (f"{server.name} log tail ({server.log_path})", server.log_tail(40))
            )
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print vLLM's startup time and memory, to watch them across CI runs."""
    for line in VLLM_SUMMARY:
        terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def pipelines(
    vllm_server: VLLMServer, encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PipelinesServer]:
    """One Pipelines server with the plugin, pointed at vllm_server, per module.

    Its valves are the test encoder with ROUTER_SCORE_THRESHOLD 0.4; a test that
    changes them uses `restore_valves`.
    """
    pipelines_dir = tmp_path_factory.mktemp("pipelines")
    shutil.copy(PLUGIN_PATH, pipelines_dir / PLUGIN_PATH.name)
    server = start_pipelines(
        pipelines_dir, live_valves_env(vllm_server.api_base, encoder_dir)
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def base_name(vllm_server: VLLMServer) -> str:
    """vLLM's name for the base model, as /v1/models lists it."""
    models = requests.get(f"{vllm_server.api_base}/models", timeout=10).json()["data"]
    return next(str(m["id"]) for m in models if not m.get("parent"))


@pytest.fixture
def restore_valves(pipelines: PipelinesServer) -> Iterator[dict[str, Any]]:
    """Yield the current valves and put them back after the test."""
    saved = get_valves(pipelines)
    yield saved
    response = update_valves(pipelines, saved)
    assert response.status_code == 200, response.text
