"""relay_vllm_stream yields the data lines of one network read as one item.

The Pipelines server sends every item of a stream followed by a blank line, so
lines joined by blank lines must reach the client as the same bytes as lines
sent one by one.
"""

import json

import requests
from plugin_loader import load_plugin

plugin = load_plugin()


class ReadsBody:
    """A response body that hands over the given reads, like a network would."""

    def __init__(self, reads: list[bytes]):
        self.reads = reads

    def stream(self, chunk_size=None, decode_content=True):
        yield from self.reads

    def close(self):
        pass


def relay(reads: list[bytes]) -> list[str]:
    response = requests.Response()
    response.status_code = 200
    response.raw = ReadsBody(reads)
    return list(plugin.relay_vllm_stream(response, "doctor", [], "test"))


def sse(content: str) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {"content": content}}]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


def server_bytes(items: list[str]) -> bytes:
    """Return what the Pipelines server sends for data lines: each plus a blank line."""
    return b"".join(f"{item}\n\n".encode() for item in items)


def test_lines_of_one_read_are_one_item():
    data = sse("a") + sse("b") + b"data: [DONE]\n\n"
    items = relay([data])
    assert len(items) == 1
    assert server_bytes(items) == data


def test_reads_make_separate_items():
    reads = [sse("a"), sse("b") + sse("c"), b"data: [DONE]\n\n"]
    items = relay(reads)
    assert len(items) == 3
    assert server_bytes(items) == b"".join(reads)


def test_line_split_across_reads_waits_for_its_end():
    data = sse("a") + sse("héllo") + b"data: [DONE]\n\n"
    cut = len(sse("a")) + 12
    items = relay([data[:cut], data[cut:]])
    assert len(items) == 2
    assert server_bytes(items) == data


def test_comments_and_bad_lines_are_left_out():
    reads = [b": keep-alive\n\n" + sse("a") + b"data: {not json\n\n" + sse("b")]
    items = relay(reads + [b"data: [DONE]\n\n"])
    assert server_bytes(items) == sse("a") + sse("b") + b"data: [DONE]\n\n"
