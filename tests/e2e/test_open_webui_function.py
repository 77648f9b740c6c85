"""The plugin installed into the real Open WebUI as a Function, with no Pipelines.

Open WebUI imports the file itself and uses its `Pipe` class. The test installs
it through Open WebUI's API, as an admin would with Admin > Functions > Import,
and chats with auto through Open WebUI's own chat API.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from livechat import MATH, MEDICAL, SMALL_TALK, live_valves_env, user

from servers import ServerProcess, start_open_webui

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]

OPENWEBUI_BIN = os.environ.get("SLR_OPENWEBUI_BIN", "")
if not Path(OPENWEBUI_BIN).is_file():
    pytest.skip(
        f"SLR_OPENWEBUI_BIN={OPENWEBUI_BIN!r} is not an open-webui executable; "
        "run the tests with tests/run, which calls tests/e2e/setup.sh",
        allow_module_level=True,
    )

PLUGIN_PATH = (
    Path(__file__).resolve().parents[2] / "pipelines" / "semantic_lora_router.py"
)
FUNCTION_ID = "semantic_lora_router"


@pytest.fixture(scope="module")
def open_webui(vllm_server, encoder_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    """Open WebUI whose environment carries the plugin's valve defaults."""
    data_dir = tmp_path_factory.mktemp("open-webui-function")
    env = {
        # The Function is the only model source.
        "ENABLE_OPENAI_API": "false",
        **live_valves_env(vllm_server.api_base, encoder_dir),
    }
    with start_open_webui(OPENWEBUI_BIN, data_dir, env) as server:
        yield server


@pytest.fixture(scope="module")
def admin(open_webui) -> dict[str, str]:
    """Headers of the admin that WEBUI_AUTH=false signs in without a password."""
    response = requests.post(
        f"{open_webui.base_url}/api/v1/auths/signin",
        json={"email": "", "password": ""},
        timeout=60,
    )
    response.raise_for_status()
    return {"Authorization": f"Bearer {response.json()['token']}"}


@pytest.fixture(scope="module")
def installed(open_webui, admin) -> None:
    """Install the plugin file as a Function and switch it on."""
    form = {
        "id": FUNCTION_ID,
        "name": "Semantic LoRA Router",
        "content": PLUGIN_PATH.read_text(encoding="utf-8"),
        "meta": {"description": "auto routes each chat to a vLLM LoRA adapter"},
    }
    response = requests.post(
        f"{open_webui.base_url}/api/v1/functions/create",
        json=form,
        headers=admin,
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "pipe"
    response = requests.post(
        f"{open_webui.base_url}/api/v1/functions/id/{FUNCTION_ID}/toggle",
        headers=admin,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["is_active"] is True


def chat(open_webui, admin, model, question, stream=True):
    body = {
        "model": f"{FUNCTION_ID}.{model}",
        "stream": stream,
        "temperature": 0,
        "max_tokens": 12,
        "messages": user(question),
    }
    return requests.post(
        f"{open_webui.base_url}/api/chat/completions",
        json=body,
        headers=admin,
        timeout=180,
    )


def streamed_chunks(response):
    lines = [
        line[5:].strip()
        for line in response.text.splitlines()
        if line.startswith("data:")
    ]
    assert lines[-1] == "[DONE]"
    assert lines.count("[DONE]") == 1
    return [json.loads(line) for line in lines[:-1]]


def test_function_offers_auto_and_vllm_models(open_webui, admin, installed):
    response = requests.get(
        f"{open_webui.base_url}/api/models", headers=admin, timeout=120
    )
    ids = {model["id"] for model in response.json()["data"]}
    expected = {
        f"{FUNCTION_ID}.{name}" for name in ("auto", "tiny-base", "doctor", "dcot")
    }
    assert expected <= ids


@pytest.mark.parametrize(
    ("question", "target"),
    [
        pytest.param(MEDICAL, "doctor", id="medical-to-doctor"),
        pytest.param(MATH, "dcot", id="math-to-dcot"),
        pytest.param(SMALL_TALK, "tiny-base", id="small-talk-to-base"),
    ],
)
def test_function_auto_streams_from_routed_model(
    open_webui, admin, installed, question, target
):
    response = chat(open_webui, admin, "auto", question)
    assert response.status_code == 200, response.text
    chunks = streamed_chunks(response)
    assert {chunk["model"] for chunk in chunks} == {target}
    finishes = [
        choice["finish_reason"]
        for chunk in chunks
        for choice in chunk.get("choices", [])
        if choice.get("finish_reason")
    ]
    assert len(finishes) == 1


def test_function_answers_adapter_picked_by_hand(open_webui, admin, installed):
    response = chat(open_webui, admin, "doctor", SMALL_TALK, stream=False)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "doctor"
