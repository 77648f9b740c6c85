"""Client-side helpers for the fault, bad-input and load tests.

`read_stream` reads a streamed chat as a client does. It also keeps what a
strict client would reject (lines that are not JSON, a second [DONE]), so that
`assert_well_formed` can check the stream: events first, then chunks, one
finish per choice, and exactly one [DONE] as the last line.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from livechat import AUTO, TEST_ENCODER, TEST_THRESHOLD

from servers import PipelinesServer, start_pipelines

PLUGIN = (
    Path(__file__).resolve().parent.parent / "pipelines" / "semantic_lora_router.py"
)
FAKE_ANSWER = "Fake answer from {model}: 头痛 🤕 café naïve ∑ done"
CUT_NOTE = "[The answer from vLLM was cut off before it finished.]"


def plugin_env(api_base: str, encoder_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "VLLM_BASE_URL": api_base,
        "ENCODER_MODEL": TEST_ENCODER,
        "ENCODER_LOCAL_DIR": str(encoder_dir),
        "ROUTER_SCORE_THRESHOLD": TEST_THRESHOLD,
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def start_plugin_server(tmp_path_factory: Any, env: dict[str, str]) -> PipelinesServer:
    pipelines_dir = tmp_path_factory.mktemp("pipelines")
    (pipelines_dir / PLUGIN.name).write_bytes(PLUGIN.read_bytes())
    return start_pipelines(pipelines_dir, env)


@dataclass
class Stream:
    """One streamed reply as the client saw it, including lines it cannot parse."""

    status_code: int
    events: list[dict[str, Any]] = field(default_factory=list)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[str] = field(default_factory=list)
    done_count: int = 0
    done_last: bool = False
    content_times: list[float] = field(default_factory=list)
    raw: str = ""

    @property
    def text(self) -> str:
        return "".join(
            choice.get("delta", {}).get("content") or ""
            for chunk in self.chunks
            for choice in chunk.get("choices", [])
        )

    @property
    def models(self) -> set[str]:
        return {chunk["model"] for chunk in self.chunks}

    @property
    def finish_reasons(self) -> list[str]:
        return [
            choice["finish_reason"]
            for chunk in self.chunks
            for choice in chunk.get("choices", [])
            if choice.get("finish_reason")
        ]

    @property
    def statuses(self) -> list[str]:
        return [e["event"]["data"]["description"] for e in self.events]


def read_stream(base_url: str, body: dict[str, Any], timeout: float = 60) -> Stream:
    """POST a streaming chat and record every SSE line and when content arrived."""
    body = {"model": AUTO, "stream": True, "max_tokens": 12, **body}
    response = requests.post(
        f"{base_url}/v1/chat/completions", json=body, stream=True, timeout=timeout
    )
    result = Stream(response.status_code)
    buffer = b""
    for piece in response.iter_content(chunk_size=None):
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for raw_line in lines:
            line = raw_line.decode("utf-8")
            result.raw += line + "\n"
            if line.startswith("data:"):
                parse_line(result, line[5:].strip())
    if buffer:
        result.raw += buffer.decode("utf-8")
        parse_line(result, buffer.decode("utf-8")[5:].strip())
    return result


def parse_line(result: Stream, data: str) -> None:
    if data == "[DONE]":
        result.done_count += 1
        result.done_last = True
        return
    result.done_last = False
    try:
        parsed = json.loads(data)
    except ValueError:
        result.bad_lines.append(data)
        return
    if "event" in parsed:
        result.events.append(parsed)
        return
    result.chunks.append(parsed)
    if any(c.get("delta", {}).get("content") for c in parsed.get("choices", [])):
        result.content_times.append(time.monotonic())


def assert_well_formed(result: Stream, choices: int = 1) -> None:
    assert result.status_code == 200
    assert result.bad_lines == []
    assert result.done_count == 1
    assert result.done_last, "[DONE] is not the last line"
    assert len(result.finish_reasons) == choices
    assert "Traceback" not in result.raw


def post_json(base_url: str, body: dict[str, Any], timeout: float = 60):
    body = {"model": AUTO, "stream": False, "max_tokens": 12, **body}
    return requests.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout)
