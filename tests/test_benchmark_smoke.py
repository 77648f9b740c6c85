"""The benchmark's smoke run: bench/run --smoke end to end, against the real servers.

It checks that every path answered and that the result files are well formed. It
asserts no timings: a speed target is read from a full run's ratios, not from a
timed test on a shared machine.
"""

import json
import struct
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHAT_PATHS = {"direct", "pipelines", "litellm"}
PATH_LABELS = (
    "1. direct to vLLM",
    "2. Pipelines, auto",
    "3. LiteLLM proxy + hook",
    "4. router alone",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_run(vllm_server, tmp_path_factory):
    """Run bench/run --smoke once against the session's vLLM; return its folder."""
    out = tmp_path_factory.mktemp("bench")
    started = time.monotonic()
    done = subprocess.run(
        [
            str(REPO / "bench" / "run"),
            "--smoke",
            "--out",
            str(out),
            "--vllm-api-base",
            vllm_server.api_base,
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, (
        f"bench/run --smoke exited with {done.returncode}\n"
        f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    )
    print(f"bench/run --smoke took {elapsed:.0f} s")
    return out


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_smoke_results_json_has_every_path(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    assert set(results["paths"]) == CHAT_PATHS
    assert results["levels"] == [1, 8]
    for name, rows in results["paths"].items():
        assert set(rows) == {"1", "8"}, name
        for level, row in rows.items():
            where = f"{name} at concurrency {level}"
            assert row["errors"] == 0, f"{where}: {row['first_error']}"
            assert row["model_mismatches"] == 0, where
            assert row["ttft_p50_ms"] > 0, where
            assert row["tokens_per_request"] == results["max_tokens"], where
            assert row["tokens_per_s"] > 0, where


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_smoke_router_alone_timed_every_size(smoke_run):
    router = json.loads((smoke_run / "results.json").read_text())["router"]
    for key in ("mix", "words64", "chars200k"):
        assert router[key]["count"] > 0, key
        assert 0 < router[key]["p50_ms"] <= router[key]["p95_ms"], key
    assert set(router["by_concurrency"]) == {"1", "8"}
    assert router["rss_bytes"] > 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_smoke_markdown_has_tables(smoke_run):
    markdown = (smoke_run / "benchmark.md").read_text()
    assert markdown.startswith("# Benchmark")
    assert "| target | measured | holds |" in markdown
    assert "Load average" in markdown
    for label in PATH_LABELS:
        assert label in markdown


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_smoke_chart_is_png(smoke_run):
    png = (smoke_run / "benchmark.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 800
    assert height >= 600
