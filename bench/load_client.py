"""Streaming chat client for the benchmark: time to first token, total time, tokens.

One asyncio client with aiohttp sends the same kind of request to every path, so
the client's own cost is the same for each. The first token is the first streamed
chunk whose delta carries text; Open WebUI status events (the plugin's routing
note) are skipped. The token count is the usage chunk's completion_tokens, which
vLLM sends when the request sets stream_options.include_usage, else the number
of chunks that carried text.
"""

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

# The note the plugin appends when vLLM's stream ended early or was closed; a
# stream that carries it counts as an error.
CUT_OFF_NOTE = "[The answer from vLLM was cut off"


@dataclass
class Sample:
    """One request as the client saw it, with times in seconds from sending it."""

    ttft: float | None
    total: float
    tokens: int
    model: str | None
    error: str | None = None


async def stream_one(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any],
) -> Sample:
    """Send one streaming chat request and read its SSE lines to the end."""
    started = time.perf_counter()
    ttft: float | None = None
    chunks_with_text = 0
    cut_off = False
    usage_tokens: int | None = None
    model: str | None = None
    try:
        async with session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                text = await response.text()
                return Sample(
                    None,
                    time.perf_counter() - started,
                    0,
                    None,
                    f"HTTP {response.status}: {text[:200]}",
                )
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "event" in chunk:
                    continue
                model = chunk.get("model", model)
                usage = chunk.get("usage")
                if isinstance(usage, dict) and "completion_tokens" in usage:
                    usage_tokens = int(usage["completion_tokens"])
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if ttft is None:
                            ttft = time.perf_counter() - started
                        chunks_with_text += 1
                        cut_off = cut_off or CUT_OFF_NOTE in content
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return Sample(
            ttft, time.perf_counter() - started, chunks_with_text, model, error
        )
    tokens = chunks_with_text if usage_tokens is None else usage_tokens
    error = "the stream was cut off before it finished" if cut_off else None
    return Sample(ttft, time.perf_counter() - started, tokens, model, error)


async def run_batch(
    url: str,
    headers: dict[str, str],
    bodies: Sequence[dict[str, Any]],
    concurrency: int,
    timeout: float = 300.0,
) -> tuple[list[Sample], float]:
    """Send `bodies` with `concurrency` requests in flight; return samples and wall
    time in seconds."""
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    samples: list[Sample | None] = [None] * len(bodies)
    next_index = 0

    async with aiohttp.ClientSession(
        connector=connector, timeout=client_timeout
    ) as session:

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(bodies):
                index = next_index
                next_index += 1
                samples[index] = await stream_one(session, url, headers, bodies[index])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return [sample for sample in samples if sample is not None], wall


def send_batch(
    url: str,
    headers: dict[str, str],
    bodies: Sequence[dict[str, Any]],
    concurrency: int,
) -> tuple[list[Sample], float]:
    return asyncio.run(run_batch(url, headers, bodies, concurrency))
