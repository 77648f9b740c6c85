"""Requests that real Open WebUI and OpenAI clients send, and situations they meet.

Each test drives the real Pipelines server with the plugin against real vLLM.
"""

import json
import time

import pytest
import requests
from livechat import (
    AUTO,
    MATH,
    MEDICAL,
    PIPELINE_ID,
    TEST_ENCODER,
    TEST_THRESHOLD,
    complete_chat,
    direct_text,
    get_valves,
    stream_chat,
    update_valves,
    user,
)
from plugin_loader import load_plugin

from servers import free_port


def assert_one_finished_stream(result):
    assert result.status_code == 200
    assert result.done_count == 1
    assert len(result.finish_reasons) == 1
    assert result.text.strip(), "the stream carried no text"


def test_content_parts_route_on_text(pipelines):
    content = [{"type": "text", "text": "What is a safe daily dose of vitamin D?"}]
    result = stream_chat(pipelines.base_url, {"messages": user(content)})
    assert result.models == {"doctor"}
    assert_one_finished_stream(result)


def test_image_only_message_gets_clear_answer(pipelines):
    content = [
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
        }
    ]
    result = stream_chat(pipelines.base_url, {"messages": user(content)})
    assert_one_finished_stream(result)
    assert result.statuses and "no text to route" in result.statuses[0]
    # The tiny test model is text-only, so vLLM rejects the image and says why.
    assert "vLLM returned HTTP 400" in result.text


