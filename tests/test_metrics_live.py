"""Prometheus metrics of the router, scraped from a real Pipelines server."""

import re

import pytest
import requests
from livechat import (
    MATH,
    MEDICAL,
    SMALL_TALK,
    get_valves,
    live_valves_env,
    stream_chat,
    update_valves,
    user,
)

from servers import free_port


def metric(text, name, **labels):
    """Return the value of one sample in Prometheus text format, or 0."""
    label_text = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = rf"^{name}{{{label_text}}} ([0-9.e+]+)$" if labels else rf"^{name} (.+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def metrics_server(start_pipelines_server, vllm_server, encoder_dir):
    port = free_port()
    env = live_valves_env(vllm_server.api_base, encoder_dir)
    server = start_pipelines_server(
        {**env, "METRICS_PORT": str(port), "METRICS_HOST": "127.0.0.1"}
    )
    return server, f"http://127.0.0.1:{port}/metrics"


def test_metrics_count_decisions_and_fallbacks(metrics_server):
    server, url = metrics_server
    for question in (MEDICAL, MEDICAL, MATH, SMALL_TALK):
        assert (
            stream_chat(server.base_url, {"messages": user(question)}).done_count == 1
        )

    text = requests.get(url, timeout=10).text
    assert metric(text, "lora_router_decisions_total", route="doctor") == 2
    assert metric(text, "lora_router_decisions_total", route="dcot") == 1
    assert metric(text, "lora_router_decisions_total", route="none") == 1
    assert metric(text, "lora_router_routing_seconds_count") == 4

    valves = get_valves(server)
    routes = '[{"name": "nurse", "utterances": ["how do I change a wound dressing"]}]'
    assert update_valves(server, valves, ROUTES=routes).status_code == 200
    stream_chat(server.base_url, {"messages": user("how do I change a wound dressing")})
    text = requests.get(url, timeout=10).text
    assert metric(text, "lora_router_fallbacks_total", reason="adapter_missing") == 1


def test_metrics_count_upstream_errors(metrics_server):
    server, url = metrics_server
    dead = f"http://127.0.0.1:{free_port()}/v1"
    valves = get_valves(server)
    assert update_valves(server, valves, VLLM_BASE_URL=dead).status_code == 200

    result = stream_chat(server.base_url, {"messages": user(MEDICAL)})
    assert "could not be reached" in result.text
    text = requests.get(url, timeout=10).text
    assert (
        metric(text, "lora_router_upstream_errors_total", kind="UpstreamUnavailable")
        >= 1
    )


def test_metrics_port_moves_and_closes_with_valves(metrics_server):
    server, url = metrics_server
    assert requests.get(url, timeout=10).status_code == 200
    valves = get_valves(server)

    new_port = free_port()
    moved = update_valves(server, valves, METRICS_PORT=new_port)
    assert moved.status_code == 200
    new_url = f"http://127.0.0.1:{new_port}/metrics"
    assert requests.get(new_url, timeout=10).status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=10)

    assert update_valves(server, valves, METRICS_PORT=0).status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(new_url, timeout=10)
    assert f"Prometheus metrics on 127.0.0.1:{new_port} closed" in server.log_tail(200)
