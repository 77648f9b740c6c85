"""Check the deployment files offline: docker-compose.yaml, the Dockerfiles and
the kustomize manifests in vllm-deploy/.

No Docker engine or cluster is needed. The compose file is checked against the
Compose Specification's JSON schema as vendored by check-jsonschema (and with
`docker compose config` where the compose plugin exists). The kustomize output,
rendered with `kubectl kustomize`, is checked against the Kubernetes JSON
schemas shipped in kubernetes-validate. The consistency tests compare the
files with each other and with valves/routes.yaml.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

# The schema checkers and the versions these tests were written against. Only
# the schema tests need them, so the other checks run where they are missing.
SCHEMA_PACKAGES = {
    "jsonschema": "jsonschema==4.26.0",
    "kubernetes_validate": "kubernetes-validate==1.37.0",
    "check_jsonschema": "check-jsonschema==0.39.0",
}


def schema_package(module: str) -> Any:
    requirement = SCHEMA_PACKAGES[module]
    return pytest.importorskip(module, reason=f"{requirement} is not installed")


REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
ROUTES_FILE = REPO / "valves" / "routes.yaml"
PLUGIN_FILE = REPO / "pipelines" / "semantic_lora_router.py"
PIPELINES_DOCKERFILE = REPO / "docker" / "pipelines" / "Dockerfile"
MODELS_DOCKERFILE = REPO / "docker" / "models" / "Dockerfile"
PREPARE_IMAGE = REPO / "docker" / "pipelines" / "prepare_image.py"
DEPLOY_DIR = REPO / "vllm-deploy"
DOWNLOAD_SCRIPT = DEPLOY_DIR / "base" / "download-models.sh"
CHAT_TEMPLATE = DEPLOY_DIR / "phi2-chat-template.jinja"

# Kubernetes releases to validate against: OpenShift 4.17 runs 1.30, and 1.33
# is a recent release.
KUBERNETES_VERSIONS = ["1.30.0", "1.33.0"]

# Ranks that vLLM's --max-lora-rank accepts (vllm.config.lora, vLLM 0.32).
VLLM_LORA_RANKS = {1, 8, 16, 32, 64, 128, 256, 320, 512}

SECRET_VARIABLES = {"PIPELINES_API_KEY", "WEBUI_SECRET_KEY", "HF_TOKEN", "VLLM_API_KEY"}
REQUIRED_SECRETS = {"PIPELINES_API_KEY", "WEBUI_SECRET_KEY"}
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)

# Tags that move with every release, so they pin nothing.
FLOATING_TAGS = {"latest", "main", "stable", "nightly", "dev", "cuda", "minimum"}

LONG_RUNNING = ("vllm", "vllm-cpu", "pipelines", "open-webui")
VLLM_SERVICES = ("vllm", "vllm-cpu")


# --- Helpers --------------------------------------------------------------------


class MissingVariable(Exception):
    """A ${VAR:?message} reference whose variable is unset or empty."""


VARIABLE = re.compile(
    r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\})"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Apply compose's variable interpolation to every string in value."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        unset = current is None or (
            op is not None and op.startswith(":") and not current
        )
        if op in ("-", ":-"):
            return arg if unset else str(current)
        if op in ("?", ":?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return str(current)
        if op in ("+", ":+"):
            return "" if unset else arg
        return current or ""

    return VARIABLE.sub(replace, value)


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        values[name.strip()] = value.strip()
    return values


def test_env() -> dict[str, str]:
    """The variables of .env.example with the required keys filled in."""
    env = read_env_file(ENV_EXAMPLE)
    env["PIPELINES_API_KEY"] = "test-pipelines-key"
    env["WEBUI_SECRET_KEY"] = "test-webui-secret"
    return env


test_env.__test__ = False  # type: ignore[attr-defined]


def raw_compose() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as file:
        return yaml.safe_load(file)


def compose() -> dict[str, Any]:
    return interpolate(raw_compose(), test_env())


def option_values(args: list[str], option: str) -> list[str]:
    """Return the values after an option, up to the next --option."""
    for index, arg in enumerate(args):
        if arg == option:
            values = []
            for value in args[index + 1 :]:
                if value.startswith("--"):
                    break
                values.append(value)
            return values
        if arg.startswith(option + "="):
            return [arg.split("=", 1)[1]]
    return []


def option_value(args: list[str], option: str) -> str:
    values = option_values(args, option)
    assert len(values) == 1, f"{option} should have one value, has {values}"
    return values[0]


def lora_modules(args: list[str]) -> dict[str, str]:
    modules = {}
    for item in option_values(args, "--lora-modules"):
        name, _, path = item.partition("=")
        modules[name] = path
    return modules


def route_targets() -> set[str]:
    routes = yaml.safe_load(ROUTES_FILE.read_text(encoding="utf-8"))["routes"]
    return {route.get("target") or route["name"] for route in routes}


def image_is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    if ":" not in name:
        return False
    tag = name.split(":", 1)[1]
    return tag not in FLOATING_TAGS and "latest" not in tag


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs with continuation lines joined."""
    instructions = []
    current = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            current = ""
    return instructions


