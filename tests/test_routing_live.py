"""The auto model end to end: real Pipelines server, real encoder, real vLLM.

Which adapter answered is proven from what vLLM did: the `model` in its chunks,
and greedy text that only that adapter produces at temperature 0.
"""

import json

import pytest
import requests
from livechat import (
    AUTO,
    MATH,
    MEDICAL,
    PIPELINE_ID,
    SMALL_TALK,
    complete_chat,
    direct_text,
    get_valves,
    stream_chat,
    update_valves,
    user,
)


def test_models_list_auto_base_and_adapters(pipelines, base_name):
    response = requests.get(
        f"{pipelines.api_base}/models", headers=pipelines.auth_headers(), timeout=10
    )
    models = {m["id"]: m["name"] for m in response.json()["data"]}
    base_id = f"{PIPELINE_ID}.{base_name.replace('/', '--')}"
    assert models == {
        AUTO: "auto",
        base_id: base_name,
        f"{PIPELINE_ID}.doctor": "doctor",
        f"{PIPELINE_ID}.dcot": "dcot",
    }
    assert all("/" not in model_id for model_id in models)


ROUTING_CASES = [
    pytest.param(MEDICAL, "doctor", id="medical-to-doctor"),
    pytest.param(MATH, "dcot", id="math-to-dcot"),
    pytest.param(SMALL_TALK, None, id="small-talk-to-base"),
]


@pytest.mark.parametrize(("question", "adapter"), ROUTING_CASES)
def test_auto_streams_from_routed_adapter(
    pipelines, vllm_server, base_name, question, adapter
):
    expected = adapter or base_name
    result = stream_chat(pipelines.base_url, {"messages": user(question)})

    assert result.status_code == 200
    assert result.models == {expected}
    assert result.text == direct_text(vllm_server.api_base, expected, user(question))
    others = {"doctor", "dcot", base_name} - {expected}
    for other in others:
        assert result.text != direct_text(vllm_server.api_base, other, user(question))
    assert len(result.chunks) > 3, "the answer came in one piece, not as a stream"
    assert result.done_count == 1
    assert len(result.finish_reasons) == 1
    (status,) = result.statuses
    assert status.startswith(f"{expected},")


@pytest.mark.parametrize(("question", "adapter"), ROUTING_CASES)
def test_auto_returns_json_from_routed_adapter(
    pipelines, vllm_server, base_name, question, adapter
):
    expected = adapter or base_name
    response = complete_chat(pipelines.base_url, {"messages": user(question)})

    assert response.status_code == 200
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["model"] == expected
    text = answer["choices"][0]["message"]["content"]
    assert text == direct_text(vllm_server.api_base, expected, user(question))


def test_streamed_text_equals_json_text(pipelines):
    streamed = stream_chat(pipelines.base_url, {"messages": user(MEDICAL)})
    whole = complete_chat(pipelines.base_url, {"messages": user(MEDICAL)}).json()
    assert streamed.text == whole["choices"][0]["message"]["content"]


def test_adapter_picked_by_hand_answers_without_routing(pipelines, vllm_server):
    result = stream_chat(
        pipelines.base_url,
        {"model": f"{PIPELINE_ID}.doctor", "messages": user(SMALL_TALK)},
    )
    assert result.models == {"doctor"}
    assert result.statuses == []
    assert result.text == direct_text(vllm_server.api_base, "doctor", user(SMALL_TALK))


def test_base_model_with_slash_reaches_vllm_by_its_name(pipelines, base_name):
    base_id = f"{PIPELINE_ID}.{base_name.replace('/', '--')}"
    result = stream_chat(pipelines.base_url, {"model": base_id, "messages": user("hi")})
    assert result.models == {base_name}
    assert result.done_count == 1


def test_valves_update_changes_routing_without_restart(pipelines, restore_valves):
    routes = {
        "routes": [
            {
                "name": "doctor",
                "utterances": ["Hello, how are you?", "Good morning, nice to meet you"],
            },
            {"name": "dcot", "utterances": ["Solve this equation step by step"]},
        ]
    }
    before = stream_chat(pipelines.base_url, {"messages": user(SMALL_TALK)})
    assert "doctor" not in before.models

    response = update_valves(pipelines, restore_valves, ROUTES=json.dumps(routes))
    assert response.status_code == 200, response.text

    after = stream_chat(pipelines.base_url, {"messages": user(SMALL_TALK)})
    assert after.models == {"doctor"}


def test_threshold_update_sends_everything_to_base(
    pipelines, restore_valves, base_name
):
    response = update_valves(pipelines, restore_valves, ROUTER_SCORE_THRESHOLD=1.0)
    assert response.status_code == 200, response.text
    result = stream_chat(pipelines.base_url, {"messages": user(MEDICAL)})
    assert result.models == {base_name}
    assert "no route matched (best doctor" in result.statuses[0]


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        pytest.param("{not json", "ROUTES is not valid YAML at line 1", id="not-yaml"),
        pytest.param(
            "- name: doctor\n  utterances: []\n",
            "route 1 (doctor): 'utterances' must be a non-empty list",
            id="empty-utterances",
        ),
        pytest.param(
            "- name: doctor\n  threshold: 7\n  utterances: [fever]\n",
            "route 1 (doctor): 'threshold' must be a number from 0 to 1",
            id="threshold-out-of-range",
        ),
    ],
)
def test_broken_routes_are_refused_and_old_routes_kept(
    pipelines, restore_valves, routes, message
):
    valves_file = pipelines.pipelines_dir / PIPELINE_ID / "valves.json"
    saved_file = valves_file.read_text()

    response = update_valves(pipelines, restore_valves, ROUTES=routes)

    assert response.status_code == 500
    assert message in response.json()["detail"]
    current = get_valves(pipelines)
    assert current["ROUTES"] == restore_valves["ROUTES"]
    assert valves_file.read_text() == saved_file
    result = stream_chat(pipelines.base_url, {"messages": user(MEDICAL)})
    assert result.models == {"doctor"}


def test_routing_decision_is_logged_once(pipelines):
    stream_chat(pipelines.base_url, {"messages": user("asdfgh qwerty zxcv")})
    line = pipelines.log_tail(400).splitlines()
    decisions = [entry for entry in line if "semantic_lora_router:request" in entry]
    last = decisions[-1]
    assert "target=tiny-base route=None best=" in last
    for key in ("threshold=0.40", "runner_up=", "ms="):
        assert key in last
