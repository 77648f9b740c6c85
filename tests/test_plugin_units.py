"""Unit tests for the plugin's pure parts: routes, valves, messages, model ids."""

import io
import json
import logging

import pytest
import requests
import yaml
from plugin_loader import REPO, load_plugin
from pydantic import ValidationError

plugin = load_plugin()


def route_yaml(**fields):
    route = {"name": "doctor", "utterances": ["I have a fever"], **fields}
    return yaml.safe_dump({"routes": [route]})


# --- Routes -------------------------------------------------------------------


def test_default_routes_match_valves_file():
    shipped = (REPO / "valves" / "routes.yaml").read_text(encoding="utf-8")
    assert shipped == plugin.DEFAULT_ROUTES_YAML


def test_default_routes_valve_one_line():
    assert "\n" not in plugin.DEFAULT_ROUTES
    assert plugin.Valves().ROUTES == plugin.DEFAULT_ROUTES
    assert plugin.parse_routes(plugin.DEFAULT_ROUTES) == plugin.parse_routes(
        plugin.DEFAULT_ROUTES_YAML
    )


def test_one_line_routes_keep_unicode_and_extra_fields():
    text = route_yaml(threshold=0.5, target="acme/doctor-lora", path="/m/doc")
    text = text.replace("I have a fever", "J'ai de la fièvre 🤒")
    line = plugin.one_line_routes(text)
    assert "\n" not in line
    assert "fièvre 🤒" in line
    assert plugin.parse_routes(line) == plugin.parse_routes(text)


@pytest.mark.parametrize("text", ["{not json", "routes: []", "", "- name: x"])
def test_one_line_routes_leave_invalid_text_alone(text):
    assert plugin.one_line_routes(text) == text


def test_default_routes_cover_both_adapters():
    routes = {r.name: r for r in plugin.parse_routes(plugin.DEFAULT_ROUTES_YAML)}
    assert set(routes) == {"doctor", "dcot"}
    assert routes["doctor"].target == "doctor"
    assert routes["dcot"].target == "dcot"
    assert len(routes["doctor"].utterances) >= 10
    assert len(routes["dcot"].utterances) >= 10


def test_route_target_defaults_to_name():
    (route,) = plugin.parse_routes(route_yaml())
    assert route.target == "doctor"
    assert route.threshold is None
    assert route.utterances == ("I have a fever",)


def test_route_accepts_bare_list_json_and_slash_target():
    text = json.dumps(
        [{"name": "base", "target": "microsoft/phi-2", "utterances": ["hi"]}]
    )
    (route,) = plugin.parse_routes(text)
    assert route.target == "microsoft/phi-2"


def test_route_threshold_is_kept():
    (route,) = plugin.parse_routes(route_yaml(threshold=0.45))
    assert route.threshold == 0.45


def test_route_duplicate_utterances_collapse():
    text = route_yaml(utterances=["a cough", " a cough ", "a rash"])
    (route,) = plugin.parse_routes(text)
    assert route.utterances == ("a cough", "a rash")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("{not json", r"not valid YAML at line 1", id="broken-yaml"),
        pytest.param("", r"ROUTES is empty", id="empty"),
        pytest.param("routes: []", r"ROUTES is empty", id="no-routes"),
        pytest.param("just text", r"must be a list of routes", id="scalar"),
        pytest.param("- doctor", r"route 1: must be a mapping", id="route-not-mapping"),
        pytest.param(
            route_yaml(treshold=0.5), r"route 1: unknown field treshold", id="typo"
        ),
        pytest.param(
            route_yaml(name="has space"), r"route 1: 'name' must be", id="bad-name"
        ),
        pytest.param(
            route_yaml(name="a/b"), r"route 1: 'name' must be", id="slash-in-name"
        ),
        pytest.param(
            route_yaml(utterances=[]),
            r"route 1 \(doctor\): 'utterances' must be a non-empty list",
            id="empty-utterances",
        ),
        pytest.param(
            route_yaml(utterances="fever"),
            r"route 1 \(doctor\): 'utterances' must be a non-empty list",
            id="utterances-not-list",
        ),
        pytest.param(
            route_yaml(utterances=["fever", 42]),
            r"route 1 \(doctor\): utterance 2 must be non-empty text",
            id="utterance-number",
        ),
        pytest.param(
            route_yaml(utterances=["fever", "  "]),
            r"utterance 2 must be non-empty text",
            id="utterance-blank",
        ),
        pytest.param(
            route_yaml(threshold=1.5),
            r"route 1 \(doctor\): 'threshold' must be a number from 0 to 1, got 1.5",
            id="threshold-above-1",
        ),
        pytest.param(
            route_yaml(threshold=-0.1), r"'threshold' must be a number", id="negative"
        ),
        pytest.param(
            route_yaml(threshold=True), r"'threshold' must be a number", id="bool"
        ),
        pytest.param(
            route_yaml(threshold="high"), r"'threshold' must be a number", id="text"
        ),
        pytest.param(
            route_yaml(target="two words"), r"'target' must be the name", id="target"
        ),
        pytest.param(route_yaml(target=""), r"'target' must be the name", id="blank"),
    ],
)
def test_parse_routes_rejects(text, message):
    with pytest.raises(plugin.InvalidRoutes, match=message):
        plugin.parse_routes(text)


