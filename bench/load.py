"""Load benchmark: many concurrent streaming chats through the real Pipelines server.

Starts real vLLM (the tiny test model with the doctor and dcot adapters) and a
real Pipelines server with the plugin, then runs CLIENTS concurrent streaming
chats to the auto model for DURATION seconds. The chats rotate through medical,
math and small-talk questions, so all three targets (doctor, dcot, base) answer.

Reports errors (must be 0), completed against started (must be equal), time
to first token p50/p95, and the RSS of the Pipelines process after a warm-up at
the same concurrency and at the end (growth must stay under 10%). Prints one
summary line and writes bench/results/load.md and load.json with a description
of the machine.

    ~/.cache/semantic-lora-router/test-venv/bin/python bench/load.py
    ... bench/load.py --clients 8 --duration 10      # a quick check

The venvs, tiny model and encoder folder are the ones that tests/run builds.
Their paths come from SLR_VLLM_PYTHON, SLR_TINY_MODEL_DIR and SLR_ENCODER_DIR,
or default to tests/run's cache folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from livechat import AUTO, TEST_ENCODER, TEST_THRESHOLD  # noqa: E402

from servers import read_rss_bytes, start_pipelines, start_vllm  # noqa: E402

CACHE = Path(
    os.environ.get("SLR_CACHE_DIR", Path.home() / ".cache" / "semantic-lora-router")
)
RESULTS = REPO / "bench" / "results"

# (question, the vLLM model that must answer it); None means vLLM's base model.
QUESTIONS: list[tuple[str, str | None]] = [
    ("What is a safe daily dose of vitamin D for an adult?", "doctor"),
    ("Solve 3x + 7 = 22 step by step", "dcot"),
    ("Hello, how are you today?", None),
    ("What are the early symptoms of diabetes?", "doctor"),
    ("How many ways can 5 people sit in a row of 5 chairs?", "dcot"),
    ("Tell me something nice about the weekend.", None),
]

# Texts that the plugin puts into a stream when something failed.
FAILURE_TEXTS = (
    "vLLM returned HTTP",
    "could not be reached",
    "did not accept a connection",
    "sent nothing for",
    "cut off before it finished",
    "failed unexpectedly",
    "cannot route",
    "is not served by vLLM",
)


@dataclass
class LoadResult:
    """Counts and timings from the clients, and the Pipelines process's memory."""

    clients: int
    duration_s: float
    max_tokens: int
    started: int = 0
    completed: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    by_model: dict[str, int] = field(default_factory=dict)
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_peak_mib: float = 0.0
    wall_s: float = 0.0

    def percentile(self, values: list[float], share: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    @property
    def rss_growth(self) -> float:
        return self.rss_end_mib / self.rss_start_mib - 1 if self.rss_start_mib else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "duration_s": self.duration_s,
            "max_tokens": self.max_tokens,
            "started": self.started,
            "completed": self.completed,
            "errors": self.errors,
            "chats_per_s": round(self.completed / self.wall_s, 2) if self.wall_s else 0,
            "ttft_p50_ms": round(self.percentile(self.ttft_ms, 0.50), 1),
            "ttft_p95_ms": round(self.percentile(self.ttft_ms, 0.95), 1),
            "total_p50_ms": round(self.percentile(self.total_ms, 0.50), 1),
            "total_p95_ms": round(self.percentile(self.total_ms, 0.95), 1),
            "rss_start_mib": round(self.rss_start_mib, 1),
            "rss_end_mib": round(self.rss_end_mib, 1),
            "rss_peak_mib": round(self.rss_peak_mib, 1),
            "rss_growth_pct": round(100 * self.rss_growth, 1),
            "by_model": dict(sorted(self.by_model.items())),
            "error_examples": self.error_examples[:5],
        }

    def line(self) -> str:
        s = self.summary()
        return (
            f"load: {s['clients']} clients x {s['duration_s']:g} s: "
            f"started {s['started']}, completed {s['completed']}, "
            f"errors {s['errors']}, {s['chats_per_s']} chats/s, "
            f"TTFT p50 {s['ttft_p50_ms']} ms p95 {s['ttft_p95_ms']} ms, "
            f"Pipelines RSS {s['rss_start_mib']} -> {s['rss_end_mib']} MiB "
            f"({s['rss_growth_pct']:+.1f}%)"
        )


