"""What Open WebUI 0.12.4 sends and expects, checked without a browser.

Open WebUI adds its built-in tools to every chat sent from its page, and its
Admin > Settings > Pipelines form cannot save an empty text valve. The browser
test in tests/e2e covers both through the real page. These tests check the same
behaviour on the Pipelines server alone, so they run without Open WebUI.
"""

import pytest
import requests
from livechat import (
    MEDICAL,
    PIPELINE_ID,
    TEST_ENCODER,
    TEST_THRESHOLD,
    stream_chat,
    user,
)
from plugin_loader import load_plugin

# The shape of a tool that Open WebUI 0.12.4 adds to a chat from its page.
OPEN_WEBUI_TOOL = {
    "type": "function",
    "function": {
        "name": "search_memories",
        "description": "Search the user's memories.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
    },
}
NO_TOOL_PARSER_WARNING = "has no tool parser"


@pytest.fixture
def pipelines(start_pipelines_server, vllm_server, encoder_dir):
    return start_pipelines_server(
        {
            "VLLM_BASE_URL": vllm_server.api_base,
            "ENCODER_MODEL": TEST_ENCODER,
            "ENCODER_LOCAL_DIR": str(encoder_dir),
            "ROUTER_SCORE_THRESHOLD": TEST_THRESHOLD,
        }
    )


def test_empty_optional_valves_read_as_null():
    plugin = load_plugin()
    valves = plugin.Valves(VLLM_API_KEY="", DEFAULT_MODEL="", ENCODER_LOCAL_DIR="")

    dumped = valves.model_dump()

    for name in ("VLLM_API_KEY", "DEFAULT_MODEL", "ENCODER_LOCAL_DIR"):
        assert dumped[name] is None, name


def test_null_optional_valves_load_as_empty():
    plugin = load_plugin()

    valves = plugin.Valves(
        VLLM_API_KEY=None, DEFAULT_MODEL=None, ENCODER_LOCAL_DIR=None
    )

    assert valves.VLLM_API_KEY == ""
    assert valves.DEFAULT_MODEL == ""
    assert valves.ENCODER_LOCAL_DIR == ""


def test_set_optional_valve_reads_as_text():
    plugin = load_plugin()

    dumped = plugin.Valves(DEFAULT_MODEL="tiny-base").model_dump()

    assert dumped["DEFAULT_MODEL"] == "tiny-base"


def test_valves_form_round_trip_keeps_empty_valves(pipelines):
    """Send back what the valves endpoint returned, as the Open WebUI form does."""
    url = f"{pipelines.base_url}/{PIPELINE_ID}/valves"
    form_values = requests.get(url, timeout=10).json()
    assert form_values["VLLM_API_KEY"] is None
    assert form_values["DEFAULT_MODEL"] is None

    response = requests.post(f"{url}/update", json=form_values, timeout=60)

    assert response.status_code == 200, response.text
    assert requests.get(url, timeout=10).json() == form_values


@pytest.mark.parametrize("tool_choice", [None, "auto"], ids=["default", "auto"])
def test_chat_with_tools_answers_without_tool_parser(pipelines, tool_choice):
    body = {"messages": user(MEDICAL), "tools": [OPEN_WEBUI_TOOL]}
    if tool_choice:
        body["tool_choice"] = tool_choice

    first = stream_chat(pipelines.base_url, body)
    second = stream_chat(pipelines.base_url, body)

    for result in (first, second):
        assert result.status_code == 200
        assert result.models == {"doctor"}
        assert "vLLM returned HTTP 400" not in result.text
        assert result.text.strip(), "the stream carried no text"
        assert result.done_count == 1
    # The client remembers that vLLM has no tool parser, so it warns only once.
    assert pipelines.log_tail(400).count(NO_TOOL_PARSER_WARNING) == 1


def test_chat_with_tools_answers_when_not_streamed(pipelines):
    body = {
        "model": f"{PIPELINE_ID}.auto",
        "stream": False,
        "max_tokens": 12,
        "messages": user(MEDICAL),
        "tools": [OPEN_WEBUI_TOOL],
    }

    response = requests.post(
        f"{pipelines.base_url}/v1/chat/completions", json=body, timeout=60
    )

    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["content"]
    assert response.json()["model"] == "doctor"
