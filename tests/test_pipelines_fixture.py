"""Prove the start_pipelines_server fixture on a stand-in plugin, so that a
failure of the fixture is not mistaken for a failure of the real plugin."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
import requests

from servers import PipelinesServer, ServerStartError, StartPipelinesServer

STUB_PLUGIN = '''"""
title: Stub manifold
requirements: pyyaml, requests
"""

import os

from pydantic import BaseModel


class Pipeline:
    class Valves(BaseModel):
        GREETING: str = os.getenv("GREETING", "hello")

    def __init__(self):
        self.type = "manifold"
        self.name = "Stub: "
        self.valves = self.Valves()
        self.pipelines = [{"id": "echo", "name": "Echo"}]

    def pipe(self, user_message, model_id, messages, body):
        return f"{self.valves.GREETING} {user_message} via {model_id}"
'''

BROKEN_PLUGIN = '''"""
title: Broken
requirements: package-that-is-not-installed-anywhere==0.0.1
"""

class Pipeline:
    pass
'''


@pytest.fixture
def stub_plugin(tmp_path: Path) -> Path:
    path = tmp_path / "stub_manifold.py"
    path.write_text(STUB_PLUGIN, encoding="utf-8")
    return path


def make_client(server: PipelinesServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.api_base, api_key=server.api_key, max_retries=0, timeout=30
    )


def test_stub_manifold_answers_chat(
    start_pipelines_server: StartPipelinesServer, stub_plugin: Path
) -> None:
    server = start_pipelines_server({"GREETING": "hi"}, plugin_path=stub_plugin)
    client = make_client(server)

    model_ids = [model.id for model in client.models.list()]
    response = client.chat.completions.create(
        model="stub_manifold.echo",
        messages=[{"role": "user", "content": "there"}],
        stream=False,
    )

    assert model_ids == ["stub_manifold.echo"]
    assert response.choices[0].message.content == "hi there via echo"


def test_wrong_api_key_is_rejected(
    start_pipelines_server: StartPipelinesServer, stub_plugin: Path
) -> None:
    server = start_pipelines_server(plugin_path=stub_plugin)

    response = requests.get(
        server.api_base + "/models",
        headers={"Authorization": "Bearer wrong-key"},
        timeout=10,
    )

    assert response.status_code == 401


def test_restart_keeps_port_and_saved_valves(
    start_pipelines_server: StartPipelinesServer, stub_plugin: Path
) -> None:
    server = start_pipelines_server(plugin_path=stub_plugin)
    port = server.port
    update = requests.post(
        f"{server.base_url}/stub_manifold/valves/update",
        headers=server.auth_headers(),
        json={"GREETING": "saved"},
        timeout=10,
    )
    assert update.status_code == 200

    server.restart()
    response = make_client(server).chat.completions.create(
        model="stub_manifold.echo",
        messages=[{"role": "user", "content": "again"}],
        stream=False,
    )

    assert server.port == port
    assert response.choices[0].message.content == "saved again via echo"


def test_satisfied_requirements_install_offline(
    start_pipelines_server: StartPipelinesServer, stub_plugin: Path
) -> None:
    """The server runs pip for each front-matter requirement at every load.
    In the test venv they are already installed, so pip only checks them."""
    started = time.monotonic()
    server = start_pipelines_server(plugin_path=stub_plugin)
    elapsed = time.monotonic() - started

    log = server.log_path.read_text(encoding="utf-8")
    assert "Requirement already satisfied: pyyaml" in log
    assert "Requirement already satisfied: requests" in log
    assert elapsed < 30


def test_plugin_that_fails_to_load_raises(
    start_pipelines_server: StartPipelinesServer, tmp_path: Path
) -> None:
    broken = tmp_path / "broken_plugin.py"
    broken.write_text(BROKEN_PLUGIN, encoding="utf-8")

    with pytest.raises(ServerStartError, match="could not load broken_plugin.py"):
        start_pipelines_server(plugin_path=broken)
