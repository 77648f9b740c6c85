"""Client-side helpers for the fault, bad-input and load tests.

`livechat.read_stream` keeps what a strict client would reject (lines that are
not JSON, a second [DONE]), so that `assert_well_formed` can check the stream:
one finish per choice, and exactly one [DONE] as the last line.
"""

from pathlib import Path
from typing import Any

import requests
from livechat import AUTO, StreamResult, live_valves_env

from servers import PipelinesServer, start_pipelines

PLUGIN = (
    Path(__file__).resolve().parent.parent / "pipelines" / "semantic_lora_router.py"
)
FAKE_ANSWER = "Fake answer from {model}: 头痛 🤕 café naïve ∑ done"
CUT_NOTE = "[The answer from vLLM was cut off before it finished.]"


def plugin_env(api_base: str, encoder_dir: Path, **extra: str) -> dict[str, str]:
    return {**live_valves_env(api_base, encoder_dir), **extra}


def start_plugin_server(tmp_path_factory: Any, env: dict[str, str]) -> PipelinesServer:
    pipelines_dir = tmp_path_factory.mktemp("pipelines")
    (pipelines_dir / PLUGIN.name).write_bytes(PLUGIN.read_bytes())
    return start_pipelines(pipelines_dir, env)


def assert_well_formed(result: StreamResult, choices: int = 1) -> None:
    assert result.status_code == 200
    assert result.bad_lines == []
    assert result.done_count == 1
    assert result.done_last, "[DONE] is not the last line"
    assert len(result.finish_reasons) == choices
    assert "Traceback" not in result.raw


def post_json(base_url: str, body: dict[str, Any], timeout: float = 60):
    body = {"model": AUTO, "stream": False, "max_tokens": 12, **body}
    return requests.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout)
