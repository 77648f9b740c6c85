"""LiteLLM proxy pre-call hook that routes model `auto` with semantic-router.

This is the design the Pipelines plugin replaces, built only for the benchmark:
a LiteLLM proxy whose pre-call hook embeds the last user message with
semantic-router's IndexedRouter (its async `acall`, as a hook on LiteLLM's event
loop would use it) and rewrites the request's `model` to the route's target.

It reads the same routes, encoder, threshold and aggregation as the plugin,
from the same environment variables (ROUTES, ENCODER_MODEL, ENCODER_LOCAL_DIR,
ROUTER_SCORE_THRESHOLD, ROUTER_AGGREGATION), by loading the plugin file named
in SLR_PLUGIN_PATH. SLR_DEFAULT_MODEL names the model for chats that match no
route. LiteLLM's own auto-router is not used because it needs semantic-router
0.1 (`semantic_router.routers.SemanticRouter`) and an embedding API, not a
local encoder folder.

LiteLLM imports this module while it loads its config, so the encoder is loaded
and the utterances are embedded before the proxy accepts requests.
"""

import importlib.util
import logging
import os
from types import ModuleType
from typing import Any

from litellm.integrations.custom_logger import CustomLogger
from semantic_router import IndexedRouter, Route

log = logging.getLogger("litellm_route_hook")

AUTO_MODEL = "auto"


def load_plugin(path: str) -> ModuleType:
    """Import the plugin file by path, as the Pipelines server does."""
    spec = importlib.util.spec_from_file_location("semantic_lora_router", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"SLR_PLUGIN_PATH {path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SemanticRouteHook(CustomLogger):  # type: ignore[misc]
    """Rewrite `model: auto` to the target of the best route, or the default."""

    def __init__(self) -> None:
        super().__init__()
        plugin = load_plugin(os.environ["SLR_PLUGIN_PATH"])
        valves = plugin.valves_from_env()
        routes = plugin.parse_routes(valves.ROUTES)
        encoder = plugin.load_encoder(valves.ENCODER_MODEL, valves.ENCODER_LOCAL_DIR)
        self.router = IndexedRouter(
            encoder=encoder,
            routes=[
                Route(
                    name=route.name,
                    utterances=list(route.utterances),
                    confidence_threshold=route.threshold,
                )
                for route in routes
            ],
            top_k=sum(len(route.utterances) for route in routes),
            aggregation=valves.ROUTER_AGGREGATION,
            confidence_threshold=valves.ROUTER_SCORE_THRESHOLD,
        )
        self.targets = {route.name: route.target for route in routes}
        self.default_model = os.environ["SLR_DEFAULT_MODEL"]
        self.plugin = plugin

    def last_user_text(self, messages: Any) -> str:
        texts = self.plugin.recent_user_texts(messages, 1)
        return str(texts[-1]) if texts else ""

    async def async_pre_call_hook(
        self,
        user_api_key_dict: Any,
        cache: Any,
        data: dict[str, Any],
        call_type: Any,
    ) -> dict[str, Any]:
        if data.get("model") != AUTO_MODEL:
            return data
        text = self.last_user_text(data.get("messages"))
        model = self.default_model
        if text:
            choice = await self.router.acall(text)
            model = self.targets.get(choice.name, self.default_model)
        log.debug("auto routed to %s", model)
        data["model"] = model
        return data


proxy_handler_instance = SemanticRouteHook()
