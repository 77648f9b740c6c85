"""The vLLM API key never reaches the Pipelines server's log, replies or status lines.

The plugin runs in the real Pipelines server with VLLM_API_KEY set to a
recognizable secret. FaultUpstream checks the bearer token as vLLM's --api-key
does, so the first chat proves that the key is sent. Then every failure the
fake can produce is requested, including an upstream error that repeats the
request's Authorization header. A second test uses real vLLM started with
--api-key. The valves endpoint itself returns the key: that
is upstream Pipelines' design (its valves endpoints are not authenticated), so it
is left out here and the deploy files keep that port inside the stack.
"""

import secrets

import pytest
import requests
from fault_upstream import FaultUpstream
from livechat import MEDICAL, PIPELINE_ID, read_stream, user
from streamcheck import (
    assert_well_formed,
    plugin_env,
    post_json,
    start_plugin_server,
)

from servers import free_port, start_vllm

SECRET = f"sk-slr-canary-{secrets.token_hex(12)}"
FAULTS = ["http500", "http503", "leaky500", "not_found", "cut", "malformed", "silent"]


@pytest.fixture(scope="module")
def guarded():
    with FaultUpstream(api_key=SECRET) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def server(guarded, encoder_dir, tmp_path_factory):
    env = plugin_env(
        guarded.api_base, encoder_dir, VLLM_API_KEY=SECRET, VLLM_READ_TIMEOUT="2"
    )
    server = start_plugin_server(tmp_path_factory, env)
    yield server
    server.stop()


def valves_url(server) -> str:
    return f"{server.base_url}/{PIPELINE_ID}/valves"


def update_valves(server, **changes):
    saved = requests.get(valves_url(server), timeout=10).json()
    return requests.post(
        f"{valves_url(server)}/update", json={**saved, **changes}, timeout=120
    )


def test_key_stays_out_of_logs_and_replies(server, guarded):
    replies: list[str] = []

    working = read_stream(server.base_url, {"messages": user(MEDICAL)})
    assert_well_formed(working)
    assert working.text.startswith("Fake answer from doctor"), "the key was not sent"
    replies.append(working.raw)

    for fault in FAULTS:
        question = user(f"[fault:{fault}] {MEDICAL}")
        result = read_stream(server.base_url, {"messages": question})
        assert_well_formed(result)
        replies.append(result.raw)
        if fault != "silent":
            response = post_json(server.base_url, {"messages": question})
            replies.append(response.text)

    leaky = read_stream(
        server.base_url, {"messages": user(f"[fault:leaky500] {MEDICAL}")}
    )
    assert "vLLM returned HTTP 500: fake upstream failure" in leaky.text
    assert "Authorization: Bearer" in leaky.text, "the fake did not repeat the header"

    with FaultUpstream(api_key="another-key") as other:
        response = update_valves(server, VLLM_BASE_URL=other.api_base)
        assert response.status_code == 200, response.text
        rejected = read_stream(server.base_url, {"messages": user(MEDICAL)})
        assert "vLLM returned HTTP 401: Unauthorized" in rejected.text
        replies.append(rejected.raw)
        replies.append(post_json(server.base_url, {"messages": user(MEDICAL)}).text)

    dead = f"http://127.0.0.1:{free_port()}/v1"
    assert update_valves(server, VLLM_BASE_URL=dead).status_code == 200
    unreachable = read_stream(server.base_url, {"messages": user(MEDICAL)})
    assert "could not be reached" in unreachable.text
    replies.append(unreachable.raw)

    # A key typed into the wrong field fails validation without being echoed.
    for changes in ({"VLLM_CONNECT_TIMEOUT": SECRET}, {"VLLM_BASE_URL": SECRET}):
        response = update_valves(server, **changes)
        assert response.status_code == 500
        replies.append(response.text)

    log = server.log_path.read_text(encoding="utf-8", errors="replace")
    assert "vLLM returned HTTP 500" in log, "the failures were not logged"
    assert SECRET not in log
    for reply in replies:
        assert SECRET not in reply


@pytest.mark.slow
def test_real_vllm_key_stays_out_of_logs(
    tiny_model_dir, vllm_python, encoder_dir, tmp_path_factory, start_pipelines_server
):
    wrong = f"sk-slr-wrong-{secrets.token_hex(12)}"
    vllm = start_vllm(
        tiny_model_dir,
        tmp_path_factory.mktemp("vllm-with-key"),
        extra_args=["--api-key", SECRET],
        python=vllm_python,
    )
    try:
        assert requests.get(f"{vllm.api_base}/models", timeout=10).status_code == 401
        env = plugin_env(vllm.api_base, encoder_dir, VLLM_API_KEY=SECRET)
        server = start_pipelines_server(env)
        replies = []

        working = read_stream(server.base_url, {"messages": user(MEDICAL)})
        assert_well_formed(working)
        assert working.models == {"doctor"}, "the key was not sent"

        # Requests that vLLM rejects: too many tokens, n > 1 with greedy sampling.
        for extra in ({"max_tokens": 4000}, {"n": 2, "temperature": 0}):
            body = {"messages": user(MEDICAL), **extra}
            result = read_stream(server.base_url, body)
            assert_well_formed(result)
            assert "vLLM returned HTTP 400" in result.text
            replies += [result.raw, post_json(server.base_url, body).text]

        response = update_valves(server, VLLM_API_KEY=wrong)
        assert response.status_code == 200, response.text
        rejected = read_stream(server.base_url, {"messages": user(MEDICAL)})
        assert "vLLM returned HTTP 401: Unauthorized" in rejected.text
        replies += [rejected.raw, post_json(server.base_url, {"messages": []}).text]

        log = server.log_path.read_text(encoding="utf-8", errors="replace")
        assert "vLLM returned HTTP 401" in log
        for key in (SECRET, wrong):
            assert key not in log
            for reply in replies:
                assert key not in reply
    finally:
        vllm.stop()