async def one_chat(
    session: aiohttp.ClientSession,
    url: str,
    question: str,
    expected: str,
    max_tokens: int,
    result: LoadResult,
) -> None:
    """Stream one chat and record its timings, or why it counts as an error."""
    body = {
        "model": AUTO,
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": question}],
    }
    started = time.perf_counter()
    first_token: float | None = None
    done = finishes = 0
    models: set[str] = set()
    text = ""
    problem = None
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                problem = f"HTTP {response.status}"
            buffer = b""
            async for piece in response.content.iter_any():
                buffer += piece
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    if not raw.startswith(b"data:"):
                        continue
                    data = raw[5:].strip()
                    if data == b"[DONE]":
                        done += 1
                        continue
                    chunk = json.loads(data)
                    if "event" in chunk:
                        continue
                    models.add(chunk.get("model", "?"))
                    for choice in chunk.get("choices", []):
                        content = choice.get("delta", {}).get("content")
                        if content and first_token is None:
                            first_token = time.perf_counter()
                        text += content or ""
                        finishes += bool(choice.get("finish_reason"))
            if buffer.strip() == b"data: [DONE]":
                done += 1
    except (TimeoutError, aiohttp.ClientError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}"

    ended = time.perf_counter()
    result.completed += 1
    if problem is None:
        failure = next((t for t in FAILURE_TEXTS if t in text), None)
        if failure:
            problem = f"the stream says {text.strip()[:160]!r}"
        elif done != 1 or finishes != 1:
            problem = f"{done} [DONE] lines and {finishes} finishes"
        elif models != {expected}:
            problem = f"answered by {sorted(models)}, expected {expected}"
        elif first_token is None:
            problem = "no content"
    if problem:
        result.errors += 1
        result.error_examples.append(problem)
        return
    result.by_model[expected] = result.by_model.get(expected, 0) + 1
    result.total_ms.append((ended - started) * 1000)
    assert first_token is not None
    result.ttft_ms.append((first_token - started) * 1000)


async def drive(
    base_url: str,
    base_model: str,
    clients: int,
    duration: float,
    max_tokens: int,
    pipelines_pid: int | None = None,
) -> LoadResult:
    """Run `clients` chat loops against the Pipelines server for `duration` s.

    No chat starts after the deadline, and every chat that started is read to
    its end (or its 300 s timeout) before this returns.
    """
    result = LoadResult(clients, duration, max_tokens)
    url = f"{base_url}/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=300)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def client(number: int) -> None:
            turn = number
            while time.monotonic() < deadline:
                question, target = QUESTIONS[turn % len(QUESTIONS)]
                turn += 1
                result.started += 1
                await one_chat(
                    session, url, question, target or base_model, max_tokens, result
                )

        async def watch_memory() -> None:
            while pipelines_pid and time.monotonic() < deadline:
                rss = read_rss_bytes(pipelines_pid) / 2**20
                result.rss_peak_mib = max(result.rss_peak_mib, rss)
                await asyncio.sleep(1.0)

        started = time.monotonic()
        deadline = started + duration
        await asyncio.gather(watch_memory(), *(client(i) for i in range(clients)))
        result.wall_s = time.monotonic() - started
    return result


