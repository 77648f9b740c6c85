"""Odd and hostile input: the auto model replies, or states why it cannot.

Requests go through the real Pipelines server to real vLLM, except where a model
name with a slash is needed: then FaultUpstream serves one. The property test at
the end calls pipe() in-process on the plugin loaded as the server loads it.
"""

import json
import re
import statistics

import pytest
import requests
from fault_upstream import FaultUpstream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from livechat import AUTO, MEDICAL, PIPELINE_ID, read_stream, user
from plugin_loader import load_plugin
from streamcheck import (
    FAKE_ANSWER,
    assert_well_formed,
    plugin_env,
    post_json,
    start_plugin_server,
)

SLASHED = "acme/doctor-lora"


@pytest.fixture(scope="module")
def on_vllm(vllm_server, encoder_dir, tmp_path_factory):
    server = start_plugin_server(
        tmp_path_factory, plugin_env(vllm_server.api_base, encoder_dir)
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slashed_upstream():
    with FaultUpstream(adapters=("doctor", "dcot", SLASHED)) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def on_slashed(slashed_upstream, encoder_dir, tmp_path_factory):
    server = start_plugin_server(
        tmp_path_factory, plugin_env(slashed_upstream.api_base, encoder_dir)
    )
    yield server
    server.stop()


def routing_ms(server) -> float:
    """Return the routing time of the newest request in the server's log."""
    lines = [
        line
        for line in server.log_tail(200).splitlines()
        if "semantic_lora_router:request" in line and " ms=" in line
    ]
    return float(re.search(r" ms=([\d.]+)", lines[-1]).group(1))


def test_huge_message_routes_on_bounded_part(on_vllm):
    """A 200,000-character paste is routed on its head and tail only, and costs
    routing about what those 1,200 characters cost alone."""
    sentence = "Patient notes, day 12: blood pressure 128/82, pulse 71, slept well. "
    huge = MEDICAL + " " + (sentence * 3000)[:199_000] + " " + MEDICAL
    huge = huge[:100_000] + huge[-100_000:]
    # What the plugin's routing reads: the first and last 600 characters.
    clipped = f"{huge[:600]} ... {huge[-600:]}"

    timings: dict[str, list[float]] = {"huge": [], "clipped": []}
    statuses: dict[str, set[str]] = {"huge": set(), "clipped": set()}
    for _ in range(3):
        for name, text in (("huge", huge), ("clipped", clipped)):
            result = read_stream(on_vllm.base_url, {"messages": user(text)})
            assert_well_formed(result)
            timings[name].append(routing_ms(on_vllm))
            statuses[name].add(result.statuses[0])

    assert len(huge) == 200_000
    assert statuses["huge"] == statuses["clipped"]
    huge_ms = statistics.median(timings["huge"])
    clipped_ms = statistics.median(timings["clipped"])
    assert huge_ms < 2 * clipped_ms + 5, f"routing ms: {timings}"

    # The tiny test model takes 512 tokens, so vLLM rejects the paste with a reason.
    big = read_stream(on_vllm.base_url, {"messages": user(huge)})
    assert "vLLM returned HTTP 400" in big.text


def test_invalid_utf8_body_is_rejected_readably(on_vllm):
    body = (
        b'{"model": "' + AUTO.encode() + b'", "stream": true, "messages": '
        b'[{"role": "user", "content": "caf\xe9 \xff\xfe"}]}'
    )
    response = requests.post(
        f"{on_vllm.base_url}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert 400 <= response.status_code < 500
    assert "detail" in response.json()
    assert "Traceback" not in response.text
    assert_well_formed(read_stream(on_vllm.base_url, {"messages": user(MEDICAL)}))


def test_lone_surrogate_gets_an_answer(on_vllm):
    """JSON may escape half a UTF-16 pair: valid JSON, invalid Unicode."""
    body = json.dumps(
        {
            "model": AUTO,
            "stream": True,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "fever \\ud83d and cough"}],
        }
    ).replace("\\\\ud83d", "\\ud83d")
    response = requests.post(
        f"{on_vllm.base_url}/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    text = response.content.decode("utf-8")
    assert text.rstrip().endswith("data: [DONE]")
    assert text.count("data: [DONE]") == 1
    assert "Traceback" not in text
    assert "failed unexpectedly" not in text


def test_null_content_is_refused_with_422(on_vllm):
    messages = [{"role": "user", "content": None}]
    response = post_json(on_vllm.base_url, {"messages": messages})
    assert response.status_code == 422
    assert "content" in response.text


def test_unknown_role_gets_an_answer(on_vllm):
    messages = [
        {"role": "wizard", "content": "You speak in riddles."},
        {"role": "user", "content": MEDICAL},
    ]
    result = read_stream(on_vllm.base_url, {"messages": messages})
    assert_well_formed(result)
    assert result.statuses[0].startswith("doctor,")
    assert result.text.strip()


def test_no_messages_gets_an_answer(on_vllm):
    result = read_stream(on_vllm.base_url, {"messages": []})
    assert_well_formed(result)
    assert "no text to route" in result.statuses[0]
    assert result.text.strip()


def test_several_choices_stream_each_to_the_end(on_vllm):
    body = {"messages": user(MEDICAL), "n": 2, "temperature": 0.8, "seed": 7}
    result = read_stream(on_vllm.base_url, body)
    assert_well_formed(result, choices=2)
    indexes = {c["index"] for chunk in result.chunks for c in chunk["choices"]}
    assert indexes == {0, 1}

    response = post_json(on_vllm.base_url, body)
    assert response.status_code == 200
    assert len(response.json()["choices"]) == 2


@pytest.mark.parametrize("model", ["gpt-4o", f"{PIPELINE_ID}.gpt-4o"])
def test_model_not_in_manifold_is_404(on_vllm, model):
    for stream in (True, False):
        response = requests.post(
            f"{on_vllm.base_url}/v1/chat/completions",
            json={"model": model, "stream": stream, "messages": user("hi")},
            timeout=30,
        )
        assert response.status_code == 404
        assert "gpt-4o" in response.json()["detail"]


def valves_url(server) -> str:
    return f"{server.base_url}/{PIPELINE_ID}/valves"


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        pytest.param(
            "- {name: doctor, utterances: [fever]}\n"
            "- {name: doctor, utterances: [cough]}\n",
            "route name 'doctor' is used more than once",
            id="duplicate-names",
        ),
        pytest.param(
            "- {name: doctor, utterances: []}\n",
            "route 1 (doctor): 'utterances' must be a non-empty list",
            id="empty-utterances",
        ),
        pytest.param(
            "- {name: doctor, utterances: [fever, '  ']}\n",
            "route 1 (doctor): utterance 2 must be non-empty text",
            id="blank-utterance",
        ),
        pytest.param(
            "- {name: doctor, threshold: -0.1, utterances: [fever]}\n",
            "'threshold' must be a number from 0 to 1, got -0.1",
            id="threshold-below-0",
        ),
        pytest.param(
            "- {name: doctor, threshold: 1.5, utterances: [fever]}\n",
            "'threshold' must be a number from 0 to 1, got 1.5",
            id="threshold-above-1",
        ),
    ],
)
def test_bad_routes_are_rejected_and_old_kept(on_vllm, routes, message):
    saved = requests.get(valves_url(on_vllm), timeout=10).json()
    response = requests.post(
        f"{valves_url(on_vllm)}/update", json={**saved, "ROUTES": routes}, timeout=60
    )
    assert response.status_code == 500
    assert message in response.json()["detail"]
    assert requests.get(valves_url(on_vllm), timeout=10).json() == saved
    result = read_stream(on_vllm.base_url, {"messages": user(MEDICAL)})
    assert result.models == {"doctor"}


