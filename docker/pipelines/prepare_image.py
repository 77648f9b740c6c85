"""Build steps for the Pipelines image that carries the semantic LoRA router.

Run by docker/pipelines/Dockerfile, one subcommand per build step:

    requirements PLUGIN        print the plugin's front-matter requirements
    encoder MODEL CACHE_DIR    download a fastembed model, then load it offline
    check-plugin PLUGIN        import the plugin and build its Pipeline

The Pipelines server pip-installs the front-matter requirements each time it
loads the plugin. Installing them at build time makes that step a no-op, so the
container starts without network or pip downloads. The encoder is checked with
HF_HUB_OFFLINE=1 because the running container has that setting.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

# The Pipelines server reads front matter only from a docstring that opens the
# file, as `key: value` lines, and splits `requirements` at commas.
FRONT_MATTER_QUOTES = '"""'


class PluginError(Exception):
    """The plugin file cannot be used to build the image."""


def front_matter(text: str) -> dict[str, str]:
    """Parse the `key: value` lines of the docstring that opens a plugin file.

    Keys are lower-cased, as the Pipelines server does. A file that does not
    start with a docstring has no front matter.
    """
    if not text.startswith(FRONT_MATTER_QUOTES):
        return {}
    end = text.find(FRONT_MATTER_QUOTES, len(FRONT_MATTER_QUOTES))
    if end == -1:
        return {}

    fields: dict[str, str] = {}
    for line in text[len(FRONT_MATTER_QUOTES) : end].splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields[key.strip().lower()] = value.strip()
    return fields


def plugin_requirements(text: str) -> list[str]:
    """Return the requirement specifiers from a plugin's front matter."""
    raw = front_matter(text).get("requirements", "")
    return [item.strip() for item in raw.split(",") if item.strip()]


def download_encoder(model: str, cache_dir: Path) -> None:
    """Download a fastembed model into cache_dir, then check that it loads offline.

    The offline check runs in a child process with HF_HUB_OFFLINE=1 and loads
    the model the way the plugin does: semantic-router's FastEmbedEncoder with
    cache_dir. It fails the build if the running container could not load it.
    """
    from fastembed import TextEmbedding

    cache_dir.mkdir(parents=True, exist_ok=True)
    TextEmbedding(model_name=model, cache_dir=str(cache_dir))

    check = (
        "import sys\n"
        "from semantic_router.encoders import FastEmbedEncoder\n"
        "encoder = FastEmbedEncoder(name=sys.argv[1], cache_dir=sys.argv[2])\n"
        "vector = encoder(['offline check'])[0]\n"
        "print(f'encoder {sys.argv[1]} loads offline, dimension {len(vector)}')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run(
        [sys.executable, "-c", check, model, str(cache_dir)], env=env, check=True
    )


def check_plugin(path: Path) -> None:
    """Import the plugin file and build its Pipeline, as the server does at load.

    The server moves a plugin that fails here to its failed/ folder at start-up,
    so catching the failure at build time keeps a broken image from shipping.
    """
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    if not hasattr(module, "Pipeline"):
        raise PluginError(f"{path} defines no Pipeline class")
    pipeline = module.Pipeline()
    print(f"plugin {path.name} loads: id {getattr(pipeline, 'id', path.stem)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    requirements = commands.add_parser("requirements")
    requirements.add_argument("plugin", type=Path)

    encoder = commands.add_parser("encoder")
    encoder.add_argument("model")
    encoder.add_argument("cache_dir", type=Path)

    plugin = commands.add_parser("check-plugin")
    plugin.add_argument("plugin", type=Path)

    args = parser.parse_args(argv)
    try:
        if args.command == "requirements":
            found = plugin_requirements(args.plugin.read_text(encoding="utf-8"))
            if not found:
                raise PluginError(
                    f"{args.plugin} has no requirements line in its front matter"
                )
            print("\n".join(found))
        elif args.command == "encoder":
            download_encoder(args.model, args.cache_dir)
        else:
            check_plugin(args.plugin)
    except (OSError, PluginError) as exc:
        print(f"prepare_image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