def test_parse_routes_rejects_duplicate_names():
    text = yaml.safe_dump(
        [
            {"name": "doctor", "utterances": ["a"]},
            {"name": "doctor", "utterances": ["b"]},
        ]
    )
    with pytest.raises(plugin.InvalidRoutes, match="'doctor' is used more than once"):
        plugin.parse_routes(text)


def test_parse_routes_rejects_utterance_in_two_routes():
    text = yaml.safe_dump(
        [
            {"name": "doctor", "utterances": ["my head hurts"]},
            {"name": "dcot", "utterances": ["my head hurts"]},
        ]
    )
    with pytest.raises(
        plugin.InvalidRoutes, match="in both route doctor and route dcot"
    ):
        plugin.parse_routes(text)


# --- Valves -------------------------------------------------------------------


def test_valves_reject_broken_routes_naming_route_and_field():
    with pytest.raises(ValidationError, match=r"route 1 \(doctor\): 'threshold'"):
        plugin.Valves(ROUTES=route_yaml(threshold=2))


def test_valves_errors_do_not_echo_input():
    secret = "sk-do-not-print-me"
    with pytest.raises(ValidationError) as caught:
        plugin.Valves(ROUTES=secret + " {", VLLM_BASE_URL=secret)
    assert secret not in str(caught.value)


def test_valves_repr_hides_api_key():
    valves = plugin.Valves(VLLM_API_KEY="sk-secret-key")
    assert "sk-secret-key" not in repr(valves)
    assert "sk-secret-key" not in str(valves)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://vllm:8000/v1", "http://vllm:8000/v1"),
        ("http://vllm:8000/v1/", "http://vllm:8000/v1"),
        ("http://vllm:8000", "http://vllm:8000/v1"),
        (" https://llm.example.org/serving/v1 ", "https://llm.example.org/serving/v1"),
    ],
)
def test_valves_normalize_base_url(given, expected):
    assert plugin.Valves(VLLM_BASE_URL=given).VLLM_BASE_URL == expected


@pytest.mark.parametrize("url", ["vllm:8000", "ftp://vllm/v1", "", "http://"])
def test_valves_reject_bad_base_url(url):
    with pytest.raises(ValidationError, match="VLLM_BASE_URL must start with http"):
        plugin.Valves(VLLM_BASE_URL=url)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ROUTER_SCORE_THRESHOLD", 1.2),
        ("ROUTER_SCORE_THRESHOLD", -0.5),
        ("ROUTING_USER_TURNS", 0),
        ("VLLM_CONNECT_TIMEOUT", 0),
        ("VLLM_READ_TIMEOUT", -1),
        ("ROUTER_AGGREGATION", "sum"),
    ],
)
def test_valves_reject_out_of_range(field, value):
    with pytest.raises(ValidationError, match=field):
        plugin.Valves(**{field: value})


@pytest.fixture
def started():
    """Validate valves as updates, as after the Pipelines server has started."""
    plugin.STARTED.set()
    yield
    plugin.STARTED.clear()


def test_valves_reject_unknown_encoder(started):
    with pytest.raises(ValidationError, match="'no-such/model' is not a fastembed"):
        plugin.Valves(ENCODER_MODEL="no-such/model")


