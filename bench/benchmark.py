"""Benchmark the auto model against direct vLLM and a LiteLLM proxy, in one run.

Starts one real vLLM (the tiny test model with the doctor and dcot adapters),
the real Pipelines server with the plugin, and a LiteLLM proxy whose pre-call
hook routes with semantic-router (bench/litellm_route_hook.py), all on
127.0.0.1. Every path gets the same request mix (bench/request_mix.py) at each
concurrency level:

1. direct: straight to vLLM, to the model that auto would pick;
2. pipelines: model semantic_lora_router.auto through the Pipelines server;
3. litellm: model auto through the LiteLLM proxy;
4. router: the plugin's SemanticRouting alone, in its own process.

Writes results.json, benchmark.md and benchmark.png to the output folder. Run it
through bench/run, which builds the venvs and sets the variables below.

Environment: SLR_VLLM_PYTHON, SLR_TINY_MODEL_DIR, SLR_ENCODER_DIR (as tests/run
sets them) and SLR_LITELLM_PYTHON (the LiteLLM venv's Python).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
from livechat import PIPELINE_ID, TEST_ENCODER, TEST_THRESHOLD  # noqa: E402
from load_client import Sample, send_batch  # noqa: E402
from request_mix import MIX  # noqa: E402

from servers import (  # noqa: E402
    HOST,
    ServerProcess,
    find_descendants,
    free_port,
    start_pipelines,
    start_vllm,
)

PLUGIN_PATH = REPO / "pipelines" / "semantic_lora_router.py"
BASE_MODEL = "tiny-base"
LITELLM_STARTUP_TIMEOUT = 180.0


@dataclass(frozen=True)
class Size:
    """How much work one run does."""

    levels: tuple[int, ...]
    requests: dict[int, int]  # requests per path at each concurrency level
    max_tokens: int
    router_rounds: int  # passes over the mix when timing the router alone
    long_samples: int  # 200,000-character messages timed
    warmup: int  # untimed requests per path before the first level


FULL = Size(
    levels=(1, 8, 32, 64),
    requests={1: 48, 8: 96, 32: 160, 64: 256},
    max_tokens=32,
    router_rounds=5,
    long_samples=30,
    warmup=6,
)
SMOKE = Size(
    levels=(1, 8),
    requests={1: 4, 8: 8},
    max_tokens=8,
    router_rounds=1,
    long_samples=3,
    warmup=1,
)


@dataclass
class ChatPath:
    """One way to reach vLLM: its URL, headers, and the model each request names."""

    name: str
    url: str
    headers: dict[str, str]
    model_for: Callable[[int], str]
    server: ServerProcess | None = None  # the routing process, if any
    results: dict[str, Any] = field(default_factory=dict)


def cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds of a process and its descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for process in [pid, *find_descendants(pid)]:
        try:
            stat = Path(f"/proc/{process}/stat").read_text(encoding="ascii")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def percentile(values: list[float], fraction: float) -> float | None:
    """Return the nearest-rank percentile of `values`, or None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def request_body(model: str, index: int, size: Size) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": MIX[index % len(MIX)]}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": size.max_tokens,
        "temperature": 0,
        # vLLM's sampling option: every answer has max_tokens tokens, so the
        # paths generate the same amount of text.
        "ignore_eos": True,
    }


def summarize(
    samples: list[Sample], wall: float, cpu: float | None, expected: list[str]
) -> dict[str, Any]:
    """Reduce one batch to the numbers in the report (times in ms)."""
    good = [sample for sample in samples if sample.error is None]
    ttfts = [s.ttft * 1000 for s in good if s.ttft is not None]
    totals = [s.total * 1000 for s in good]
    tokens = sum(s.tokens for s in good)
    mismatches = sum(
        1
        for sample, model in zip(samples, expected, strict=True)
        if sample.model is not None and sample.model.split("/")[-1] != model
    )
    errors = [s.error for s in samples if s.error is not None]
    return {
        "requests": len(samples),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "ttft_p50_ms": percentile(ttfts, 0.50),
        "ttft_p95_ms": percentile(ttfts, 0.95),
        "total_p50_ms": percentile(totals, 0.50),
        "total_p95_ms": percentile(totals, 0.95),
        "tokens_per_request": tokens / len(good) if good else 0.0,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "wall_s": wall,
        "cpu_s_per_request": None if cpu is None else cpu / len(samples),
        "model_mismatches": mismatches,
    }


def run_level(
    path: ChatPath,
    level: int,
    offset: int,
    size: Size,
    targets: list[str],
    vllm_pid: int | None,
) -> dict[str, Any]:
    """Send one batch through `path` at concurrency `level` and summarize it.

    `vllm_pid` is the vLLM server's PID when this run started it, so that
    vLLM's own CPU time per request is reported beside the routing process's.
    """
    count = size.requests[level]
    indexes = [offset + i for i in range(count)]
    bodies = [request_body(path.model_for(i), i, size) for i in indexes]
    expected = [targets[i % len(MIX)] for i in indexes]
    pid = path.server.pid if path.server is not None else None
    cpu_before = cpu_seconds(pid) if pid else 0.0
    vllm_before = cpu_seconds(vllm_pid) if vllm_pid else 0.0
    load_before = os.getloadavg()[0]

    samples, wall = send_batch(path.url, path.headers, bodies, level)

    cpu = cpu_seconds(pid) - cpu_before if pid else None
    result = summarize(samples, wall, cpu, expected)
    result["load_1min"] = load_before
    result["vllm_cpu_s_per_request"] = (
        (cpu_seconds(vllm_pid) - vllm_before) / count if vllm_pid else None
    )
    return result


