"""The fault-injecting upstream speaks real vLLM's wire format.

Each test sends the same request over a raw socket to real vLLM (the vllm_server
fixture) and to FaultUpstream. It then compares the two responses: status,
headers, HTTP chunk framing, SSE framing, JSON encoding, and the shape of every
JSON object (its keys, their order and the value types).
"""

import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from fault_upstream import FaultUpstream, blackhole_listener


@pytest.fixture(scope="module")
def fake():
    with FaultUpstream() as upstream:
        yield upstream


def raw_exchange(base_url: str, method: str, path: str, body: Any = None):
    """Send one HTTP/1.1 request and return (status, headers, chunks or body).

    A chunked body is returned as the list of its HTTP chunks, in order, with the
    terminating empty chunk. Any other body is returned as one bytes object.
    """
    url = urlsplit(base_url)
    data = b"" if body is None else json.dumps(body).encode()
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + data
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk

    head, _, rest = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(status_line.split()[1])
    if headers.get("transfer-encoding") != "chunked":
        return status, headers, rest

    chunks = []
    while True:
        size_text, _, rest = rest.partition(b"\r\n")
        size = int(size_text, 16)
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n", "HTTP chunk not ended by CRLF"
        rest = rest[size + 2 :]
        if size == 0:
            return status, headers, chunks


def shape(value: Any) -> Any:
    """Return the structure of a JSON value: keys in order and value types."""
    if isinstance(value, dict):
        return [(key, shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


STREAM_BODY = {
    "model": "doctor",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "max_tokens": 4,
    "temperature": 0,
    "ignore_eos": True,
}


def stream_parts(base_url: str):
    status, headers, chunks = raw_exchange(
        base_url, "POST", "/v1/chat/completions", STREAM_BODY
    )
    assert status == 200
    return headers, chunks


def test_stream_framing_matches_vllm(vllm_server, fake):
    real_headers, real_chunks = stream_parts(vllm_server.base_url)
    fake_headers, fake_chunks = stream_parts(fake.base_url)

    for name in ("content-type", "transfer-encoding"):
        assert fake_headers[name] == real_headers[name], name
    assert real_chunks[-1] == fake_chunks[-1] == b""
    assert real_chunks[-2] == fake_chunks[-2] == b"data: [DONE]\n\n"
    for chunks in (real_chunks, fake_chunks):
        for chunk in chunks[:-2]:
            assert chunk.startswith(b"data: {"), chunk
            assert chunk.endswith(b"}\n\n"), chunk
            assert chunk.count(b"\n") == 2, "one SSE event per HTTP chunk"
    assert len(fake_chunks) == len(real_chunks)


def test_stream_chunks_have_vllm_fields(vllm_server, fake):
    _, real_chunks = stream_parts(vllm_server.base_url)
    _, fake_chunks = stream_parts(fake.base_url)

    real = [json.loads(chunk[6:]) for chunk in real_chunks[:-2]]
    fake_events = [json.loads(chunk[6:]) for chunk in fake_chunks[:-2]]
    assert [shape(event) for event in fake_events] == [shape(event) for event in real]
    for events in (real, fake_events):
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
        assert len({event["id"] for event in events}) == 1


def test_stream_json_is_compact_like_vllm(vllm_server, fake):
    for base_url in (vllm_server.base_url, fake.base_url):
        _, chunks = stream_parts(base_url)
        for chunk in chunks[:-2]:
            text = chunk[6:-2].decode()
            compact = json.dumps(json.loads(text), separators=(",", ":"))
            assert text == compact, base_url


def test_model_list_matches_vllm(vllm_server, fake):
    real_status, _, real_body = raw_exchange(vllm_server.base_url, "GET", "/v1/models")
    fake_status, _, fake_body = raw_exchange(fake.base_url, "GET", "/v1/models")
    real, fake_list = json.loads(real_body), json.loads(fake_body)

    assert real_status == fake_status == 200
    assert [m["id"] for m in fake_list["data"]] == [m["id"] for m in real["data"]]
    assert [m["parent"] for m in fake_list["data"]] == [
        m["parent"] for m in real["data"]
    ]
    assert [shape(m) for m in fake_list["data"]] == [shape(m) for m in real["data"]]


def test_unknown_model_error_matches_vllm(vllm_server, fake):
    body = {**STREAM_BODY, "model": "no-such-adapter"}
    real_status, real_headers, real_body = raw_exchange(
        vllm_server.base_url, "POST", "/v1/chat/completions", body
    )
    fake_status, fake_headers, fake_body = raw_exchange(
        fake.base_url, "POST", "/v1/chat/completions", body
    )
    real, fake_error = json.loads(real_body), json.loads(fake_body)

    assert real_status == fake_status == 404
    assert fake_headers["content-type"] == real_headers["content-type"]
    assert shape(fake_error) == shape(real)
    assert fake_error["error"]["type"] == real["error"]["type"] == "NotFoundError"
    assert fake_error["error"]["message"] == real["error"]["message"]


def test_json_completion_matches_vllm(vllm_server, fake):
    body = {**STREAM_BODY, "stream": False}
    real_status, _, real_body = raw_exchange(
        vllm_server.base_url, "POST", "/v1/chat/completions", body
    )
    fake_status, _, fake_body = raw_exchange(
        fake.base_url, "POST", "/v1/chat/completions", body
    )
    assert real_status == fake_status == 200
    assert shape(json.loads(fake_body)) == shape(json.loads(real_body))


def test_fault_marker_selects_fault(fake):
    body = {**STREAM_BODY, "messages": [{"role": "user", "content": "[fault:http503]"}]}
    status, _, error = raw_exchange(fake.base_url, "POST", "/v1/chat/completions", body)
    assert status == 503
    assert json.loads(error)["error"]["code"] == 503


def test_cut_fault_ends_without_last_chunk(fake):
    body = {**STREAM_BODY, "max_tokens": None}
    body["messages"] = [{"role": "user", "content": "[fault:cut]"}]
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        response = requests.post(
            f"{fake.api_base}/chat/completions", json=body, stream=True, timeout=10
        )
        b"".join(response.iter_content(None))


def test_utf8_split_fault_splits_characters_across_reads(fake):
    body = {**STREAM_BODY, "max_tokens": None}
    body["messages"] = [{"role": "user", "content": "[fault:utf8_split]"}]
    data = json.dumps(body).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data
    reads = []
    with socket.create_connection(("127.0.0.1", fake.port), timeout=10) as sock:
        sock.sendall(request)
        while piece := sock.recv(65536):
            reads.append(piece)

    def ends_inside_character(piece: bytes) -> bool:
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError as error:
            return error.reason == "unexpected end of data"
        return False

    assert any(map(ends_inside_character, reads)), "no read ended mid-character"
    assert "头痛".encode() in b"".join(reads)


def test_blackhole_listener_times_out_connect():
    with blackhole_listener() as api_base:
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ConnectTimeout):
            requests.get(f"{api_base}/models", timeout=(0.5, 30))
        assert time.monotonic() - started < 5
