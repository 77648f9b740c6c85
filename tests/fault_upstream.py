"""A stand-in for vLLM's OpenAI API that injects faults real vLLM cannot make on demand.

`FaultUpstream` serves `GET /v1/models`, `POST /v1/chat/completions` (streaming
and not) and `GET /health` on a free 127.0.0.1 port, in vLLM 0.32's wire format.
That format is compact JSON and one `data: {chat.completion.chunk}\\n\\n` event
per HTTP chunk of a chunked response. A final chunk carries `finish_reason`, then
`data: [DONE]` follows. Errors are `{"error": {"message", "type", "param", "code"}}`.
test_fault_upstream.py checks that format against a stream captured from real vLLM.

A chat request gets the fault named in its last message, for example
"[fault:cut] hello", or else the server's `fault` attribute. Faults:

    none        a normal reply
    silent      read the request, then never answer
    http500     HTTP 500 with vLLM's error body
    http503     HTTP 503 with vLLM's error body
    not_found   HTTP 404 "The model `x` does not exist.", as for an unknown adapter
    cut         stop half-way through the stream and close the connection
    malformed   an SSE data line that is not JSON in the middle of the stream
    slow        one token every `slow_interval` seconds (default 1)
    utf8_split  write each event in two network writes that split a multi-byte
                character between them
    leaky500    HTTP 500 whose message repeats the request's Authorization header,
                as a careless proxy in front of vLLM might

`blackhole_listener()` is a port whose TCP handshake never completes, so clients
hit their connect timeout.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"
FAULTS = (
    "none",
    "silent",
    "http500",
    "http503",
    "not_found",
    "cut",
    "malformed",
    "slow",
    "utf8_split",
    "leaky500",
)
FAULT_MARKER = re.compile(r"\[fault:([a-z0-9_]+)\]")
FINGERPRINT = "vllm-0.32.0-fake"

# The reply of every model, one token per list entry. It has 2-, 3- and
# 4-byte UTF-8 characters, so the utf8_split fault has something to split.
DEFAULT_TOKENS = (
    "Fake",
    " answer",
    " from",
    " {model}:",
    " 头痛",
    " 🤕",
    " café",
    " naïve",
    " ∑",
    " done",
)


def vllm_error(
    message: str, error_type: str, code: int, param: str | None = None
) -> bytes:
    """Return an error body as vLLM 0.32 writes it."""
    body = {
        "error": {"message": message, "type": error_type, "param": param, "code": code}
    }
    return json.dumps(body, separators=(",", ":")).encode()


def last_message_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return ""
    last = messages[-1]
    content = last.get("content") if isinstance(last, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text")) for part in content if isinstance(part, dict)
        )
    return ""


class FaultUpstream:
    """A fake vLLM server that serves `base` and the LoRA adapters `adapters`.

    `api_key`, when set, is checked like vLLM's --api-key: a request without
    `Authorization: Bearer <api_key>` gets HTTP 401 {"error": "Unauthorized"}.
    Models in `missing` are listed but answer HTTP 404, like an adapter that
    vLLM unloaded after a client read the list. `chat_requests` records every
    chat body received, and `open_streams` counts chat streams being written.
    """

    def __init__(
        self,
        base: str = "tiny-base",
        adapters: tuple[str, ...] = ("doctor", "dcot"),
        *,
        api_key: str | None = None,
        fault: str = "none",
        models_fault: str = "none",
        slow_interval: float = 1.0,
        tokens: tuple[str, ...] = DEFAULT_TOKENS,
    ) -> None:
        self.base = base
        self.adapters = adapters
        self.api_key = api_key
        self.fault = fault
        self.models_fault = models_fault
        self.slow_interval = slow_interval
        self.tokens = tokens
        self.missing: set[str] = set()
        self.chat_requests: list[dict[str, Any]] = []
        self.open_streams = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_base(self) -> str:
        return self.base_url + "/v1"

    def start(self) -> FaultUpstream:
        upstream = self

        class Handler(FaultHandler):
            server_state = upstream

        self._stopping.clear()
        self._server = ThreadingHTTPServer((HOST, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fault-upstream",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; requests held by the silent fault are released."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def served(self) -> list[str]:
        return [self.base, *self.adapters]

    def reset(self) -> None:
        """Undo what a test changed: faults, missing models, recorded requests."""
        self.fault = self.models_fault = "none"
        self.missing = set()
        self.chat_requests = []

    def fault_for(self, body: dict[str, Any]) -> str:
        match = FAULT_MARKER.search(last_message_text(body))
        fault = match.group(1) if match else self.fault
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known are {', '.join(FAULTS)}")
        return fault

    def wait_stopping(self, seconds: float | None = None) -> bool:
        return self._stopping.wait(seconds)

    def record(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.chat_requests.append(body)

    def count_stream(self, delta: int) -> None:
        with self._lock:
            self.open_streams += delta


class FaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: FaultUpstream

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # the tests read replies, not this server's access log

    # Routing of requests.

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self.path == "/health":
            self.send_bytes(200, b"", "application/json")
        elif self.path == "/v1/models":
            if self.authorized():
                self.models()
        else:
            self.send_bytes(404, b'{"detail":"Not Found"}', "application/json")

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path != "/v1/chat/completions":
            self.send_bytes(404, b'{"detail":"Not Found"}', "application/json")
            return
        if not self.authorized():
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self.send_bytes(
                400,
                vllm_error("invalid JSON", "BadRequestError", 400),
                "application/json",
            )
            return
        if not isinstance(body, dict):
            body = {}
        state = self.server_state
        state.record(body)
        self.chat(body, state.fault_for(body))

    def authorized(self) -> bool:
        key = self.server_state.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self.send_bytes(401, b'{"error":"Unauthorized"}', "application/json")
            return False
        return True

    # Responses.

    def models(self) -> None:
        state = self.server_state
        if state.models_fault == "silent":
            state.wait_stopping()
            return
        if state.models_fault == "http500":
            self.send_error_body(500, "models failed", "InternalServerError")
            return
        created = int(time.time())
        data = [self.model_entry(state.base, None, created, 512)]
        data += [
            self.model_entry(name, state.base, created, None) for name in state.adapters
        ]
        body = json.dumps({"object": "list", "data": data}, separators=(",", ":"))
        self.send_bytes(200, body.encode(), "application/json")

    @staticmethod
    def model_entry(
        name: str, parent: str | None, created: int, max_model_len: int | None
    ) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": f"/models/{name}",
            "parent": parent,
            "max_model_len": max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{uuid.uuid4().hex[:16]}",
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }

    def chat(self, body: dict[str, Any], fault: str) -> None:
        state = self.server_state
        model = str(body.get("model"))
        if fault == "silent":
            state.wait_stopping()
            self.close_connection = True
            return
        if fault in ("http500", "http503", "leaky500"):
            status = 503 if fault == "http503" else 500
            message = "fake upstream failure"
            if fault == "leaky500":
                message += (
                    f"; request had Authorization: {self.headers.get('Authorization')}"
                )
            error_type = (
                "ServiceUnavailableError" if status == 503 else "InternalServerError"
            )
            self.send_error_body(status, message, error_type)
            return
        if (
            fault == "not_found"
            or model in state.missing
            or model not in state.served()
        ):
            self.send_error_body(
                404,
                f"The model `{model}` does not exist. Valid aliases: {state.base}.",
                "NotFoundError",
                param="model",
            )
            return
        if body.get("stream"):
            state.count_stream(+1)
            try:
                self.stream(body, model, fault)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                state.count_stream(-1)
        else:
            self.complete(body, model)

    def answer_tokens(self, body: dict[str, Any], model: str) -> tuple[list[str], str]:
        tokens = [token.replace("{model}", model) for token in self.server_state.tokens]
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(max_tokens, int) and 0 < max_tokens < len(tokens):
            return tokens[:max_tokens], "length"
        return tokens, "stop"

    def complete(self, body: dict[str, Any], model: str) -> None:
        tokens, finish = self.answer_tokens(body, model)
        count = body.get("n") if isinstance(body.get("n"), int) else 1
        choices = [
            {
                "index": index,
                "message": {
                    "role": "assistant",
                    "content": "".join(tokens),
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "token_ids": None,
                "routed_experts": None,
            }
            for index in range(max(count, 1))
        ]
        result = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": FINGERPRINT,
            "usage": {
                "prompt_tokens": 10,
                "total_tokens": 10 + len(tokens),
                "completion_tokens": len(tokens),
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
        data = json.dumps(result, separators=(",", ":"), ensure_ascii=False)
        self.send_bytes(200, data.encode(), "application/json")

    def stream(self, body: dict[str, Any], model: str, fault: str) -> None:
        events = list(stream_events(body, model, *self.answer_tokens(body, model)))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        half = len(events) // 2
        for number, event in enumerate(events):
            if fault == "cut" and number == half:
                # Close without the terminating zero-length chunk: a cut connection.
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if fault == "malformed" and number == half:
                self.write_chunk(
                    b'data: {"id":"chatcmpl-broken","choices":[{"delta":\n\n'
                )
            if fault == "slow" and 0 < number:
                time.sleep(self.server_state.slow_interval)
            data = event.encode()
            if fault == "utf8_split":
                self.write_split(data)
            else:
                self.write_chunk(data)
        self.write_chunk(b"")

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def write_split(self, data: bytes) -> None:
        """Send `data` as one HTTP chunk in two TCP writes, split inside a
        multi-byte UTF-8 character when it has one."""
        cut = next(
            (i for i in range(1, len(data)) if 0x80 <= data[i] < 0xC0), len(data) // 2
        )
        self.wfile.write(b"%x\r\n" % len(data) + data[:cut])
        self.wfile.flush()
        # A pause, so that the two writes leave as separate TCP segments.
        time.sleep(0.02)
        self.wfile.write(data[cut:] + b"\r\n")
        self.wfile.flush()

    def send_error_body(
        self, status: int, message: str, error_type: str, param: str | None = None
    ) -> None:
        data = vllm_error(message, error_type, status, param)
        self.send_bytes(status, data, "application/json")

    def send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


def stream_events(
    body: dict[str, Any], model: str, tokens: list[str], finish: str
) -> Iterator[str]:
    """Yield the SSE events of a streamed reply, each ending in a blank line.

    The field layout follows vLLM 0.32: `prompt_token_ids` and `prompt_text` on
    the first chunk, `token_ids` on each content chunk, and `stop_reason` and
    `system_fingerprint` on the last.
    """
    chunk_id = f"chatcmpl-{uuid.uuid4().hex[:16]}"
    created = int(time.time())
    count = body.get("n") if isinstance(body.get("n"), int) and body["n"] > 0 else 1

    def event(chunk: dict[str, Any]) -> str:
        head = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        text = json.dumps({**head, **chunk}, separators=(",", ":"), ensure_ascii=False)
        return f"data: {text}\n\n"

    for index in range(count):
        yield event(
            {
                "choices": [
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
                "prompt_token_ids": None,
                "prompt_text": None,
            }
        )
    for position, token in enumerate(tokens):
        last = position == len(tokens) - 1
        for index in range(count):
            choice: dict[str, Any] = {
                "index": index,
                "delta": {"content": token},
                "logprobs": None,
                "finish_reason": finish if last else None,
            }
            if last:
                choice["stop_reason"] = None
            choice["token_ids"] = None
            chunk: dict[str, Any] = {"choices": [choice]}
            if last:
                chunk["system_fingerprint"] = FINGERPRINT
            yield event(chunk)
    yield "data: [DONE]\n\n"


@contextlib.contextmanager
def blackhole_listener() -> Iterator[str]:
    """Yield an API base URL whose port never completes a TCP handshake.

    The socket listens with a backlog of 0, and two connections that are never
    accepted fill that queue. So Linux drops further SYNs, and a client's
    connect times out.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind((HOST, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(2):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((HOST, port))
            fillers.append(filler)
        time.sleep(0.1)
        yield f"http://{HOST}:{port}/v1"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
