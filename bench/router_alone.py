"""Path 4 of the benchmark: the plugin's router alone, in its own process.

Loads the plugin file, builds its SemanticRouting from the same environment
variables the Pipelines server gets, and times `decide()` on the request mix,
on 64-word messages and on 200,000-character pastes, then with several threads
at once. Prints "ready" after the first decision, then one JSON line with the
results. benchmark.py runs it with the test venv's Python.

    python bench/router_alone.py ROUNDS LONG_SAMPLES CONCURRENCY[,CONCURRENCY...]
"""

import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

STARTED = time.monotonic()

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
sys.path.insert(0, str(BENCH))

from plugin_loader import load_plugin  # noqa: E402
from request_mix import MIX, long_paste, words64  # noqa: E402

WARMUP_DECISIONS = 5


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of `values` (fraction 0.5 is p50)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50_ms": percentile(values, 0.50),
        "p95_ms": percentile(values, 0.95),
        "mean_ms": statistics.fmean(values),
        "max_ms": max(values),
    }


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def timed_decisions(routing: Any, texts: list[str]) -> list[float]:
    elapsed = []
    for text in texts:
        started = time.perf_counter()
        routing.decide(chat(text))
        elapsed.append((time.perf_counter() - started) * 1000)
    return elapsed


def concurrent_decisions(
    routing: Any, texts: list[str], workers: int
) -> dict[str, Any]:
    def one(text: str) -> float:
        started = time.perf_counter()
        routing.decide(chat(text))
        return (time.perf_counter() - started) * 1000

    with ThreadPoolExecutor(max_workers=workers) as pool:
        started = time.perf_counter()
        elapsed = list(pool.map(one, texts))
        wall = time.perf_counter() - started
    return {**summary_ms(elapsed), "decisions_per_s": len(texts) / wall}


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main() -> None:
    rounds, long_samples = int(sys.argv[1]), int(sys.argv[2])
    levels = [int(level) for level in sys.argv[3].split(",")]

    plugin = load_plugin()
    routing = plugin.SemanticRouting.build(plugin.valves_from_env(), None)
    decisions = [routing.decide(chat(text)) for text in MIX]
    cold_start = time.monotonic() - STARTED
    print("ready", flush=True)

    timed_decisions(routing, list(MIX[:WARMUP_DECISIONS]))
    cpu_before = time.process_time()
    mix_ms = timed_decisions(routing, list(MIX) * rounds)
    cpu_per_decision = (time.process_time() - cpu_before) / (len(MIX) * rounds)
    words64_ms = timed_decisions(routing, [words64(i) for i in range(len(MIX))])
    long_ms = timed_decisions(routing, [long_paste(i) for i in range(long_samples)])
    by_concurrency = {
        str(level): concurrent_decisions(routing, list(MIX) * max(2, level // 4), level)
        for level in levels
    }

    result = {
        "cold_start_s": cold_start,
        "targets": [d.route.target if d.route else None for d in decisions],
        "mix": summary_ms(mix_ms),
        "words64": summary_ms(words64_ms),
        "chars200k": summary_ms(long_ms),
        "cpu_s_per_decision": cpu_per_decision,
        "by_concurrency": by_concurrency,
        "rss_bytes": memory_kib("VmRSS") * 1024,
        "peak_rss_bytes": memory_kib("VmHWM") * 1024,
        "pid": os.getpid(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
