"""A short run of bench/load.py: concurrent streaming chats through real servers.

The full benchmark (64 clients for 120 s) is a script, not a test. This test
checks only that a small load loses nothing: no errors, and every chat that
started finished. Timings are printed, not asserted.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
from streamcheck import plugin_env, start_plugin_server

LOAD_SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "load.py"


def load_bench_module():
    spec = importlib.util.spec_from_file_location("bench_load", LOAD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_small_load_loses_no_chat(vllm_server, encoder_dir, tmp_path_factory):
    bench = load_bench_module()
    server = start_plugin_server(
        tmp_path_factory, plugin_env(vllm_server.api_base, encoder_dir)
    )
    try:
        result = bench.run_load(
            server, vllm_server.served_model_name, clients=8, duration=10, max_tokens=16
        )
    finally:
        server.stop()
    print(result.line())

    assert result.started > 0
    assert result.errors == 0, result.error_examples[:5]
    assert result.completed == result.started
    assert set(result.by_model) == {"doctor", "dcot", vllm_server.served_model_name}