def run_load(
    server: Any, base_model: str, clients: int, duration: float, max_tokens: int
) -> LoadResult:
    """Warm the server up, run the load and measure the server's RSS around it.

    The warm-up runs the same number of clients for a few seconds, so the start
    RSS already includes what that concurrency needs once (worker threads and
    their buffers), and the growth shows what the load adds over time.
    """
    warm_seconds = min(5.0, duration / 2)
    warm = asyncio.run(
        drive(server.base_url, base_model, clients, warm_seconds, max_tokens)
    )
    if warm.errors:
        raise RuntimeError(f"warm-up chats failed: {warm.error_examples[:3]}")
    rss_start = read_rss_bytes(server.pid) / 2**20
    result = asyncio.run(
        drive(server.base_url, base_model, clients, duration, max_tokens, server.pid)
    )
    result.rss_start_mib = rss_start
    result.rss_end_mib = read_rss_bytes(server.pid) / 2**20
    result.rss_peak_mib = max(result.rss_peak_mib, result.rss_end_mib)
    return result


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_kib = 0
    try:
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        memory_kib = int(first.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def write_results(result: LoadResult, host: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    out.with_suffix(".json").write_text(
        json.dumps({"machine": host, "result": summary}, indent=2) + "\n"
    )
    rows = "\n".join(f"| {key} | {value} |" for key, value in summary.items())
    out.with_suffix(".md").write_text(
        "# Load benchmark\n\n"
        "`bench/load.py`: concurrent streaming chats to the auto model through the\n"
        "real Pipelines server with the plugin, to real vLLM (CPU build, tiny test\n"
        "model with the doctor and dcot LoRA adapters), mixed routes.\n\n"
        f"    {result.line()}\n\n"
        f"Machine: {host['cpu']}, {host['cores']} cores, {host['memory_gib']} GiB, "
        f"Python {host['python']}, load average {host['load_average_at_start']} "
        f"at start and {host.get('load_average_at_end', '?')} at the end, "
        f"{host['date_utc']} UTC. vLLM, the Pipelines server and the clients "
        "share these cores, and other jobs may run beside them.\n\n"
        "| measure | value |\n|---|---|\n" + rows + "\n"
    )


def start_servers(log_dir: Path) -> tuple[Any, Any]:
    vllm_python = os.environ.get(
        "SLR_VLLM_PYTHON", str(CACHE / "vllm-venv" / "bin" / "python")
    )
    model_dir = Path(os.environ.get("SLR_TINY_MODEL_DIR", CACHE / "tiny-model"))
    encoder_dir = Path(os.environ.get("SLR_ENCODER_DIR", CACHE / "encoder"))
    vllm = start_vllm(model_dir, log_dir / "vllm", python=vllm_python)
    pipelines_dir = log_dir / "pipelines"
    pipelines_dir.mkdir()
    plugin = REPO / "pipelines" / "semantic_lora_router.py"
    (pipelines_dir / plugin.name).write_bytes(plugin.read_bytes())
    try:
        pipelines = start_pipelines(
            pipelines_dir,
            {
                "VLLM_BASE_URL": vllm.api_base,
                "ENCODER_MODEL": TEST_ENCODER,
                "ENCODER_LOCAL_DIR": str(encoder_dir),
                "ROUTER_SCORE_THRESHOLD": TEST_THRESHOLD,
                "HF_HUB_OFFLINE": "1",
            },
        )
    except BaseException:
        vllm.stop()
        raise
    return vllm, pipelines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent chats")
    parser.add_argument("--duration", type=float, default=120, help="seconds of load")
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="max_tokens of each chat"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "load",
        help="results path without suffix; .md and .json are written",
    )
    args = parser.parse_args()

    host = machine()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="slr-load-") as scratch:
        vllm, pipelines = start_servers(Path(scratch))
        try:
            result = run_load(
                pipelines,
                vllm.served_model_name,
                args.clients,
                args.duration,
                args.max_tokens,
            )
        finally:
            pipelines.stop()
            vllm.stop()

    host["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(result.line())
    for example in result.error_examples[:5]:
        print(f"  error: {example}")
    write_results(result, host, args.out)
    ok = (
        result.errors == 0
        and result.completed == result.started
        and result.rss_growth < 0.10
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
