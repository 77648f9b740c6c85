"""Helpers for live tests: chat through the Pipelines server, parse its stream."""

import json
import time
from dataclasses import dataclass, field
from typing import Any

import requests

PIPELINE_ID = "semantic_lora_router"
AUTO = f"{PIPELINE_ID}.auto"
TEST_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
# all-MiniLM-L6-v2 separates the default routes from small talk at about 0.4.
TEST_THRESHOLD = "0.4"

MEDICAL = "What is a safe daily dose of vitamin D for an adult?"
MATH = "Solve 3x + 7 = 22 step by step"
SMALL_TALK = "Hello, how are you today?"


def user(text: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@dataclass
class StreamResult:
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
        return {chunk["model"] for chunk in self.chunks if "model" in chunk}

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
        return [
            event["event"]["data"]["description"]
            for event in self.events
            if event.get("event", {}).get("type") == "status"
        ]

    def add_raw_line(self, line: str) -> None:
        """Record one line of the response body; parse it if it is a data line."""
        self.raw += line
        if line.startswith("data:"):
            self.add_data(line[5:].strip())

    def add_data(self, data: str) -> None:
        """Record the payload of one SSE data line."""
        if data == "[DONE]":
            self.done_count += 1
            self.done_last = True
            return
        self.done_last = False
        try:
            parsed = json.loads(data)
        except ValueError:
            self.bad_lines.append(data)
            return
        if "event" in parsed:
            self.events.append(parsed)
            return
        self.chunks.append(parsed)
        if any(c.get("delta", {}).get("content") for c in parsed.get("choices", [])):
            self.content_times.append(time.monotonic())


def read_stream(
    base_url: str, body: dict[str, Any], timeout: float = 60
) -> StreamResult:
    """POST a streaming chat and record every SSE line and when content arrived."""
    body = {"model": AUTO, "stream": True, "max_tokens": 12, **body}
    response = requests.post(
        f"{base_url}/v1/chat/completions", json=body, stream=True, timeout=timeout
    )
    result = StreamResult(response.status_code)
    buffer = b""
    for piece in response.iter_content(chunk_size=None):
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            result.add_raw_line(line.decode("utf-8") + "\n")
    if buffer:  # the last line may have no line break: "data: [DONE]" has none
        result.add_raw_line(buffer.decode("utf-8"))
    return result


def stream_chat(
    base_url: str, body: dict[str, Any], timeout: float = 60
) -> StreamResult:
    """Stream a greedy chat and fail on any data line that is not JSON."""
    result = read_stream(base_url, {"temperature": 0, **body}, timeout)
    assert result.bad_lines == [], f"data lines that are not JSON: {result.bad_lines}"
    return result


def complete_chat(
    base_url: str, body: dict[str, Any], timeout: float = 60
) -> requests.Response:
    body = {"model": AUTO, "stream": False, "temperature": 0, "max_tokens": 12, **body}
    return requests.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout)


def direct_text(vllm_api_base: str, model: str, messages: list[dict[str, Any]]) -> str:
    """Return vLLM's greedy answer from `model`, asked directly."""
    response = requests.post(
        f"{vllm_api_base}/chat/completions",
        json={"model": model, "messages": messages, "temperature": 0, "max_tokens": 12},
        timeout=60,
    )
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def live_valves_env(vllm_api_base: str, encoder_dir: Any) -> dict[str, str]:
    """Return the environment that points the plugin at test vLLM and encoder."""
    return {
        "VLLM_BASE_URL": vllm_api_base,
        "ENCODER_MODEL": TEST_ENCODER,
        "ENCODER_LOCAL_DIR": str(encoder_dir),
        "ROUTER_SCORE_THRESHOLD": TEST_THRESHOLD,
        "HF_HUB_OFFLINE": "1",
    }


def valves_url(server: Any) -> str:
    return f"{server.base_url}/{PIPELINE_ID}/valves"


def get_valves(server: Any) -> dict[str, Any]:
    response = requests.get(valves_url(server), timeout=10)
    response.raise_for_status()
    return response.json()


def update_valves(
    server: Any, valves: dict[str, Any], **changes: Any
) -> requests.Response:
    """POST the whole valve set with `changes`, as Open WebUI does."""
    return requests.post(
        f"{valves_url(server)}/update", json={**valves, **changes}, timeout=60
    )