# An assistant turn that carries only a tool call has content null.
TOOL_CALL_HISTORY = [
    {"role": "user", "content": "look up my last blood test"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lab_results", "arguments": "{}"},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "HbA1c 6.9%"},
    {"role": "user", "content": "Is that HbA1c value a sign of diabetes?"},
]


def test_null_content_is_refused_by_pipelines_server(pipelines):
    """The Pipelines server's schema rejects content null before the plugin runs."""
    messages = TOOL_CALL_HISTORY
    result = stream_chat(pipelines.base_url, {"messages": messages})
    assert result.status_code == 422


def test_tool_call_history_routes_on_last_user_message(
    vllm_server, encoder_dir, monkeypatch
):
    """Called directly, as Open WebUI calls a Function, pipe() accepts content null."""
    monkeypatch.setenv("VLLM_BASE_URL", vllm_server.api_base)
    monkeypatch.setenv("ENCODER_MODEL", TEST_ENCODER)
    monkeypatch.setenv("ENCODER_LOCAL_DIR", str(encoder_dir))
    monkeypatch.setenv("ROUTER_SCORE_THRESHOLD", TEST_THRESHOLD)
    pipeline = load_plugin().Pipeline()
    messages = TOOL_CALL_HISTORY
    body = {"model": AUTO, "stream": True, "max_tokens": 8, "messages": messages}
    lines = list(pipeline.pipe(None, "auto", messages, body))
    chunks = [json.loads(line[5:]) for line in lines[1:-1]]
    assert lines[0]["event"]["data"]["description"].startswith("doctor,")
    assert {chunk["model"] for chunk in chunks} == {"doctor"}
    assert lines[-1] == "data: [DONE]"


def test_gibberish_goes_to_base_and_logs_best_score(pipelines, base_name):
    result = stream_chat(pipelines.base_url, {"messages": user("asdfgh qwerty zxcv")})
    assert result.models == {base_name}
    assert_one_finished_stream(result)
    decisions = [
        line
        for line in pipelines.log_tail(400).splitlines()
        if "semantic_lora_router:request" in line
    ]
    assert "route=None" in decisions[-1]
    assert "best=dcot:" in decisions[-1] or "best=doctor:" in decisions[-1]


TITLE_TASK = {
    "metadata": {"task": "title_generation"},
    "messages": user(
        "### Task:\nGenerate a concise, 3-5 word title for the chat history below.\n"
        "### Chat History:\nUSER: my knee hurts when I run"
    ),
}


def test_title_task_goes_to_base_unrouted(pipelines, base_name):
    response = complete_chat(pipelines.base_url, TITLE_TASK)
    assert response.status_code == 200
    assert response.json()["model"] == base_name


def test_title_task_stream_has_no_status(pipelines, base_name):
    result = stream_chat(pipelines.base_url, TITLE_TASK)
    assert result.models == {base_name}
    assert result.statuses == []
    assert result.events == []


def test_usage_chunks_do_not_end_the_stream(pipelines, vllm_server):
    body = {
        "messages": user(MATH),
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    result = stream_chat(pipelines.base_url, body)
    assert_one_finished_stream(result)
    assert result.text == direct_text(vllm_server.api_base, "dcot", user(MATH))
    usage_only = [chunk for chunk in result.chunks if chunk.get("choices") == []]
    assert len(usage_only) == 1
    assert usage_only[0]["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize("content", ["   ", ""], ids=["spaces", "empty"])
def test_empty_user_message_gets_an_answer(pipelines, content, base_name):
    result = stream_chat(pipelines.base_url, {"messages": user(content)})
    assert result.done_count == 1
    assert result.models == {base_name}
    assert "no text to route" in result.statuses[0]


def test_single_done_and_finish(pipelines):
    result = stream_chat(pipelines.base_url, {"messages": user("hi")})
    assert result.raw.count("data: [DONE]") == 1
    assert len(result.finish_reasons) == 1
    assert result.raw.rstrip().endswith("data: [DONE]")


def test_missing_adapter_falls_back_to_base_with_note(
    pipelines, restore_valves, base_name
):
    routes = [
        {"name": "nurse", "utterances": ["how do I change a wound dressing"]},
        {"name": "dcot", "utterances": ["Solve this equation step by step"]},
    ]
    response = update_valves(pipelines, restore_valves, ROUTES=json.dumps(routes))
    assert response.status_code == 200, response.text
    question = user("how do I change a wound dressing at home")

    result = stream_chat(pipelines.base_url, {"messages": question})
    assert result.models == {base_name}
    assert_one_finished_stream(result)
    (note,) = result.statuses
    assert f"nurse is not served by vLLM at {pipelines_vllm(pipelines)}" in note
    assert f"so {base_name} answered" in note

    whole = complete_chat(pipelines.base_url, {"messages": question})
    assert whole.status_code == 200
    assert "nurse is not served" in whole.json()["choices"][0]["message"]["content"]


def pipelines_vllm(server):
    return get_valves(server)["VLLM_BASE_URL"]


def test_vllm_down_gives_message_naming_url(pipelines, restore_valves):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    response = update_valves(
        pipelines, restore_valves, VLLM_BASE_URL=dead, VLLM_CONNECT_TIMEOUT=2
    )
    assert response.status_code == 200, response.text

    started = time.monotonic()
    result = stream_chat(pipelines.base_url, {"messages": user("hello")})
    assert time.monotonic() - started < 10
    assert result.done_count == 1
    assert f"vLLM at {dead} could not be reached (connection refused)" in result.text
    assert "Traceback" not in result.raw

    whole = complete_chat(pipelines.base_url, {"messages": user("hello")})
    assert whole.status_code == 502
    assert f"vLLM at {dead} could not be reached" in whole.json()["detail"]


def test_pipelines_starts_while_vllm_is_down(start_pipelines_server, encoder_dir):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    server = start_pipelines_server(
        {
            "VLLM_BASE_URL": dead,
            "ENCODER_MODEL": TEST_ENCODER,
            "ENCODER_LOCAL_DIR": str(encoder_dir),
            "HF_HUB_OFFLINE": "1",
        }
    )
    models = requests.get(
        f"{server.api_base}/models", headers=server.auth_headers(), timeout=10
    ).json()["data"]
    assert [m["id"] for m in models] == [AUTO]

    result = stream_chat(server.base_url, {"messages": user(MEDICAL)})
    assert result.done_count == 1
    assert f"vLLM at {dead} could not be reached" in result.text


def test_encoder_failure_keeps_server_up_until_fixed(
    start_pipelines_server, vllm_server, encoder_dir, tmp_path
):
    empty = tmp_path / "no-encoder-here"
    empty.mkdir()
    server = start_pipelines_server(
        {
            "VLLM_BASE_URL": vllm_server.api_base,
            "ENCODER_MODEL": TEST_ENCODER,
            "ENCODER_LOCAL_DIR": str(empty),
            "ROUTER_SCORE_THRESHOLD": TEST_THRESHOLD,
            "HF_HUB_OFFLINE": "1",
        }
    )

    result = stream_chat(server.base_url, {"messages": user(MEDICAL)})
    assert result.done_count == 1
    assert "auto cannot route" in result.text
    assert "ENCODER_MODEL and ENCODER_LOCAL_DIR valves" in result.text

    by_hand = stream_chat(
        server.base_url, {"model": f"{PIPELINE_ID}.doctor", "messages": user(MEDICAL)}
    )
    assert by_hand.models == {"doctor"}

    valves = get_valves(server)
    response = update_valves(server, valves, ENCODER_LOCAL_DIR=str(encoder_dir))
    assert response.status_code == 200, response.text
    fixed = stream_chat(server.base_url, {"messages": user(MEDICAL)})
    assert fixed.models == {"doctor"}


def test_follow_up_keeps_conversation_route(pipelines):
    messages = [
        {
            "role": "user",
            "content": "My daughter has a fever of 38.5C and a sore throat.",
        },
        {
            "role": "assistant",
            "content": "That sounds like a common viral infection; keep her hydrated.",
        },
        {"role": "user", "content": "And how much of it can I give her?"},
    ]
    result = stream_chat(pipelines.base_url, {"messages": messages})
    assert result.models == {"doctor"}
    assert "from the conversation" in result.statuses[0]


def test_unknown_model_of_manifold_is_reported(pipelines):
    response = requests.post(
        f"{pipelines.base_url}/v1/chat/completions",
        json={"model": f"{PIPELINE_ID}.nope", "messages": user("hi")},
        timeout=30,
    )
    assert response.status_code == 404