def test_route_target_with_slash_reaches_vllm(on_slashed, slashed_upstream):
    saved = requests.get(valves_url(on_slashed), timeout=10).json()
    routes = [
        {"name": "doctor", "target": SLASHED, "utterances": [MEDICAL, "fever"]},
        {"name": "dcot", "utterances": ["Solve this equation step by step"]},
    ]
    response = requests.post(
        f"{valves_url(on_slashed)}/update",
        json={**saved, "ROUTES": json.dumps(routes)},
        timeout=60,
    )
    assert response.status_code == 200, response.text

    result = read_stream(on_slashed.base_url, {"messages": user(MEDICAL)})
    assert_well_formed(result)
    assert result.models == {SLASHED}
    assert result.text == FAKE_ANSWER.format(model=SLASHED)
    assert result.statuses[0].startswith(f"{SLASHED} (route doctor),")
    assert slashed_upstream.chat_requests[-1]["model"] == SLASHED

    listed = requests.get(
        f"{on_slashed.api_base}/models", headers=on_slashed.auth_headers(), timeout=10
    ).json()["data"]
    by_hand = f"{PIPELINE_ID}.acme--doctor-lora"
    assert by_hand in [model["id"] for model in listed]
    picked = read_stream(
        on_slashed.base_url, {"model": by_hand, "messages": user("hi")}
    )
    assert picked.models == {SLASHED}


# --- Property: pipe() never raises and always returns a well-formed reply ------


@pytest.fixture(scope="module")
def pipeline(encoder_dir):
    upstream = FaultUpstream(adapters=("doctor", "dcot", SLASHED)).start()
    env = plugin_env(upstream.api_base, encoder_dir, VLLM_READ_TIMEOUT="5")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        plugin = load_plugin()
        pipeline = plugin.Pipeline()
        pipeline.apply_valves()
    assert pipeline.routing is not None, pipeline.routing_error
    yield pipeline
    upstream.stop()


