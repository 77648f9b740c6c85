"""Run ruff and mypy with the settings in pyproject.toml, so tests/run also
checks formatting, lint and the plugin's type hints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_ruff_lint_passes() -> None:
    result = run_tool("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = run_tool("ruff", "format", "--no-cache", "--check", "--diff", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_passes_on_plugin() -> None:
    if not any((REPO_ROOT / "pipelines").glob("*.py")):
        pytest.skip("no plugin in pipelines/ yet")
    result = run_tool("mypy", "--cache-dir", "/dev/null")
    assert result.returncode == 0, result.stdout + result.stderr
