"""Upstream faults, seen through the real Pipelines server with the plugin loaded.

Faults that real vLLM produces on demand (not listening, a client that goes
away, a restart) use the vllm_server fixture. The others come from FaultUpstream
(tests/fault_upstream.py), which speaks vLLM's wire format; a fault is chosen by
a "[fault:name]" marker in the chat's last message.

Each fault must end in one well-formed stream, with one finish and one [DONE],
whose text names the problem, or in an HTTP error with that sentence.
"""

import json
import re
import socket
import threading
import time
from typing import Any

import pytest
import requests
from fault_upstream import FaultUpstream, blackhole_listener
from livechat import AUTO, MEDICAL, PIPELINE_ID, SMALL_TALK, read_stream, user
from streamcheck import (
    CUT_NOTE,
    FAKE_ANSWER,
    assert_well_formed,
    plugin_env,
    post_json,
    start_plugin_server,
)

from servers import free_port


@pytest.fixture(scope="module")
def fake():
    with FaultUpstream(slow_interval=1.0) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def on_fake(fake, encoder_dir, tmp_path_factory):
    """A Pipelines server whose plugin talks to the fault-injecting upstream."""
    server = start_plugin_server(
        tmp_path_factory, plugin_env(fake.api_base, encoder_dir)
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def on_vllm(vllm_server, encoder_dir, tmp_path_factory):
    """A Pipelines server whose plugin talks to real vLLM."""
    env = plugin_env(vllm_server.api_base, encoder_dir, MODEL_LIST_TTL="2")
    server = start_plugin_server(tmp_path_factory, env)
    yield server
    server.stop()


@pytest.fixture
def clean_fake(fake):
    fake.reset()
    yield fake
    fake.reset()


@pytest.fixture
def set_valves(on_fake):
    """Change the valves of the on_fake server; they are restored afterwards."""
    url = f"{on_fake.base_url}/{PIPELINE_ID}/valves"
    saved = requests.get(url, timeout=10).json()

    def update(**changes: Any) -> None:
        response = requests.post(
            f"{url}/update", json={**saved, **changes}, timeout=120
        )
        assert response.status_code == 200, response.text

    yield update
    response = requests.post(f"{url}/update", json=saved, timeout=120)
    assert response.status_code == 200, response.text


# --- Faults from the fake upstream -------------------------------------------


def test_vllm_not_listening_names_url(on_fake, set_valves):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    set_valves(VLLM_BASE_URL=dead)

    result = read_stream(on_fake.base_url, {"messages": user(MEDICAL)})
    assert_well_formed(result)
    assert f"vLLM at {dead} could not be reached (connection refused)" in result.text

    response = post_json(on_fake.base_url, {"messages": user(MEDICAL)})
    assert response.status_code == 502
    assert f"vLLM at {dead} could not be reached" in response.json()["detail"]


def test_connect_timeout_fires_within_its_limit(on_fake, set_valves):
    with blackhole_listener() as api_base:
        set_valves(VLLM_BASE_URL=api_base, VLLM_CONNECT_TIMEOUT=1, VLLM_READ_TIMEOUT=60)

        started = time.monotonic()
        result = read_stream(on_fake.base_url, {"messages": user(MEDICAL)})
        elapsed = time.monotonic() - started

        response = post_json(on_fake.base_url, {"messages": user(MEDICAL)})

    print(f"connect timeout of 1 s: the reply ended after {elapsed:.2f} s")
    assert_well_formed(result)
    assert f"vLLM at {api_base} did not accept a connection within 1 s" in result.text
    # The 1 s connect limit fired, not the 60 s read limit.
    assert 1.0 <= elapsed < 30, f"the reply took {elapsed:.1f} s"
    assert response.status_code == 504
    assert "did not accept a connection within 1 s" in response.json()["detail"]


def test_read_timeout_fires_within_its_limit(on_fake, clean_fake, set_valves):
    set_valves(VLLM_CONNECT_TIMEOUT=60, VLLM_READ_TIMEOUT=1.5)

    started = time.monotonic()
    result = read_stream(on_fake.base_url, {"messages": user("[fault:silent] hi")})
    elapsed = time.monotonic() - started

    print(f"read timeout of 1.5 s: the reply ended after {elapsed:.2f} s")
    assert_well_formed(result)
    assert f"vLLM at {clean_fake.api_base} sent nothing for 1.5 s" in result.text
    assert "VLLM_READ_TIMEOUT sets the limit" in result.text
    # The 1.5 s read limit fired, not the 60 s connect limit.
    assert 1.5 <= elapsed < 30, f"the reply took {elapsed:.1f} s"


def test_stream_that_stalls_midway_is_cut_with_note(on_fake, clean_fake, set_valves):
    set_valves(VLLM_READ_TIMEOUT=0.5)
    result = read_stream(on_fake.base_url, {"messages": user("[fault:slow] hi")})
    assert_well_formed(result)
    assert result.text.endswith(CUT_NOTE)


@pytest.mark.parametrize("status", [500, 503], ids=["http500", "http503"])
def test_http_error_becomes_message(on_fake, clean_fake, status):
    question = user(f"[fault:http{status}] {MEDICAL}")

    result = read_stream(on_fake.base_url, {"messages": question})
    assert_well_formed(result)
    assert f"vLLM returned HTTP {status}: fake upstream failure" in result.text

    response = post_json(on_fake.base_url, {"messages": question})
    assert response.status_code == 502
    assert f"vLLM returned HTTP {status}" in response.json()["detail"]


def test_adapter_404_falls_back_to_base_with_note(on_fake, clean_fake):
    clean_fake.missing = {"doctor"}

    result = read_stream(on_fake.base_url, {"messages": user(MEDICAL)})
    assert_well_formed(result)
    assert result.models == {"tiny-base"}
    assert result.text == FAKE_ANSWER.format(model="tiny-base")[: len(result.text)]
    (note,) = result.statuses
    assert f"doctor is not served by vLLM at {clean_fake.api_base}" in note
    assert "so tiny-base answered" in note
    requested_models = [request["model"] for request in clean_fake.chat_requests]
    assert requested_models == ["doctor", "tiny-base"]


def test_adapter_404_by_hand_becomes_message(on_fake, clean_fake):
    clean_fake.missing = {"doctor"}
    body = {"model": f"{PIPELINE_ID}.doctor", "messages": user(MEDICAL)}

    result = read_stream(on_fake.base_url, body)
    assert_well_formed(result)
    assert "vLLM returned HTTP 404: The model `doctor` does not exist" in result.text

    response = post_json(on_fake.base_url, body)
    assert response.status_code == 404
    assert "The model `doctor` does not exist" in response.json()["detail"]


def test_cut_stream_ends_with_note(on_fake, clean_fake):
    result = read_stream(on_fake.base_url, {"messages": user("[fault:cut] hi")})
    assert_well_formed(result)
    answer = FAKE_ANSWER.format(model=next(iter(result.models)))
    assert result.text.startswith("Fake answer")
    assert result.text.endswith(CUT_NOTE)
    assert answer not in result.text, "the whole answer arrived; nothing was cut"


def test_malformed_line_is_dropped(on_fake, clean_fake):
    body = {"model": f"{PIPELINE_ID}.doctor", "messages": user("[fault:malformed]")}
    result = read_stream(on_fake.base_url, body)
    assert_well_formed(result)
    assert result.text == FAKE_ANSWER.format(model="doctor")
    assert "line from vLLM that is not JSON" in on_fake.log_tail(20)


def test_slow_stream_arrives_token_by_token(on_fake, clean_fake):
    body = {
        "model": f"{PIPELINE_ID}.doctor",
        "messages": user("[fault:slow]"),
        "max_tokens": 4,
    }
    result = read_stream(on_fake.base_url, body)
    assert_well_formed(result)
    assert result.text == "Fake answer from doctor:"
    times = result.content_times
    assert len(times) == 4
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    # The fake sends one token per second; a buffered stream would show gaps
    # near 0 and everything at the end.
    assert all(gap > 0.5 for gap in gaps), f"gaps between tokens: {gaps}"


def test_utf8_split_across_reads_arrives_intact(on_fake, clean_fake):
    body = {"model": f"{PIPELINE_ID}.doctor", "messages": user("[fault:utf8_split]")}
    result = read_stream(on_fake.base_url, body)
    assert_well_formed(result)
    assert "\ufffd" not in result.raw
    assert result.text == FAKE_ANSWER.format(model="doctor")


# --- Faults from real vLLM -----------------------------------------------------


def vllm_metrics(vllm_server) -> dict[str, float]:
    """Return vLLM's running requests, generated tokens and finished requests.

    vLLM 0.32 counts finished requests by reason, but not the aborted ones
    (its abort counter stays 0), so a request that ran to max_tokens shows in
    "length" and an aborted one only in fewer generated tokens.
    """
    text = requests.get(f"{vllm_server.base_url}/metrics", timeout=10).text
    values = {"running": 0.0, "tokens": 0.0, "length": 0.0}
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            values["running"] += float(line.rsplit(" ", 1)[1])
        if line.startswith("vllm:generation_tokens_total{"):
            values["tokens"] += float(line.rsplit(" ", 1)[1])
        match = re.match(r'vllm:request_success_total\{.*finished_reason="(\w+)"', line)
        if match and match.group(1) in values:
            values[match.group(1)] += float(line.rsplit(" ", 1)[1])
    return values


LONG_ANSWER = {
    "messages": user("Write a long story."),
    "max_tokens": 480,
    "ignore_eos": True,
    "temperature": 0,
}


def seconds_for_whole_answer(vllm_server) -> float:
    started = time.monotonic()
    response = requests.post(
        f"{vllm_server.api_base}/chat/completions",
        json={**LONG_ANSWER, "model": "doctor", "stream": True},
        stream=True,
        timeout=120,
    )
    for _ in response.iter_content(chunk_size=None):
        pass
    return time.monotonic() - started


DISCONNECT_CLOSE_LIMIT = 1.5


def test_client_disconnect_aborts_vllm_request(on_vllm, vllm_server):
    whole = seconds_for_whole_answer(vllm_server)
    before = vllm_metrics(vllm_server)
    assert before["running"] == 0, "another request is running in vLLM"

    body = json.dumps(
        {**LONG_ANSWER, "model": f"{PIPELINE_ID}.doctor", "stream": True}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", on_vllm.port), timeout=30)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    while received.count(b'"content"') < 3:
        received += sock.recv(65536)
    assert vllm_metrics(vllm_server)["running"] == 1
    sock.close()
    closed_at = time.monotonic()

    running = 1.0
    while running and time.monotonic() - closed_at < 10:
        running = vllm_metrics(vllm_server)["running"]
        time.sleep(0.02)
    close_seconds = time.monotonic() - closed_at
    after = vllm_metrics(vllm_server)
    print(f"vLLM closed the request {close_seconds:.2f} s after the client left")

    assert running == 0, "vLLM still runs the request 10 s after the client left"
    assert after["length"] == before["length"], "the request ran to max_tokens"
    generated = after["tokens"] - before["tokens"]
    assert generated < LONG_ANSWER["max_tokens"], f"vLLM generated {generated} tokens"
    # 0.8-0.9 s on an idle 2-core machine; the margin is for a busy one, where
    # the watchdog waits longer so that it never cuts a live stream.
    assert close_seconds < DISCONNECT_CLOSE_LIMIT, (
        f"vLLM stopped {close_seconds:.2f} s after the client left; "
        f"the whole answer takes {whole:.2f} s"
    )
    assert "stream abandoned by its client" in on_vllm.log_tail(50)


def open_raw_stream(server, body: dict[str, Any]) -> socket.socket:
    """Send a streaming chat over a raw socket, so the test decides when to close."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def test_disconnect_among_live_streams_closes_only_it(on_vllm, vllm_server):
    """A stream whose client left is closed, while a live one streams on."""
    body = {**LONG_ANSWER, "model": f"{PIPELINE_ID}.doctor", "stream": True}
    live_text: list[str] = []

    def read_live() -> None:
        live_text.append(read_stream(on_vllm.base_url, body, timeout=120).text)

    live = threading.Thread(target=read_live)
    live.start()
    leaving = open_raw_stream(on_vllm, body)
    received = b""
    while received.count(b'"content"') < 3:
        received += leaving.recv(65536)
    assert vllm_metrics(vllm_server)["running"] == 2
    leaving.close()
    closed_at = time.monotonic()

    running = 2.0
    while running == 2 and time.monotonic() - closed_at < 10:
        running = vllm_metrics(vllm_server)["running"]
        time.sleep(0.02)
    close_seconds = time.monotonic() - closed_at
    live.join(120)
    print(f"vLLM closed the left stream {close_seconds:.2f} s after its client left")

    assert running < 2, "vLLM still runs both requests 10 s after one client left"
    # Beside live streams the watchdog's limit grows to twice their recent
    # pull delays, so a busy machine takes longer than the 0.8 s of a calm one.
    assert close_seconds < 2.0
    assert live_text, "the live stream did not finish"
    assert CUT_NOTE not in live_text[0]
    assert len(live_text[0]) > 400, "the live stream stopped early"


@pytest.mark.slow
def test_vllm_restart_needs_no_pipeline_restart(
    on_vllm, vllm_server, encoder_dir, tmp_path_factory
):
    body = {"messages": user(MEDICAL), "temperature": 0}
    assert read_stream(on_vllm.base_url, body).models == {"doctor"}

    vllm_server.stop()
    try:
        down = read_stream(on_vllm.base_url, body)
        assert_well_formed(down)
        assert f"vLLM at {vllm_server.api_base} could not be reached" in down.text
        # A Pipelines server that starts now lists no models yet.
        late = start_plugin_server(
            tmp_path_factory,
            plugin_env(vllm_server.api_base, encoder_dir, MODEL_LIST_TTL="2"),
        )
        assert model_ids(late) == [AUTO]
    finally:
        vllm_server.start()

    try:
        again = read_stream(on_vllm.base_url, body)
        assert_well_formed(again)
        assert again.models == {"doctor"}

        deadline = time.monotonic() + 20
        while model_ids(late) == [AUTO] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert set(model_ids(late)) == {
            AUTO,
            f"{PIPELINE_ID}.tiny-base",
            f"{PIPELINE_ID}.doctor",
            f"{PIPELINE_ID}.dcot",
        }
        assert read_stream(late.base_url, body).models == {"doctor"}
    finally:
        late.stop()


def model_ids(server) -> list[str]:
    response = requests.get(
        f"{server.api_base}/models", headers=server.auth_headers(), timeout=30
    )
    return [model["id"] for model in response.json()["data"]]


def test_pipelines_restart_keeps_saved_valves(
    start_pipelines_server, vllm_server, encoder_dir
):
    server = start_pipelines_server(plugin_env(vllm_server.api_base, encoder_dir))
    url = f"{server.base_url}/{PIPELINE_ID}/valves"
    routes = [
        {"name": "doctor", "utterances": ["Hello, how are you?", "Good morning"]},
        {"name": "dcot", "utterances": ["Solve this equation step by step"]},
    ]
    saved = {
        **requests.get(url, timeout=10).json(),
        "ROUTES": json.dumps(routes),
        "SHOW_ROUTING_STATUS": False,
    }
    response = requests.post(f"{url}/update", json=saved, timeout=120)
    assert response.status_code == 200, response.text

    server.restart()

    assert requests.get(url, timeout=10).json() == saved
    result = read_stream(server.base_url, {"messages": user(SMALL_TALK)})
    assert_well_formed(result)
    assert result.models == {"doctor"}, "the saved routes are not in force"
    assert result.statuses == [], "the saved SHOW_ROUTING_STATUS is not in force"