@pytest.mark.parametrize(
    "url", ["http://a b:8000/v1", "http://vllm:8000/v1?x=1", "http://vllm/v1#top"]
)
def test_valves_reject_odd_base_url(started, url):
    with pytest.raises(ValidationError, match="must not contain spaces, a query"):
        plugin.Valves(VLLM_BASE_URL=url)


def test_valves_reject_missing_encoder_folder(started, tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(ValidationError, match="ENCODER_LOCAL_DIR .* is not a folder"):
        plugin.Valves(ENCODER_LOCAL_DIR=str(missing))


@pytest.mark.parametrize("key", ["sk-1\u200b", "sk-1\nsk-2", "sk-\x001"])
def test_valves_reject_key_that_header_cannot_carry(started, key):
    with pytest.raises(ValidationError, match="VLLM_API_KEY contains a character"):
        plugin.Valves(VLLM_API_KEY=key)


def test_saved_valves_load_before_start(tmp_path):
    """The Pipelines server exits when the valves it saved fail validation at
    start, so values that fail the update checks still load then."""
    missing = tmp_path / "absent"
    valves = plugin.Valves(
        ENCODER_LOCAL_DIR=str(missing),
        ENCODER_MODEL="no-such/model",
        VLLM_API_KEY="sk-1\u200b",
    )
    assert valves.ENCODER_LOCAL_DIR == str(missing)
    with pytest.raises(plugin.RouterUnavailable, match="ENCODER_LOCAL_DIR .*absent"):
        plugin.load_encoder("sentence-transformers/all-MiniLM-L6-v2", str(missing))


def test_routes_reject_huge_text_before_parsing():
    text = "# " + "x" * plugin.MAX_ROUTES_CHARS
    with pytest.raises(plugin.InvalidRoutes, match="characters long; at most"):
        plugin.parse_routes(text)


def test_routes_reject_surrogate_deep_nesting():
    with pytest.raises(plugin.InvalidRoutes, match="utterance 2 contains half"):
        plugin.parse_routes(
            json.dumps([{"name": "a", "utterances": ["x", "y \ud83d"]}])
        )
    with pytest.raises(plugin.InvalidRoutes, match="nested too deeply"):
        plugin.parse_routes("[" * 3000 + "]" * 3000)


def test_unsendable_key_becomes_message():
    client = plugin.VllmClient("http://127.0.0.1:9/v1", "sk-1\u200b", 1, 1)
    with pytest.raises(plugin.UpstreamUnavailable, match="VLLM_API_KEY contains"):
        client.list_models()
    assert plugin.Valves(VLLM_API_KEY=" sk-1\n").VLLM_API_KEY == "sk-1"


def test_valves_from_env_skip_invalid_values(monkeypatch, caplog):
    monkeypatch.setenv("ROUTER_SCORE_THRESHOLD", "very high")
    monkeypatch.setenv("VLLM_BASE_URL", "http://127.0.0.1:8123")
    monkeypatch.setenv("SHOW_ROUTING_STATUS", "false")
    with caplog.at_level(logging.ERROR, logger="semantic_lora_router"):
        valves = plugin.valves_from_env()
    assert valves.ROUTER_SCORE_THRESHOLD == plugin.Valves().ROUTER_SCORE_THRESHOLD
    assert valves.VLLM_BASE_URL == "http://127.0.0.1:8123/v1"
    assert valves.SHOW_ROUTING_STATUS is False
    assert "ROUTER_SCORE_THRESHOLD is invalid and ignored" in caplog.text
    assert "very high" not in caplog.text


def test_valves_from_env_read_routes_file(monkeypatch, tmp_path):
    routes = tmp_path / "routes.yaml"
    routes.write_text(route_yaml(), encoding="utf-8")
    monkeypatch.delenv("ROUTES", raising=False)
    monkeypatch.setenv("ROUTES_FILE", str(routes))
    loaded = plugin.valves_from_env().ROUTES
    assert "\n" not in loaded
    assert plugin.parse_routes(loaded) == plugin.parse_routes(route_yaml())


def test_valves_from_env_keep_default_routes_when_env_routes_broken(monkeypatch):
    monkeypatch.setenv("ROUTES", "{not json")
    assert plugin.valves_from_env().ROUTES == plugin.DEFAULT_ROUTES


def test_valve_titles_spell_vllm_ttl():
    titles = {
        name: field["title"]
        for name, field in plugin.Valves.model_json_schema()["properties"].items()
    }
    assert titles["VLLM_BASE_URL"] == "vLLM Base URL"
    assert titles["MODEL_LIST_TTL"] == "Model List TTL"
    assert not [title for title in titles.values() if "Vllm" in title or "Ttl" in title]


# --- Messages -----------------------------------------------------------------


def test_message_text_reads_text_parts_only():
    content = [
        {"type": "text", "text": "What is a safe dose"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "of vitamin D?"},
    ]
    assert plugin.message_text(content) == "What is a safe dose\nof vitamin D?"


@pytest.mark.parametrize(
    "content",
    [
        None,
        42,
        {"text": "a dict"},
        [{"type": "image_url", "image_url": {"url": "x"}}],
        [{"type": "text"}, "loose string", None],
    ],
)
def test_message_text_of_odd_content_is_empty(content):
    assert plugin.message_text(content) == ""


def test_recent_user_texts_skip_other_roles():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "look up my last blood test"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "HbA1c 6.9%"},
        {"role": "user", "content": "Is that HbA1c value a sign of diabetes?"},
    ]
    assert plugin.recent_user_texts(messages, 1) == [
        "Is that HbA1c value a sign of diabetes?"
    ]
    assert plugin.recent_user_texts(messages, 5) == [
        "look up my last blood test",
        "Is that HbA1c value a sign of diabetes?",
    ]


