"""Valves that an admin gets wrong, and a rebuild that must not stall chats.

Each test runs the real Pipelines server with the plugin against FaultUpstream,
which speaks vLLM's wire format; none needs real vLLM.
"""

import json
import random
import shutil
import threading
import time

import pytest
import requests
from fault_upstream import FaultUpstream
from livechat import MEDICAL, PIPELINE_ID, get_valves, read_stream, user
from streamcheck import assert_well_formed, plugin_env

from servers import ServerStartError

BASE = f"{PIPELINE_ID}.tiny-base"
# A key pasted from a web page or chat often carries a zero-width space.
PASTED_KEY = "sk-test-1234\u200b"


@pytest.fixture
def fake():
    with FaultUpstream() as upstream:
        yield upstream


def update(server, **changes):
    return requests.post(
        f"{server.base_url}/{PIPELINE_ID}/valves/update",
        data=json.dumps({**get_valves(server), **changes}),
        headers={"Content-Type": "application/json"},
        timeout=300,
    )


def test_pasted_key_from_env_loads(start_pipelines_server, fake, encoder_dir):
    try:
        server = start_pipelines_server(
            plugin_env(fake.api_base, encoder_dir, VLLM_API_KEY=PASTED_KEY)
        )
    except ServerStartError as exc:
        pytest.fail(f"the Pipelines server did not start: {str(exc)[-300:]}")
    # vLLM's model list cannot be read, so only auto is offered.
    result = read_stream(server.base_url, {"messages": user("hi")})
    assert_well_formed(result)
    assert "VLLM_API_KEY" in result.text
    assert "sk-test-1234" not in server.log_path.read_text(errors="replace")


def test_pasted_key_update_rejected(start_pipelines_server, fake, encoder_dir):
    server = start_pipelines_server(plugin_env(fake.api_base, encoder_dir))
    response = update(server, VLLM_API_KEY=PASTED_KEY)
    assert response.status_code != 200
    assert "VLLM_API_KEY contains a character" in response.json()["detail"]
    assert "sk-test-1234" not in response.text
    assert get_valves(server)["VLLM_API_KEY"] is None

    result = read_stream(server.base_url, {"model": BASE, "messages": user("hi")})
    assert_well_formed(result)
    assert result.models == {"tiny-base"}


def test_pasted_key_saved_before_loads(start_pipelines_server, fake, encoder_dir):
    """A key saved by an older version of the plugin, or by hand, still loads."""
    server = start_pipelines_server(plugin_env(fake.api_base, encoder_dir))
    server.stop()
    valves_file = server.pipelines_dir / PIPELINE_ID / "valves.json"
    valves_file.parent.mkdir(exist_ok=True)
    valves_file.write_text(json.dumps({"VLLM_API_KEY": PASTED_KEY}))
    try:
        server.start()
    except ServerStartError as exc:
        pytest.fail(f"the Pipelines server did not restart: {str(exc)[-300:]}")

    # vLLM's model list cannot be read with that key, so only auto is offered.
    result = read_stream(server.base_url, {"messages": user("hi")})
    assert_well_formed(result)
    assert "VLLM_API_KEY contains a character" in result.text, result.text
    assert "sk-test-1234" not in server.log_path.read_text(errors="replace")


def test_vanished_encoder_folder_loads(
    start_pipelines_server, fake, encoder_dir, tmp_path
):
    copy = tmp_path / "encoder-copy"
    shutil.copytree(encoder_dir, copy)
    server = start_pipelines_server(plugin_env(fake.api_base, encoder_dir))
    assert update(server, ENCODER_LOCAL_DIR=str(copy)).status_code == 200
    server.stop()
    shutil.rmtree(copy)  # a volume not mounted yet, a renamed folder
    try:
        server.start()
    except ServerStartError as exc:
        pytest.fail(f"the Pipelines server did not restart: {str(exc)[-300:]}")
    by_hand = read_stream(server.base_url, {"model": BASE, "messages": user("hi")})
    assert by_hand.models == {"tiny-base"}
    routed = read_stream(server.base_url, {"messages": user(MEDICAL)})
    assert_well_formed(routed)
    assert "ENCODER_LOCAL_DIR" in routed.text


def test_chat_during_rebuild_not_held(start_pipelines_server, fake, encoder_dir):
    server = start_pipelines_server(plugin_env(fake.api_base, encoder_dir))
    rng = random.Random(1)
    words = "pain fever dose child heart rash solve equation train prime".split()
    routes = [
        {
            "name": name,
            "utterances": [
                f"{name} {i}: " + " ".join(rng.choice(words) for _ in range(12))
                for i in range(1000)
            ],
        }
        for name in ("doctor", "dcot")
    ]
    done = {}

    def rebuild():
        started = time.monotonic()
        done["code"] = update(server, ROUTES=json.dumps(routes)).status_code
        done["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=rebuild)
    thread.start()
    time.sleep(1.0)
    started = time.monotonic()
    result = read_stream(server.base_url, {"model": BASE, "messages": user("hi")})
    waited = time.monotonic() - started
    thread.join()
    assert done["code"] == 200
    assert_well_formed(result)
    assert done["seconds"] > 3.0, "the rebuild was too quick to test anything"
    assert waited < done["seconds"] / 3, (
        f"a chat to the base model waited {waited:.1f} s during a rebuild of "
        f"{done['seconds']:.1f} s"
    )


def test_lone_surrogate_routes_rejected(start_pipelines_server, fake, encoder_dir):
    server = start_pipelines_server(plugin_env(fake.api_base, encoder_dir))
    routes = [
        {"name": "doctor", "utterances": [MEDICAL, "headache \ud83d"]},
        {"name": "dcot", "utterances": ["Solve 3x + 7 = 22 step by step"]},
    ]
    response = update(server, ROUTES=json.dumps(routes))
    assert response.status_code != 200
    assert "utterance 2" in response.json()["detail"]
    result = read_stream(server.base_url, {"messages": user(MEDICAL)})
    assert result.models == {"doctor"}, result.text


def test_deeply_nested_routes_rejected(start_pipelines_server, fake, encoder_dir):
    server = start_pipelines_server(plugin_env(fake.api_base, encoder_dir))
    response = update(server, ROUTES="[" * 3000 + "]" * 3000)
    assert response.status_code != 200
    assert "ROUTES" in response.json()["detail"]


def test_default_model_not_served_named(start_pipelines_server, fake, encoder_dir):
    server = start_pipelines_server(plugin_env(fake.api_base, encoder_dir))
    assert update(server, DEFAULT_MODEL="gpt-4").status_code == 200

    result = read_stream(server.base_url, {"messages": user("Hello there!")})
    assert_well_formed(result)
    assert "DEFAULT_MODEL gpt-4 is not served by vLLM" in result.text, result.text
    assert "fix the DEFAULT_MODEL valve" in result.text
    routed = read_stream(server.base_url, {"messages": user(MEDICAL)})
    assert routed.models == {"doctor"}, routed.text
