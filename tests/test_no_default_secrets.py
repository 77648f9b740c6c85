"""No file ships a usable key: the stack's secrets come only from .env."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The upstream Pipelines server's built-in API key, split so this file does
# not contain it.
UPSTREAM_DEFAULT_KEY = "0p3n" + "-w3bu!"


def tracked_files():
    listing = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    return [REPO / name for name in listing.split("\0") if name]


def test_no_file_carries_upstream_default_key():
    carriers = [
        str(path.relative_to(REPO))
        for path in tracked_files()
        if path.is_file() and UPSTREAM_DEFAULT_KEY.encode() in path.read_bytes()
    ]
    assert carriers == []


def test_env_example_leaves_keys_empty():
    lines = (REPO / ".env.example").read_text(encoding="utf-8").splitlines()
    values = dict(
        line.split("=", 1) for line in lines if "=" in line and not line.startswith("#")
    )
    assert values["PIPELINES_API_KEY"] == ""
    assert values["WEBUI_SECRET_KEY"] == ""