def test_recent_user_texts_keep_empty_current_message():
    messages = [
        {"role": "user", "content": "my knee hurts"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
    ]
    assert plugin.recent_user_texts(messages, 3) == ["my knee hurts", ""]


@pytest.mark.parametrize("messages", [None, "text", {}, [None, 3, "user"], []])
def test_recent_user_texts_of_odd_messages_are_empty(messages):
    assert plugin.recent_user_texts(messages, 3) == []


def test_long_message_is_clipped_for_routing():
    text = "symptom " * 25_000  # 200,000 characters
    clipped = plugin.clip_for_routing(text)
    limit = plugin.ROUTING_HEAD_CHARS + plugin.ROUTING_TAIL_CHARS + 5
    assert len(clipped) <= limit
    assert clipped.startswith("symptom")


# --- Models offered -----------------------------------------------------------


def test_served_models_give_routable_ids():
    entries = [
        {"id": "doctor", "parent": "microsoft/phi-2"},
        {"id": "microsoft/phi-2", "parent": None},
        {"id": "dcot", "parent": "microsoft/phi-2"},
    ]
    models = plugin.served_models(entries)
    assert [(m.id, m.name) for m in models] == [
        ("microsoft--phi-2", "microsoft/phi-2"),
        ("doctor", "doctor"),
        ("dcot", "dcot"),
    ]
    assert all("/" not in m.id for m in models)


def test_model_sub_id_avoids_auto_and_clashes():
    assert plugin.model_sub_id("auto", set()) == "auto-2"
    assert plugin.model_sub_id("a/b", {"a--b"}) == "a--b-2"
    assert plugin.model_sub_id("org/name:q4 v2", set()) == "org--name--q4--v2"


# --- Requests to vLLM ---------------------------------------------------------


def test_upstream_payload_drops_open_webui_fields():
    body = {
        "model": "semantic_lora_router.auto",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "user": {"id": "u1", "email": "a@example.org"},
        "chat_id": "c1",
        "metadata": {"task": None},
        "temperature": 0,
        "top_k": 5,
    }
    payload = plugin.upstream_payload(body, "doctor")
    assert payload == {
        "model": "doctor",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "temperature": 0,
        "top_k": 5,
    }
    assert body["model"] == "semantic_lora_router.auto"


def http_response(status, body):
    response = requests.Response()
    response.status_code = status
    response.raw = io.BytesIO(body.encode())
    return response


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            '{"error": {"message": "The model `nurse` does not exist.", '
            '"type": "NotFoundError", "code": 404}}',
            "The model `nurse` does not exist.",
        ),
        ('{"message": "flat body", "type": "x"}', "flat body"),
        ('{"detail": "Not Found"}', "Not Found"),
        ("plain text failure", "plain text failure"),
    ],
)
def test_upstream_error_detail_reads_both_formats(body, expected):
    assert plugin.upstream_error_detail(http_response(404, body)) == expected