FAULT_PREFIXES = ["", "[fault:cut] ", "[fault:malformed] ", "[fault:http500] "]
FAULT_PREFIXES += ["[fault:not_found] ", "[fault:utf8_split] ", "[fault:leaky500] "]

texts = st.one_of(
    st.text(max_size=200),
    st.sampled_from([MEDICAL, "Solve 3x + 7 = 22", "", "   ", "\x00", "\ud83d"]),
    st.builds(lambda n: "fever " * n, st.integers(0, 3000)),
)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.just({"url": "data:,"})}
    ),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.integers(),
    st.none(),
)
contents = st.one_of(
    texts,
    st.none(),
    st.lists(parts, max_size=4),
    st.integers(),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
roles = st.sampled_from(["user", "assistant", "system", "tool", "wizard", "", None, 3])
message = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": contents}),
    st.fixed_dictionaries({"role": roles}),
    st.text(max_size=10),
    st.none(),
)
conversations = st.one_of(
    st.lists(message, max_size=6),
    st.none(),
    st.text(max_size=10),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
extras = st.fixed_dictionaries(
    {},
    optional={
        "n": st.sampled_from([1, 2]),
        "temperature": st.sampled_from([0, 0.7]),
        "max_tokens": st.sampled_from([1, 3, None]),
        "metadata": st.sampled_from([{"task": "title_generation"}, {}, "x"]),
        "user": st.just({"id": "u1", "name": "Ada", "role": "user"}),
    },
)


def with_fault(messages, prefix: str):
    """Put a fault marker in front of the last message's text, if it has text."""
    if prefix and isinstance(messages, list) and messages:
        last = messages[-1]
        if isinstance(last, dict) and isinstance(last.get("content"), str):
            messages[-1] = {**last, "content": prefix + last["content"]}
    return messages


def last_user_text(messages):
    if not isinstance(messages, list):
        return None
    for entry in reversed(messages):
        if isinstance(entry, dict) and entry.get("role") == "user":
            content = entry.get("content")
            return content if isinstance(content, str) else None
    return None


def check_stream(items: list) -> None:
    """Assert the items a streaming pipe() yielded form one well-formed stream."""
    strings = [i for i, item in enumerate(items) if isinstance(item, str)]
    events = [i for i, item in enumerate(items) if isinstance(item, dict)]
    assert len(strings) + len(events) == len(items), items
    assert strings, "no data lines"
    assert not events or max(events) < min(strings), "an event after the data"
    for event in (items[i] for i in events):
        assert event["event"]["type"] == "status"
        assert isinstance(event["event"]["data"]["description"], str)

    lines = [items[i] for i in strings]
    assert lines[-1] == "data: [DONE]"
    assert lines.count("data: [DONE]") == 1
    finishes = 0
    for line in lines[:-1]:
        assert line.startswith("data: "), line
        chunk = json.loads(line[6:])
        assert chunk["object"] == "chat.completion.chunk"
        assert isinstance(chunk["choices"], list)
        finishes += sum(1 for c in chunk["choices"] if c.get("finish_reason"))
    assert finishes >= 1, "no choice finished"


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    messages=conversations,
    fault=st.sampled_from(FAULT_PREFIXES),
    stream=st.booleans(),
    model_id=st.sampled_from(["auto", "doctor", "tiny-base", "acme--doctor-lora", "x"]),
    extra=extras,
)
def test_pipe_always_returns_well_formed_reply(
    pipeline, messages, fault, stream, model_id, extra
):
    from fastapi import HTTPException

    messages = with_fault(messages, fault)
    body = {"model": f"{PIPELINE_ID}.{model_id}", **extra}
    body.update(messages=messages, stream=stream)
    try:
        result = pipeline.pipe(last_user_text(messages), model_id, messages, body)
    except HTTPException as error:
        assert not stream, "a streaming pipe() raised"
        assert 400 <= error.status_code < 600
        assert isinstance(error.detail, str) and error.detail
        assert "Traceback" not in error.detail
        return

    if stream:
        check_stream(list(result))
    else:
        assert isinstance(result, dict)
        assert result["object"] == "chat.completion"
        assert result["choices"]


def test_property_runs_against_live_fake(pipeline):
    """The property test above reaches the fake upstream, not an error path only."""
    body = {"stream": True, "messages": user(MEDICAL)}
    result = list(pipeline.pipe(MEDICAL, "auto", user(MEDICAL), body))
    check_stream(result)
    lines = [line for line in result if isinstance(line, str)][:-1]
    assert {json.loads(line[6:])["model"] for line in lines} == {"doctor"}
