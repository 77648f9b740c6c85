"""Adapters loaded on demand through vLLM's /v1/load_lora_adapter."""

import json
import re
import threading

import pytest
import requests
from livechat import (
    direct_text,
    get_valves,
    live_valves_env,
    stream_chat,
    update_valves,
    user,
)
from plugin_loader import PLUGIN_PATH

from servers import start_pipelines, start_vllm

QUESTION = "how do I change a wound dressing at home"


def nurse_routes(name, path):
    return json.dumps(
        [
            {
                "name": name,
                "path": str(path),
                "utterances": ["how do I change a wound dressing"],
            },
            {"name": "dcot", "utterances": ["Solve this equation step by step"]},
        ]
    )


@pytest.fixture(scope="module")
def updating_vllm(tiny_model_dir, vllm_python, tmp_path_factory):
    """A second vLLM that allows adapters to be loaded at run time."""
    server = start_vllm(
        tiny_model_dir,
        tmp_path_factory.mktemp("vllm-updating"),
        extra_env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
        extra_args=["--max-loras", "4", "--max-cpu-loras", "6"],
        python=vllm_python,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def updating_pipelines(updating_vllm, encoder_dir, tmp_path_factory):
    pipelines_dir = tmp_path_factory.mktemp("pipelines-updating")
    (pipelines_dir / PLUGIN_PATH.name).write_bytes(PLUGIN_PATH.read_bytes())
    server = start_pipelines(
        pipelines_dir, live_valves_env(updating_vllm.api_base, encoder_dir)
    )
    yield server
    server.stop()


def served(vllm):
    models = requests.get(f"{vllm.api_base}/models", timeout=10).json()["data"]
    return {m["id"] for m in models}


def test_route_loads_missing_adapter_once(
    updating_pipelines, updating_vllm, tiny_model_dir
):
    assert "nurse" not in served(updating_vllm)
    valves = get_valves(updating_pipelines)
    routes = nurse_routes("nurse", tiny_model_dir / "dcot")
    response = update_valves(updating_pipelines, valves, ROUTES=routes)
    assert response.status_code == 200, response.text

    results = [None] * 4

    def ask(index):
        results[index] = stream_chat(
            updating_pipelines.base_url, {"messages": user(QUESTION)}
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    # The nurse adapter has dcot's weights, so greedy text must equal dcot's.
    expected = direct_text(updating_vllm.api_base, "dcot", user(QUESTION))
    for result in results:
        assert result.models == {"nurse"}
        assert result.text == expected
        assert result.done_count == 1
    assert "nurse" in served(updating_vllm)
    log = updating_pipelines.log_tail(2000)
    assert len(re.findall(r"loaded adapter nurse from", log)) == 1
    vllm_log = updating_vllm.log_tail(5000)
    assert len(re.findall(r"POST /v1/load_lora_adapter", vllm_log)) == 1


def test_models_list_shows_loaded_adapter(updating_pipelines, updating_vllm):
    models = requests.get(
        f"{updating_pipelines.api_base}/models",
        headers=updating_pipelines.auth_headers(),
        timeout=10,
    ).json()["data"]
    if "nurse" not in served(updating_vllm):
        pytest.skip("runs after the load test")
    assert "semantic_lora_router.nurse" in {m["id"] for m in models}


def test_bad_adapter_path_falls_back_with_reason(
    updating_pipelines, tmp_path, base_name
):
    valves = get_valves(updating_pipelines)
    missing = tmp_path / "no-adapter-here"
    response = update_valves(
        updating_pipelines, valves, ROUTES=nurse_routes("ghost", missing)
    )
    assert response.status_code == 200, response.text

    result = stream_chat(updating_pipelines.base_url, {"messages": user(QUESTION)})
    assert result.models == {base_name}
    assert result.done_count == 1
    (note,) = result.statuses
    assert "ghost is not served by vLLM" in note
    assert f"Loading it from {missing} failed" in note


def test_runtime_loading_off_falls_back_with_note(
    pipelines, restore_valves, tiny_model_dir, base_name
):
    routes = nurse_routes("nurse", tiny_model_dir / "dcot")
    response = update_valves(pipelines, restore_valves, ROUTES=routes)
    assert response.status_code == 200, response.text

    result = stream_chat(pipelines.base_url, {"messages": user(QUESTION)})
    assert result.models == {base_name}
    assert result.text.strip()
    (note,) = result.statuses
    assert "vLLM does not load adapters at run time" in note
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in note