class TrickleBody:
    """A response body that hands over a few bytes at a time, like a slow network.

    It offers `stream()`, the urllib3 method that requests reads bodies through.
    """

    def __init__(self, data: bytes, size: int):
        self.data, self.size = data, size

    def stream(self, chunk_size=None, decode_content=True):
        for start in range(0, len(self.data), self.size):
            yield self.data[start : start + self.size]

    def close(self):
        pass


def relay_lines(data: bytes, size: int):
    response = requests.Response()
    response.status_code = 200
    response.raw = TrickleBody(data, size)
    return list(plugin.relay_vllm_stream(response, "doctor", [], "test"))


def sse(chunk):
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()


def test_relay_keeps_characters_split_across_reads():
    text = "头痛 🤕 café"
    delta = {"choices": [{"index": 0, "delta": {"content": text}}]}
    data = sse(delta) + b"data: [DONE]\n\n"
    for size in (1, 2, 3, 5):
        lines = relay_lines(data, size)
        assert lines[-1] == "data: [DONE]"
        content = json.loads(lines[0][5:])["choices"][0]["delta"]["content"]
        assert content == text
        assert "\ufffd" not in "".join(lines)


def test_relay_passes_done_once_and_skips_comments():
    data = b": keep-alive\n\n" + sse({"choices": []}) + b"data: [DONE]\n\n"
    lines = relay_lines(data, 7)
    assert lines == ['data: {"choices": []}', "data: [DONE]"]


def test_relay_reports_a_cut_stream():
    data = sse({"choices": [{"index": 0, "delta": {"content": "Hel"}}]})
    lines = relay_lines(data, 4)
    assert lines.count("data: [DONE]") == 1
    assert "cut off" in lines[-3]
    assert json.loads(lines[-2][5:])["choices"][0]["finish_reason"] == "stop"


def test_sse_stream_is_not_a_generator():
    import types

    stream = plugin.message_stream("doctor", "vLLM is down", [])
    assert not isinstance(stream, types.GeneratorType)
    lines = list(stream)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][5:])["choices"][0]["delta"]["content"] == "vLLM is down"


# --- Conversation-aware routing -------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "And how much of it can I give her?",
        "Is it contagious?",
        "what about for a 3 year old?",
        "But is that safe for him?",
    ],
)
def test_follow_up_detected(text):
    assert plugin.looks_like_follow_up(text)


@pytest.mark.parametrize(
    "text",
    [
        "Write me a poem about autumn leaves",
        "What's the capital of France?",
        "Solve 3x + 7 = 22 step by step",
        "",
        "it " * 20,
    ],
)
def test_new_topic_not_follow_up(text):
    assert not plugin.looks_like_follow_up(text)


def test_route_path_is_parsed():
    (route,) = plugin.parse_routes(route_yaml(path=" /models/nurse "))
    assert route.path == "/models/nurse"


@pytest.mark.parametrize("path", ["", 3, ["a"]])
def test_route_rejects_bad_path(path):
    with pytest.raises(plugin.InvalidRoutes, match=r"'path' must be the adapter"):
        plugin.parse_routes(route_yaml(path=path))


def test_valves_not_given_take_env(monkeypatch):
    monkeypatch.setenv("VLLM_BASE_URL", "http://10.0.0.5:8000")
    monkeypatch.setenv("ROUTER_SCORE_THRESHOLD", "0.55")
    valves = plugin.Valves(ROUTER_SCORE_THRESHOLD=0.3)
    assert valves.VLLM_BASE_URL == "http://10.0.0.5:8000/v1"
    assert valves.ROUTER_SCORE_THRESHOLD == 0.3


def test_valves_from_open_webui_saved_empty_take_env(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "sk-from-env")
    assert plugin.Valves(**{}).VLLM_API_KEY == "sk-from-env"
    assert plugin.Valves(VLLM_API_KEY=None).VLLM_API_KEY == ""
