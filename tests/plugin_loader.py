"""Load the plugin file the way the Pipelines server does."""

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
PLUGIN_PATH = REPO / "pipelines" / "semantic_lora_router.py"


def load_plugin() -> ModuleType:
    """Import the plugin from its path without registering it in sys.modules.

    The Pipelines server imports pipelines this way, so code that needs its own
    module in sys.modules (string annotations on dataclasses, for one) fails here
    as it would there.
    """
    spec = importlib.util.spec_from_file_location("semantic_lora_router", PLUGIN_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
