"""The plugin as an Open WebUI Function: class Pipe, called the way Open WebUI does.

Open WebUI awaits `pipe(body=..., __event_emitter__=..., __task__=...)` and
passes a returned StreamingResponse through untouched. These tests call it the
same way, in process, against real vLLM and the real encoder.
"""

import asyncio
import json

import pytest
from livechat import MEDICAL, SMALL_TALK, live_valves_env, user
from plugin_loader import load_plugin


@pytest.fixture
def function(vllm_server, encoder_dir, monkeypatch):
    for name, value in live_valves_env(vllm_server.api_base, encoder_dir).items():
        monkeypatch.setenv(name, value)
    return load_plugin().Pipe()


async def read_stream(response):
    chunks = []
    async for part in response.body_iterator:
        chunks.append(part if isinstance(part, str) else part.decode())
    return "".join(chunks)


def run_pipe(function, body, task=None):
    events = []

    async def emit(event):
        events.append(event)

    async def call():
        result = await function.pipe(body, __event_emitter__=emit, __task__=task)
        if hasattr(result, "body_iterator"):
            return await read_stream(result)
        return result

    return asyncio.run(call()), events


def data_lines(text):
    return [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]


def test_function_lists_auto_and_vllm_models(function):
    models = asyncio.run(function.pipes())
    assert [m["id"] for m in models] == ["auto", "tiny-base", "doctor", "dcot"]


def test_function_streams_routed_adapter_with_status(function):
    body = {
        "model": "semantic_lora_router.auto",
        "stream": True,
        "max_tokens": 8,
        "messages": user(MEDICAL),
    }
    text, events = run_pipe(function, body)

    lines = data_lines(text)
    assert lines[-1] == "[DONE]"
    assert lines.count("[DONE]") == 1
    chunks = [json.loads(line) for line in lines[:-1]]
    assert {chunk["model"] for chunk in chunks} == {"doctor"}
    assert "event" not in text
    (status,) = events
    assert status["type"] == "status"
    assert status["data"]["description"].startswith("doctor, score")


def test_function_task_goes_to_base_silently(function):
    body = {
        "model": "semantic_lora_router.auto",
        "stream": True,
        "max_tokens": 8,
        "messages": user(MEDICAL),
    }
    text, events = run_pipe(function, body, task="title_generation")
    chunks = [json.loads(line) for line in data_lines(text)[:-1]]
    assert {chunk["model"] for chunk in chunks} == {"tiny-base"}
    assert events == []


def test_function_returns_json_without_stream(function):
    body = {
        "model": "semantic_lora_router.auto",
        "stream": False,
        "max_tokens": 8,
        "messages": user(SMALL_TALK),
    }
    result, events = run_pipe(function, body)
    assert result["model"] == "tiny-base"
    assert events == []


def test_function_accepts_null_content_history(function):
    messages = [
        {"role": "user", "content": "look up my last blood test"},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "user", "content": "Is that HbA1c value a sign of diabetes?"},
    ]
    body = {"model": "x.auto", "stream": True, "max_tokens": 8, "messages": messages}
    text, events = run_pipe(function, body)
    assert events[0]["data"]["description"].startswith("doctor,")
    assert data_lines(text)[-1] == "[DONE]"