def first_answer_seconds(path: ChatPath, started: float, size: Size) -> float:
    """Return seconds from `started` to the first content token of one request."""
    sent = time.monotonic()
    samples, _ = send_batch(
        path.url, path.headers, [request_body(path.model_for(0), 0, size)], 1
    )
    sample = samples[0]
    if sample.error is not None or sample.ttft is None:
        raise RuntimeError(f"{path.name}: the first request failed: {sample.error}")
    return sent - started + sample.ttft


# --- Servers ------------------------------------------------------------------


def valves_env(vllm_api_base: str, encoder_dir: str) -> dict[str, str]:
    return {
        "VLLM_BASE_URL": vllm_api_base,
        "ENCODER_MODEL": TEST_ENCODER,
        "ENCODER_LOCAL_DIR": encoder_dir,
        "ROUTER_SCORE_THRESHOLD": TEST_THRESHOLD,
        "HF_HUB_OFFLINE": "1",
    }


def start_litellm(
    python: str, workdir: Path, vllm_api_base: str, env: dict[str, str]
) -> ServerProcess:
    """Start a LiteLLM proxy with the routing hook and one deployment per model."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(BENCH / "litellm_route_hook.py", workdir / "litellm_route_hook.py")
    models = {
        "auto": BASE_MODEL,
        BASE_MODEL: BASE_MODEL,
        "doctor": "doctor",
        "dcot": "dcot",
    }
    lines = ["model_list:"]
    for name, served in models.items():
        lines += [
            f"  - model_name: {name}",
            "    litellm_params:",
            f"      model: hosted_vllm/{served}",
            f"      api_base: {vllm_api_base}",
        ]
    lines += [
        "litellm_settings:",
        "  callbacks: litellm_route_hook.proxy_handler_instance",
    ]
    config = workdir / "config.yaml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    port = free_port()
    server_env = {
        **os.environ,
        **env,
        "SLR_PLUGIN_PATH": str(PLUGIN_PATH),
        "SLR_DEFAULT_MODEL": BASE_MODEL,
        # Read the model price list from the package, not from the internet.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
    }
    litellm = Path(python).parent / "litellm"
    command = [
        str(litellm),
        "--config",
        str(config),
        "--host",
        HOST,
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    server = ServerProcess(
        "LiteLLM",
        command,
        port=port,
        env=server_env,
        log_path=workdir / "litellm.log",
        health_path="/health/liveliness",
        startup_timeout=LITELLM_STARTUP_TIMEOUT,
        cwd=workdir,
    )
    return server.start()


def run_router_alone(size: Size, env: dict[str, str]) -> dict[str, Any]:
    """Run path 4 in a child process; return its results with its cold start."""
    command = [
        sys.executable,
        str(BENCH / "router_alone.py"),
        str(size.router_rounds),
        str(size.long_samples),
        ",".join(str(level) for level in size.levels),
    ]
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    ready = process.stdout.readline().strip()
    ready_at = time.monotonic()
    output = process.stdout.read()
    if process.wait() != 0 or ready != "ready":
        raise RuntimeError(f"router_alone.py failed (exit {process.returncode})")
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    result["first_decision_s"] = ready_at - started
    return result


# --- Run ----------------------------------------------------------------------


def run(size: Size, work_dir: Path, vllm_api_base: str | None) -> dict[str, Any]:
    """Start the servers, measure every path, stop the servers; return the results.

    With `vllm_api_base`, the benchmark uses that running vLLM (the tiny model
    with its adapters) instead of starting one, and reports no vLLM cold start.
    """
    started_at = time.time()
    load_start = os.getloadavg()
    encoder_dir = os.environ["SLR_ENCODER_DIR"]
    litellm_python = os.environ["SLR_LITELLM_PYTHON"]

    servers: list[ServerProcess] = []
    vllm: ServerProcess | None = None
    direct_cold: dict[str, float | None] = {"healthy_s": None, "first_answer_s": None}
    try:
        if vllm_api_base is None:
            print("bench: starting vLLM", flush=True)
            vllm_started = time.monotonic()
            vllm = start_vllm(Path(os.environ["SLR_TINY_MODEL_DIR"]), work_dir / "vllm")
            servers.append(vllm)
            vllm_api_base = vllm.base_url + "/v1"
            direct_cold["healthy_s"] = time.monotonic() - vllm_started
            direct_cold["first_answer_s"] = first_answer_seconds(
                ChatPath(
                    "direct",
                    f"{vllm_api_base}/chat/completions",
                    {},
                    lambda i: BASE_MODEL,
                ),
                vllm_started,
                size,
            )
        env = valves_env(vllm_api_base, encoder_dir)
        vllm_pid = vllm.pid if vllm is not None else None

        print("bench: timing the router alone (path 4)", flush=True)
        router = run_router_alone(size, env)
        targets = [target or BASE_MODEL for target in router["targets"]]

        direct = ChatPath(
            "direct",
            f"{vllm_api_base}/chat/completions",
            {},
            lambda i: targets[i % len(MIX)],
        )

        print("bench: starting Pipelines", flush=True)
        pipelines_dir = work_dir / "pipelines"
        pipelines_dir.mkdir(parents=True)
        shutil.copy(PLUGIN_PATH, pipelines_dir / PLUGIN_PATH.name)
        pipelines_started = time.monotonic()
        pipelines = start_pipelines(pipelines_dir, env)
        servers.append(pipelines)
        pipelines_healthy_s = time.monotonic() - pipelines_started
        auto = ChatPath(
            "pipelines",
            f"{pipelines.api_base}/chat/completions",
            pipelines.auth_headers(),
            lambda i: f"{PIPELINE_ID}.auto",
            pipelines,
        )
        pipelines_first_s = first_answer_seconds(auto, pipelines_started, size)

        print("bench: starting LiteLLM", flush=True)
        litellm_started = time.monotonic()
        litellm = start_litellm(
            litellm_python, work_dir / "litellm", vllm_api_base, env
        )
        servers.append(litellm)
        litellm_healthy_s = time.monotonic() - litellm_started
        proxy = ChatPath(
            "litellm",
            f"{litellm.base_url}/v1/chat/completions",
            {},
            lambda i: "auto",
            litellm,
        )
        litellm_first_s = first_answer_seconds(proxy, litellm_started, size)

        # The Pipelines server and the plugin without routing: each request
        # names the model that auto would pick, as the direct path does.
        fixed = ChatPath(
            "pipelines_fixed",
            auto.url,
            auto.headers,
            lambda i: f"{PIPELINE_ID}.{targets[i % len(MIX)]}",
            pipelines,
        )

        paths = [direct, auto, proxy]
        for path in [*paths, fixed]:
            send_batch(
                path.url,
                path.headers,
                [request_body(path.model_for(i), i, size) for i in range(size.warmup)],
                1,
            )

        offset = 0
        for round_number, level in enumerate(size.levels):
            # Rotate the order so no path always runs first after a pause.
            order = paths[round_number % 3 :] + paths[: round_number % 3]
            for path in order:
                print(f"bench: {path.name} at concurrency {level}", flush=True)
                path.results[str(level)] = run_level(
                    path, level, offset, size, targets, vllm_pid
                )
            offset += size.requests[level]
        print("bench: pipelines_fixed at concurrency 1", flush=True)
        fixed.results["1"] = run_level(fixed, 1, 0, size, targets, vllm_pid)

        results = {
            "started_at": started_at,
            "duration_s": time.time() - started_at,
            "size": "smoke" if size is SMOKE else "full",
            "levels": list(size.levels),
            "max_tokens": size.max_tokens,
            "load_start": load_start,
            "load_end": os.getloadavg(),
            "machine": report.describe_machine(
                os.environ["SLR_VLLM_PYTHON"], litellm_python
            ),
            "paths": {path.name: path.results for path in paths},
            "pipelines_fixed": fixed.results["1"],
            "router": router,
            "cold_start": {
                "direct": direct_cold,
                "pipelines": {
                    "healthy_s": pipelines_healthy_s,
                    "first_answer_s": pipelines_first_s,
                },
                "litellm": {
                    "healthy_s": litellm_healthy_s,
                    "first_answer_s": litellm_first_s,
                },
                "router": {"first_answer_s": router["first_decision_s"]},
            },
            "rss_bytes": {
                "direct": None if vllm is None else vllm.rss_bytes(),
                "pipelines": pipelines.rss_bytes(),
                "litellm": litellm.rss_bytes(),
                "router": router["rss_bytes"],
            },
        }
    finally:
        for server in reversed(servers):
            server.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a short run (concurrency 1 and 8, a few requests) that checks the "
        "benchmark works; its numbers mean little",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=BENCH / "results",
        help="folder for results.json, benchmark.md and benchmark.png "
        "(default: bench/results)",
    )
    parser.add_argument(
        "--vllm-api-base",
        help="use this running vLLM (the tiny test model with the doctor and dcot "
        "adapters, for example http://127.0.0.1:8000/v1) instead of starting one",
    )
    args = parser.parse_args()
    size = SMOKE if args.smoke else FULL

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slr-bench-") as work:
        results = run(size, Path(work), args.vllm_api_base)

    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "benchmark.md").write_text(report.markdown(results))
    subprocess.run(
        [
            os.environ["SLR_LITELLM_PYTHON"],
            str(BENCH / "plot_results.py"),
            str(args.out / "results.json"),
            str(args.out / "benchmark.png"),
        ],
        check=True,
    )
    print(f"bench: wrote {args.out / 'benchmark.md'} and benchmark.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