def dockerfile_base_images(path: Path) -> list[str]:
    """Return the FROM images with ARG defaults substituted."""
    args: dict[str, str] = {}
    images = []
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        if keyword == "FROM":
            image = rest.split()[0]
            images.append(interpolate(image, args))
    return images


def dockerfile_copies(path: Path) -> list[tuple[list[str], str]]:
    """Return (sources, destination) for each COPY from the build context.

    COPY --from reads another build stage, not the context, and is left out.
    """
    copies = []
    for keyword, rest in dockerfile_instructions(path):
        if keyword != "COPY" or "--from=" in rest:
            continue
        parts = [part for part in rest.split() if not part.startswith("--")]
        copies.append((parts[:-1], parts[-1]))
    return copies


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", rest):
                env[name] = value
    return env


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed, so kustomize output cannot be rendered")
    result = subprocess.run(
        [kubectl, "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


@pytest.fixture(scope="module")
def base_docs() -> list[dict[str, Any]]:
    return kustomize(DEPLOY_DIR / "base")


@pytest.fixture(scope="module")
def openshift_docs() -> list[dict[str, Any]]:
    return kustomize(DEPLOY_DIR / "openshift")


# --- Compose: schema --------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    schema_package("check_jsonschema")
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text(encoding="utf-8"))


def test_compose_file_matches_compose_spec_schema() -> None:
    jsonschema = schema_package("jsonschema")
    validator = jsonschema.Draft202012Validator(compose_schema())

    raw_errors = sorted(error.message for error in validator.iter_errors(raw_compose()))
    assert raw_errors == []
    errors = sorted(error.message for error in validator.iter_errors(compose()))
    assert errors == []


def test_compose_schema_rejects_a_broken_file() -> None:
    # Proves that the schema check above can fail.
    broken = raw_compose()
    broken["services"]["vllm"]["restart"] = ["always"]
    broken["services"]["pipelines"]["healthchek"] = {}
    jsonschema = schema_package("jsonschema")

    validator = jsonschema.Draft202012Validator(compose_schema())

    assert len(list(validator.iter_errors(broken))) >= 2


def test_docker_compose_config_accepts_file(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed; the schema test covers the file")
    probe = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is missing; the schema test covers it")

    env_file = tmp_path / ".env"
    env_file.write_text(
        "\n".join(f"{name}={value}" for name, value in test_env().items()),
        encoding="utf-8",
    )
    result = subprocess.run(
        [docker, "compose", "--env-file", str(env_file), "-f", str(COMPOSE_FILE)]
        + ["config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr


# --- Compose: secrets and environment -----------------------------------------------


def test_compose_refuses_to_start_without_keys() -> None:
    env = test_env()
    for name in REQUIRED_SECRETS:
        missing = dict(env, **{name: ""})
        with pytest.raises(MissingVariable, match=name):
            interpolate(raw_compose(), missing)


def test_compose_secrets_come_from_environment() -> None:
    for name, service in raw_compose()["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            if not SECRET_NAME.search(variable):
                continue
            reference = re.fullmatch(r"\$\{(\w+)(:?[-?][^}]*)?\}", str(value))
            assert reference, f"{name}.{variable} must be a ${{VAR}} reference"
            assert reference.group(1) in SECRET_VARIABLES
            if reference.group(1) in REQUIRED_SECRETS:
                assert reference.group(2).startswith(":?"), (
                    f"{name}.{variable} must fail without {reference.group(1)}"
                )
            else:
                assert reference.group(2) in (None, ":-"), (
                    f"{name}.{variable} must not carry a default value"
                )


def test_env_example_ships_no_secrets() -> None:
    env = read_env_file(ENV_EXAMPLE)

    for name in SECRET_VARIABLES:
        assert name in env, f".env.example should list {name}"
        assert env[name] == "", f".env.example must leave {name} empty"


def test_env_example_explains_how_to_make_keys() -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")

    assert "openssl rand -hex 32" in text


def test_env_example_selects_gpu_profile() -> None:
    assert read_env_file(ENV_EXAMPLE)["COMPOSE_PROFILES"] == "gpu"


# --- Compose: images, ports and users -------------------------------------------------


def test_compose_images_are_pinned() -> None:
    for name, service in compose()["services"].items():
        assert "image" in service, f"{name} has no image"
        assert image_is_pinned(service["image"]), f"{name}: {service['image']}"
        if "build" in service:
            # The local tag must never be looked up in a registry.
            assert service["pull_policy"] == "build", name
            dockerfile = (
                REPO / service["build"]["context"] / service["build"]["dockerfile"]
            )
            for base in dockerfile_base_images(dockerfile):
                assert image_is_pinned(base), f"{dockerfile}: FROM {base}"


def test_only_open_webui_publishes_a_port() -> None:
    services = compose()["services"]

    publishing = {name for name, service in services.items() if service.get("ports")}
    assert publishing == {"open-webui"}
    for service in services.values():
        assert service.get("network_mode") != "host"


def test_open_webui_port_binds_to_localhost_by_default() -> None:
    ports = compose()["services"]["open-webui"]["ports"]

    assert ports == ["127.0.0.1:3000:8080"]


def test_backend_network_is_internal() -> None:
    config = compose()
    services = config["services"]

    assert config["networks"]["internal"]["internal"] is True
    for name in ("vllm", "vllm-cpu", "pipelines"):
        networks = services[name]["networks"]
        assert list(networks) == ["internal"], f"{name} is on {list(networks)}"
    assert set(services["open-webui"]["networks"]) == {"default", "internal"}


def test_cpu_vllm_answers_as_vllm() -> None:
    networks = compose()["services"]["vllm-cpu"]["networks"]

    assert "vllm" in networks["internal"]["aliases"]


def test_profiles_choose_gpu_or_cpu_vllm() -> None:
    services = compose()["services"]

    assert services["vllm"]["profiles"] == ["gpu"]
    assert services["vllm-cpu"]["profiles"] == ["cpu"]
    for name in ("models", "pipelines", "open-webui"):
        assert "profiles" not in services[name]


def test_services_run_as_non_root_where_images_allow() -> None:
    services = compose()["services"]

    assert services["vllm"]["user"] == "2000:0"
    for dockerfile in (PIPELINES_DOCKERFILE, MODELS_DOCKERFILE):
        users = [
            rest
            for keyword, rest in dockerfile_instructions(dockerfile)
            if keyword == "USER"
        ]
        assert users, f"{dockerfile} sets no USER"
        assert not users[-1].startswith(("0", "root")), (
            f"{dockerfile}: USER {users[-1]}"
        )


def test_restart_policies() -> None:
    services = compose()["services"]

    for name in LONG_RUNNING:
        assert services[name]["restart"] == "unless-stopped", name
    assert services["models"]["restart"] == "no"


def test_long_running_services_have_health_checks() -> None:
    services = compose()["services"]

    for name in VLLM_SERVICES:
        assert "http://127.0.0.1:8000/health" in " ".join(
            services[name]["healthcheck"]["test"]
        )
    assert "http://127.0.0.1:9099/" in " ".join(
        services["pipelines"]["healthcheck"]["test"]
    )
    assert "/health" in " ".join(services["open-webui"]["healthcheck"]["test"])


def test_start_order() -> None:
    services = compose()["services"]

    for name in VLLM_SERVICES:
        condition = services[name]["depends_on"]["models"]["condition"]
        assert condition == "service_completed_successfully"
    for name in VLLM_SERVICES:
        dependency = services["pipelines"]["depends_on"][name]
        assert dependency == {"condition": "service_healthy", "required": False}
    assert (
        services["open-webui"]["depends_on"]["pipelines"]["condition"]
        == "service_healthy"
    )


def test_gpu_vllm_reserves_nvidia_gpu() -> None:
    devices = compose()["services"]["vllm"]["deploy"]["resources"]["reservations"][
        "devices"
    ]

    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_cpu_vllm_reserves_no_gpu() -> None:
    assert "deploy" not in compose()["services"]["vllm-cpu"]


# --- Compose: vLLM, models and routes agree -------------------------------------------


def vllm_args(service: str) -> list[str]:
    return [str(arg) for arg in compose()["services"][service]["command"]]


@pytest.mark.parametrize("service", VLLM_SERVICES)
def test_adapter_names_match_route_targets(service: str) -> None:
    assert set(lora_modules(vllm_args(service))) == route_targets()


@pytest.mark.parametrize("service", VLLM_SERVICES)
def test_vllm_loads_what_models_service_downloads(service: str) -> None:
    services = compose()["services"]
    repos = [spec.split("@")[0] for spec in services["models"]["command"]]
    args = vllm_args(service)

    served = [option_value(args, "--model")] + list(lora_modules(args).values())
    assert served == [f"/models/{repo}" for repo in repos]
    assert "models:/models:ro" in services[service]["volumes"]
    assert "models:/models" in services["models"]["volumes"]


@pytest.mark.parametrize("service", VLLM_SERVICES)
def test_max_lora_rank_agrees_with_models_service(service: str) -> None:
    services = compose()["services"]
    rank = option_value(vllm_args(service), "--max-lora-rank")

    assert int(rank) in VLLM_LORA_RANKS
    assert services["models"]["environment"]["MAX_LORA_RANK"] == rank


@pytest.mark.parametrize("service", VLLM_SERVICES)
def test_lora_capacity_fits_both_adapters(service: str) -> None:
    args = vllm_args(service)
    adapters = len(lora_modules(args))

    assert int(option_value(args, "--max-loras")) >= adapters
    assert int(option_value(args, "--max-cpu-loras")) >= adapters


def test_gpu_and_cpu_vllm_share_arguments() -> None:
    def without(args: list[str], option: str) -> list[str]:
        index = args.index(option)
        return args[:index] + args[index + 2 :]

    gpu = without(vllm_args("vllm"), "--gpu-memory-utilization")
    cpu = without(vllm_args("vllm-cpu"), "--dtype")

    assert gpu == cpu
    assert option_value(vllm_args("vllm-cpu"), "--dtype") == "bfloat16"


@pytest.mark.parametrize("service", VLLM_SERVICES)
def test_chat_template_is_mounted_from_vllm_deploy(service: str) -> None:
    services = compose()["services"]
    template_path = option_value(vllm_args(service), "--chat-template")

    mounts = [
        volume.rsplit(":", 2)
        for volume in services[service]["volumes"]
        if volume.startswith("./")
    ]
    sources = [REPO / source for source, target, _ in mounts if target == template_path]
    assert len(sources) == 1, f"{template_path} is not mounted in {service}"
    assert sources[0].samefile(CHAT_TEMPLATE)


def test_pipelines_reach_vllm_with_shared_key() -> None:
    raw = raw_compose()["services"]
    environment = compose()["services"]["pipelines"]["environment"]

    assert environment["VLLM_BASE_URL"] == "http://vllm:8000/v1"
    for name in ("vllm", "vllm-cpu", "pipelines"):
        assert raw[name]["environment"]["VLLM_API_KEY"] == "${VLLM_API_KEY:-}"


def test_open_webui_connects_to_pipelines() -> None:
    raw = raw_compose()["services"]
    environment = compose()["services"]["open-webui"]["environment"]

    assert environment["OPENAI_API_BASE_URLS"] == "http://pipelines:9099"
    assert environment["ENABLE_OPENAI_API"] == "true"
    assert environment["ENABLE_OLLAMA_API"] == "false"
    assert environment["OPENAI_API_KEYS"] == "test-pipelines-key"
    assert (
        raw["open-webui"]["environment"]["OPENAI_API_KEYS"]
        == (raw["pipelines"]["environment"]["PIPELINES_API_KEY"])
    )


def test_pipelines_persist_only_valves_folder() -> None:
    volumes = compose()["services"]["pipelines"]["volumes"]

    named = [volume for volume in volumes if not volume.startswith("./")]
    assert named == ["pipelines-valves:/app/pipelines/semantic_lora_router"]
    assert "./valves:/app/valves:ro" in volumes


def test_pipelines_run_offline() -> None:
    environment = compose()["services"]["pipelines"]["environment"]

    assert environment["HF_HUB_OFFLINE"] == "1"
    assert environment["SEMANTIC_ROUTER_LOG_LEVEL"]
    assert dockerfile_env(PIPELINES_DOCKERFILE)["HF_HUB_OFFLINE"] == "1"
    assert dockerfile_env(PIPELINES_DOCKERFILE)["PIP_NO_INDEX"] == "1"


# --- Dockerfiles and the plugin they install --------------------------------------------


def test_pipelines_image_installs_repository_plugin() -> None:
    service = compose()["services"]["pipelines"]
    context = REPO / service["build"]["context"]
    pipelines_dir = dockerfile_env(PIPELINES_DOCKERFILE)["PIPELINES_DIR"]

    into_pipelines_dir = [
        (sources, destination)
        for sources, destination in dockerfile_copies(PIPELINES_DOCKERFILE)
        if destination.startswith(pipelines_dir)
    ]
    assert into_pipelines_dir == [
        (
            ["pipelines/semantic_lora_router.py"],
            f"{pipelines_dir}/semantic_lora_router.py",
        )
    ]
    assert (context / "pipelines" / "semantic_lora_router.py").samefile(PLUGIN_FILE)


def test_core_tests_load_same_plugin_file() -> None:
    # conftest copies PLUGIN_PATH into the real Pipelines server for the live
    # tests, and plugin_loader imports it for the unit tests.
    import conftest
    import plugin_loader

    pipelines_dir = dockerfile_env(PIPELINES_DOCKERFILE)["PIPELINES_DIR"]
    installed = [
        destination
        for sources, destination in dockerfile_copies(PIPELINES_DOCKERFILE)
        if destination.startswith(pipelines_dir)
    ]
    assert Path(conftest.PLUGIN_PATH).samefile(PLUGIN_FILE)
    assert Path(plugin_loader.PLUGIN_PATH).samefile(PLUGIN_FILE)
    assert [Path(path).name for path in installed] == [conftest.PLUGIN_PATH.name]


def test_pipelines_image_does_not_download_plugin() -> None:
    for keyword, rest in dockerfile_instructions(PIPELINES_DOCKERFILE):
        assert "PIPELINES_URLS" not in rest
        assert keyword != "ADD", "ADD could fetch a URL; use COPY"


def test_dockerignore_keeps_copied_files() -> None:
    patterns = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    included = [line[1:].rstrip("/") for line in patterns if line.startswith("!")]

    for dockerfile in (PIPELINES_DOCKERFILE, MODELS_DOCKERFILE):
        for sources, _ in dockerfile_copies(dockerfile):
            for source in sources:
                source = source.rstrip("/")
                assert any(
                    source == kept or source.startswith(kept + "/") for kept in included
                ), f"{dockerfile}: {source} is excluded by .dockerignore"
                assert (REPO / source).exists(), f"{dockerfile}: {source} is missing"


def load_prepare_image() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_image", PREPARE_IMAGE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plugin_requirements_are_pinned_specifiers() -> None:
    prepare_image = load_prepare_image()

    found = prepare_image.plugin_requirements(PLUGIN_FILE.read_text(encoding="utf-8"))

    names = {Requirement(item).name: Requirement(item) for item in found}
    assert "semantic-router" in names
    assert str(names["semantic-router"].specifier) == "==1.1.1"
    assert "fastembed" in names["semantic-router"].extras


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param('"""\nrequirements: a, b==1\n"""\n', ["a", "b==1"], id="two"),
        pytest.param('"""\nRequirements: a\n"""\n', ["a"], id="key-case"),
        pytest.param('"""\ntitle: x\n"""\n', [], id="no-requirements"),
        pytest.param('import os\n"""\nrequirements: a\n"""\n', [], id="not-at-top"),
        pytest.param('"""\nrequirements: a,, b ,\n"""', ["a", "b"], id="empty-items"),
    ],
)
def test_front_matter_parsing(text: str, expected: list[str]) -> None:
    assert load_prepare_image().plugin_requirements(text) == expected


def test_prepare_image_builds_plugin(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", ROUTES_FILE=str(ROUTES_FILE))
    result = subprocess.run(
        [sys.executable, str(PREPARE_IMAGE), "check-plugin", str(PLUGIN_FILE)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "plugin semantic_lora_router.py loads" in result.stdout


def fastembed_cache(encoder_dir: Path, cache: Path) -> None:
    """Lay out encoder_dir as fastembed's Hugging Face cache of all-MiniLM-L6-v2.

    That is the layout the image build leaves in ENCODER_LOCAL_DIR for
    BAAI/bge-small-en-v1.5, which the tests cannot download.
    """
    repo = cache / "models--Qdrant--all-MiniLM-L6-v2-onnx"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    for name in (
        "model.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "config.json",
    ):
        (snapshot / name).symlink_to(encoder_dir / name)


def test_prepare_image_encoder_loads_offline(encoder_dir: Path, tmp_path: Path) -> None:
    fastembed_cache(encoder_dir, tmp_path / "encoder")
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    result = subprocess.run(
        [sys.executable, str(PREPARE_IMAGE), "encoder"]
        + ["sentence-transformers/all-MiniLM-L6-v2", str(tmp_path / "encoder")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    expected = "encoder sentence-transformers/all-MiniLM-L6-v2 loads offline"
    assert f"{expected}, dimension 384" in result.stdout


def test_prepare_image_encoder_fails_without_model(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    result = subprocess.run(
        [sys.executable, str(PREPARE_IMAGE), "encoder"]
        + ["sentence-transformers/all-MiniLM-L6-v2", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )

    assert result.returncode != 0
    assert (
        "Could not load model sentence-transformers/all-MiniLM-L6-v2" in result.stderr
    )


def test_prepare_image_rejects_plugin_without_pipeline(tmp_path: Path) -> None:
    plugin = tmp_path / "broken.py"
    plugin.write_text('"""\nrequirements: pyyaml\n"""\nVALUE = 1\n', encoding="utf-8")

    result = subprocess.run(
        [sys.executable, str(PREPARE_IMAGE), "check-plugin", str(plugin)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert "defines no Pipeline class" in result.stderr


# --- The model download script ----------------------------------------------------------

FAKE_HF = """#!/bin/sh
# Stand-in for the Hugging Face CLI: writes a model or an adapter into --local-dir.
echo "$*" >> "$FAKE_HF_LOG"
[ -n "${FAKE_HF_FAIL:-}" ] && exit 1
repo=$2
while [ "$#" -gt 0 ]; do
    [ "$1" = --local-dir ] && dir=$2
    shift
done
case "$repo" in
    */phi-2)
        echo '{}' > "$dir/config.json"
        echo weights > "$dir/model-00001-of-00002.safetensors" ;;
    *)
        printf '{"r": %s, "rank_pattern": %s}' "${FAKE_RANK:-16}" \
            "${FAKE_RANK_PATTERN:-{\\}}" > "$dir/adapter_config.json"
        echo weights > "$dir/adapter_model.safetensors" ;;
esac
"""

REPOS = ["microsoft/phi-2", "petualang/Phi2-Doctor28e", "haritzpuerto/phi-2-dcot"]


def run_download(
    tmp_path: Path, *args: str, **env_overrides: str
) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "hf"
    fake.write_text(FAKE_HF, encoding="utf-8")
    fake.chmod(0o755)

    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MODELS_DIR": str(tmp_path / "models"),
        "MAX_LORA_RANK": "64",
        "DOWNLOAD_ATTEMPTS": "1",
        "FAKE_HF_LOG": str(tmp_path / "hf.log"),
        **env_overrides,
    }
    return subprocess.run(
        ["sh", str(DOWNLOAD_SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def hf_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "hf.log"
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


def test_download_fetches_each_repository_once(tmp_path: Path) -> None:
    first = run_download(tmp_path, *REPOS)
    second = run_download(tmp_path, *REPOS, FAKE_HF_FAIL="1")

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert len(hf_calls(tmp_path)) == 3
    assert "already in" in second.stderr
    for repo in REPOS:
        marker = tmp_path / "models" / repo / ".download-complete"
        assert marker.read_text(encoding="utf-8") == f"{repo}@main\n"


def test_download_passes_revision_and_filters(tmp_path: Path) -> None:
    result = run_download(
        tmp_path, "microsoft/phi-2@abc123", "petualang/Phi2-Doctor28e"
    )

    assert result.returncode == 0, result.stderr
    base_call, adapter_call = hf_calls(tmp_path)
    assert base_call.startswith(
        "download microsoft/phi-2 --revision abc123 --local-dir"
    )
    assert "--include *.safetensors" in base_call
    assert "--include adapter_*" in adapter_call


def test_download_rejects_adapter_rank_above_max(tmp_path: Path) -> None:
    result = run_download(tmp_path, *REPOS, FAKE_RANK="128")

    assert result.returncode == 1
    assert "LoRA rank 128, above MAX_LORA_RANK 64" in result.stderr
    assert not (tmp_path / "models" / REPOS[1] / ".download-complete").exists()


def test_download_reads_rank_pattern(tmp_path: Path) -> None:
    result = run_download(tmp_path, *REPOS, FAKE_RANK_PATTERN='{"fc1": 256}')

    assert result.returncode == 1
    assert "LoRA rank 256" in result.stderr


def test_download_check_fails_before_download(tmp_path: Path) -> None:
    result = run_download(tmp_path, "--check", *REPOS)

    assert result.returncode == 1
    assert "is not downloaded" in result.stderr
    assert hf_calls(tmp_path) == []


def test_download_check_passes_after_download(tmp_path: Path) -> None:
    run_download(tmp_path, *REPOS)

    result = run_download(tmp_path, "--check", *REPOS)

    assert result.returncode == 0, result.stderr
    assert len(hf_calls(tmp_path)) == 3


def test_download_check_sees_lowered_max_rank(tmp_path: Path) -> None:
    run_download(tmp_path, *REPOS, FAKE_RANK="64")

    result = run_download(tmp_path, "--check", *REPOS, MAX_LORA_RANK="32")

    assert result.returncode == 1
    assert "LoRA rank 64, above MAX_LORA_RANK 32" in result.stderr


def test_download_reports_failed_download(tmp_path: Path) -> None:
    result = run_download(tmp_path, *REPOS, FAKE_HF_FAIL="1")

    assert result.returncode == 1
    assert "hf download microsoft/phi-2 failed 1 times" in result.stderr


def test_download_requires_max_lora_rank(tmp_path: Path) -> None:
    result = run_download(tmp_path, *REPOS, MAX_LORA_RANK="")

    assert result.returncode == 1
    assert "MAX_LORA_RANK is not set" in result.stderr


def test_download_rejects_name_without_owner(tmp_path: Path) -> None:
    result = run_download(tmp_path, "phi-2")

    assert result.returncode == 1
    assert "not a Hugging Face repository name" in result.stderr


# --- Kubernetes: schema -----------------------------------------------------------------

# kubernetes-validate has no schema for OpenShift's Route. This small schema,
# written for this test, covers the Route fields the overlay uses; it is not
# OpenShift's full API.
ROUTE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "route.openshift.io/v1"},
        "kind": {"const": "Route"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "labels": {"type": "object"}},
        },
        "spec": {
            "type": "object",
            "required": ["to"],
            "additionalProperties": False,
            "properties": {
                "host": {"type": "string"},
                "path": {"type": "string"},
                "to": {
                    "type": "object",
                    "required": ["kind", "name"],
                    "additionalProperties": False,
                    "properties": {
                        "kind": {"const": "Service"},
                        "name": {"type": "string"},
                        "weight": {"type": "integer", "minimum": 0, "maximum": 256},
                    },
                },
                "port": {
                    "type": "object",
                    "required": ["targetPort"],
                    "additionalProperties": False,
                    "properties": {"targetPort": {"type": ["string", "integer"]}},
                },
                "tls": {
                    "type": "object",
                    "required": ["termination"],
                    "properties": {
                        "termination": {"enum": ["edge", "passthrough", "reencrypt"]},
                        "insecureEdgeTerminationPolicy": {
                            "enum": ["Allow", "None", "Redirect"]
                        },
                    },
                },
                "wildcardPolicy": {"enum": ["None", "Subdomain"]},
            },
        },
    },
}


def validate_kubernetes(doc: dict[str, Any], version: str) -> None:
    jsonschema = schema_package("jsonschema")
    kubernetes_validate = schema_package("kubernetes_validate")
    if doc["kind"] == "Route":
        jsonschema.validate(doc, ROUTE_SCHEMA)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", ["base", "openshift"])
def test_kustomize_output_matches_kubernetes_schema(overlay: str, version: str) -> None:
    for doc in kustomize(DEPLOY_DIR / overlay):
        validate_kubernetes(doc, version)


def test_kubernetes_schema_rejects_a_broken_manifest(
    base_docs: list[dict[str, Any]],
) -> None:
    # Proves that the schema check above can fail, offline.
    deployment = json.loads(json.dumps(by_kind(base_docs, "Deployment")["vllm"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    kubernetes_validate = schema_package("kubernetes_validate")

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_secret_templates_match_kubernetes_schema(version: str) -> None:
    docs = list(yaml.safe_load_all((DEPLOY_DIR / "secrets.example.yaml").read_text()))
    kubernetes_validate = schema_package("kubernetes_validate")

    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
        assert all(value == "" for value in doc["stringData"].values())
    names = {doc["metadata"]["name"] for doc in docs}
    assert names == {
        "pipelines-api-key",
        "open-webui-secret",
        "hf-token",
        "vllm-api-key",
    }


# --- Kubernetes: consistency ------------------------------------------------------------


def k8s_vllm_args(docs: list[dict[str, Any]]) -> list[str]:
    spec = by_kind(docs, "Deployment")["vllm"]["spec"]["template"]["spec"]
    return [str(arg) for arg in spec["containers"][0]["args"]]


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item for item in container.get("env", [])}


def test_kubernetes_images_are_pinned(base_docs: list[dict[str, Any]]) -> None:
    for name, spec in pod_specs(base_docs):
        for container in containers(spec):
            assert image_is_pinned(container["image"]), f"{name}: {container['image']}"


def test_kubernetes_vllm_matches_compose(base_docs: list[dict[str, Any]]) -> None:
    assert k8s_vllm_args(base_docs) == vllm_args("vllm")


def test_kubernetes_vllm_image_matches_compose(base_docs: list[dict[str, Any]]) -> None:
    image = compose()["services"]["vllm"]["image"]

    for name, spec in pod_specs(base_docs):
        if name in ("vllm", "download-models"):
            assert {c["image"] for c in containers(spec)} == {image}


def test_kubernetes_adapters_match_route_targets(
    base_docs: list[dict[str, Any]],
) -> None:
    assert set(lora_modules(k8s_vllm_args(base_docs))) == route_targets()


def test_kubernetes_job_downloads_what_vllm_loads(
    base_docs: list[dict[str, Any]],
) -> None:
    job = by_kind(base_docs, "Job")["download-models"]["spec"]["template"]["spec"]
    download = job["containers"][0]
    args = k8s_vllm_args(base_docs)
    rank = option_value(args, "--max-lora-rank")

    served = [option_value(args, "--model")] + list(lora_modules(args).values())
    assert served == [f"/models/{repo}" for repo in download["args"]]
    assert download["args"] == compose()["services"]["models"]["command"]
    assert container_env(download)["MAX_LORA_RANK"]["value"] == rank
    assert container_env(download)["MODELS_DIR"]["value"] == "/models"


def test_kubernetes_vllm_waits_for_download(base_docs: list[dict[str, Any]]) -> None:
    spec = by_kind(base_docs, "Deployment")["vllm"]["spec"]["template"]["spec"]
    (wait,) = spec["initContainers"]
    rank = option_value(k8s_vllm_args(base_docs), "--max-lora-rank")

    command = " ".join(wait["command"] + wait["args"])
    assert "download-models.sh --check " + " ".join(REPOS) in command
    assert container_env(wait)["MAX_LORA_RANK"]["value"] == rank


def test_kubernetes_vllm_probes_health(base_docs: list[dict[str, Any]]) -> None:
    spec = by_kind(base_docs, "Deployment")["vllm"]["spec"]["template"]["spec"]
    container = spec["containers"][0]

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
        assert container[probe]["httpGet"]["port"] == "http", probe
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]


def test_kubernetes_vllm_requests_gpu(base_docs: list[dict[str, Any]]) -> None:
    container = by_kind(base_docs, "Deployment")["vllm"]["spec"]["template"]["spec"][
        "containers"
    ][0]

    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"


def test_kubernetes_chat_template_is_repository_file(
    base_docs: list[dict[str, Any]],
) -> None:
    configmaps = by_kind(base_docs, "ConfigMap")
    (name,) = [name for name in configmaps if name.startswith("phi2-chat-template")]
    template_path = option_value(k8s_vllm_args(base_docs), "--chat-template")
    spec = by_kind(base_docs, "Deployment")["vllm"]["spec"]["template"]["spec"]

    data = configmaps[name]["data"]
    assert data == {
        "phi2-chat-template.jinja": CHAT_TEMPLATE.read_text(encoding="utf-8")
    }
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {
        mount["mountPath"]: mount for mount in spec["containers"][0]["volumeMounts"]
    }
    mount = mounts[str(Path(template_path).parent)]
    assert volumes[mount["name"]]["configMap"]["name"] == name
    assert Path(template_path).name in data


def test_kubernetes_download_script_is_repository_file(
    base_docs: list[dict[str, Any]],
) -> None:
    configmaps = by_kind(base_docs, "ConfigMap")
    (name,) = [name for name in configmaps if name.startswith("download-models-script")]

    expected = DOWNLOAD_SCRIPT.read_text(encoding="utf-8")
    assert configmaps[name]["data"] == {"download-models.sh": expected}


def test_kubernetes_services_stay_inside_cluster(
    base_docs: list[dict[str, Any]],
) -> None:
    services = by_kind(base_docs, "Service")

    assert set(services) == {"vllm", "pipelines", "open-webui"}
    for name, service in services.items():
        assert service["spec"]["type"] == "ClusterIP", name
    assert not by_kind(base_docs, "Ingress")


def test_kubernetes_network_policy_admits_only_pipelines(
    base_docs: list[dict[str, Any]],
) -> None:
    policies = by_kind(base_docs, "NetworkPolicy")
    deployments = by_kind(base_docs, "Deployment")

    def pod_labels(name: str) -> dict[str, str]:
        return deployments[name]["spec"]["template"]["metadata"]["labels"]

    rules = {
        "vllm": ("pipelines", 8000),
        "pipelines": ("open-webui", 9099),
    }
    for target, (source, port) in rules.items():
        matching = [
            policy
            for policy in policies.values()
            if policy["spec"]["podSelector"]["matchLabels"].items()
            <= pod_labels(target).items()
        ]
        assert len(matching) == 1, f"{target} should have one NetworkPolicy"
        (ingress,) = matching[0]["spec"]["ingress"]
        (peer,) = ingress["from"]
        assert set(peer) == {"podSelector"}
        assert peer["podSelector"]["matchLabels"].items() <= pod_labels(source).items()
        assert ingress["ports"] == [{"protocol": "TCP", "port": port}]


def test_kubernetes_secrets_come_from_secret_objects(
    base_docs: list[dict[str, Any]],
) -> None:
    assert not by_kind(base_docs, "Secret")
    for name, spec in pod_specs(base_docs):
        for container in containers(spec):
            for variable, item in container_env(container).items():
                if SECRET_NAME.search(variable) and variable != "MAX_LORA_RANK":
                    assert "value" not in item, (
                        f"{name}: {variable} has a literal value"
                    )
                    assert "secretKeyRef" in item["valueFrom"], f"{name}: {variable}"


def test_kubernetes_required_secrets_are_not_optional(
    base_docs: list[dict[str, Any]],
) -> None:
    for name, spec in pod_specs(base_docs):
        for container in containers(spec):
            for variable, item in container_env(container).items():
                reference = item.get("valueFrom", {}).get("secretKeyRef")
                if reference is None:
                    continue
                required = reference["key"] in REQUIRED_SECRETS
                assert reference.get("optional", False) is not required, (
                    f"{name}: {variable}"
                )


def test_kubernetes_open_webui_connects_to_pipelines(
    base_docs: list[dict[str, Any]],
) -> None:
    deployments = by_kind(base_docs, "Deployment")
    webui = container_env(
        deployments["open-webui"]["spec"]["template"]["spec"]["containers"][0]
    )
    pipelines = container_env(
        deployments["pipelines"]["spec"]["template"]["spec"]["containers"][0]
    )

    assert webui["OPENAI_API_BASE_URLS"]["value"] == "http://pipelines:9099"
    assert webui["ENABLE_OLLAMA_API"]["value"] == "false"
    assert (
        webui["OPENAI_API_KEYS"]["valueFrom"]
        == pipelines["PIPELINES_API_KEY"]["valueFrom"]
    )
    assert pipelines["VLLM_BASE_URL"]["value"] == "http://vllm:8000/v1"


def test_kubernetes_pipelines_persist_only_valves(
    base_docs: list[dict[str, Any]],
) -> None:
    spec = by_kind(base_docs, "Deployment")["pipelines"]["spec"]["template"]["spec"]

    mounts = [mount["mountPath"] for mount in spec["containers"][0]["volumeMounts"]]
    assert mounts == ["/app/pipelines/semantic_lora_router"]


def test_kubernetes_pods_drop_privileges(base_docs: list[dict[str, Any]]) -> None:
    for name, spec in pod_specs(base_docs):
        if name == "open-webui":
            continue
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in containers(spec):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name


def test_openshift_route_reaches_open_webui(
    openshift_docs: list[dict[str, Any]],
) -> None:
    routes = by_kind(openshift_docs, "Route")
    services = by_kind(openshift_docs, "Service")

    assert set(routes) == {"open-webui"}
    route = routes["open-webui"]["spec"]
    service_ports = {
        port["name"] for port in services[route["to"]["name"]]["spec"]["ports"]
    }
    assert route["port"]["targetPort"] in service_ports
    assert route["tls"]["termination"] == "edge"


def test_openshift_pods_leave_ids_to_openshift(
    openshift_docs: list[dict[str, Any]],
) -> None:
    for name, spec in pod_specs(openshift_docs):
        security = spec.get("securityContext", {})
        for field in ("runAsUser", "runAsGroup", "fsGroup"):
            assert field not in security, f"{name} sets {field}"


def test_openshift_keeps_base_resources(
    base_docs: list[dict[str, Any]], openshift_docs: list[dict[str, Any]]
) -> None:
    def names(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {(doc["kind"], doc["metadata"]["name"]) for doc in docs}

    added = names(openshift_docs) - names(base_docs)
    assert added == {("Route", "open-webui"), ("ServiceAccount", "open-webui")}
    assert names(base_docs) <= names(openshift_docs)
    assert k8s_vllm_args(openshift_docs) == k8s_vllm_args(base_docs)
