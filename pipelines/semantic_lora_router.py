"""
title: Semantic LoRA Router
author: Semantic LoRA Router contributors
version: 0.1.0
license: Apache-2.0
description: Model "auto" sends each chat to the best-matching vLLM LoRA adapter.
requirements: semantic-router[fastembed]==1.1.1, pyyaml, prometheus-client
"""

import functools
import itertools
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import requests
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from requests.adapters import HTTPAdapter

log = logging.getLogger("semantic_lora_router")

AUTO_ID = "auto"

# Only this many characters from each end of a message are embedded. The encoders
# truncate at 256 to 512 tokens anyway, and tokenizing a 200,000-character paste
# would cost more than the whole routing decision.
ROUTING_HEAD_CHARS = 600
ROUTING_TAIL_CHARS = 600

# Fields that Open WebUI adds to a chat request and that vLLM rejects or ignores.
# `user` is an OpenAI field, but Open WebUI sends a dict there.
OPEN_WEBUI_FIELDS = frozenset(
    {
        "user",
        "chat_id",
        "metadata",
        "id",
        "session_id",
        "message_id",
        "parent_id",
        "title",
        "files",
        "features",
        "variables",
        "model_item",
        "tool_ids",
        "tool_servers",
        "filter_ids",
        "background_tasks",
        "params",
    }
)

DEFAULT_ROUTES_YAML = """\
# Default routes for the auto model: the value of the ROUTES valve.
# Each route sends matching chats to one vLLM model (its target, a LoRA adapter);
# a chat that matches no route well enough goes to DEFAULT_MODEL (the base model).
# Fields: name (letters, digits, - and _), target (vLLM model name, defaults to
# name), threshold (0 to 1, defaults to ROUTER_SCORE_THRESHOLD), utterances.
# These routes set no threshold because similarity scores depend on the encoder:
# ROUTER_SCORE_THRESHOLD applies. tools/evaluate_routes.py --fit measures
# per-route thresholds for the encoder you run.
routes:
  - name: doctor
    target: doctor
    utterances:
      - I have had a headache and a fever since yesterday, what should I do?
      - What are the early symptoms of diabetes?
      - Is it safe to take ibuprofen together with paracetamol?
      - My child has a rash and a sore throat, should I see a doctor?
      - How do I know if a cut on my hand is infected?
      - What does high blood pressure do to the body over time?
      - I feel dizzy when I stand up quickly, is that normal?
      - What is the recommended dose of amoxicillin for an adult?
      - Can stress cause chest pain?
      - How long does the flu usually last and when is it contagious?
      - What are the side effects of statins?
      - I have a persistent dry cough at night, what could cause it?
      - How should I treat a sprained ankle at home?
      - What do my blood test results mean if my cholesterol is high?
      - My baby has a high temperature and won't drink, should we go to hospital?
      - I'm pregnant; which medicines are safe to take for a cold?
      - I've felt low and anxious for weeks and can't sleep. Is it depression?
      - My stomach hurts on the lower right side and I feel sick.
      - How many ml of children's paracetamol syrup is right for a 14 kg child?
      - Should a dermatologist look at a mole that has changed?
      - My eye is red, itchy and sticky. Is it conjunctivitis?
      - What is a normal blood sugar level, and when is it too high?
      - How do I care for stitches or a surgical wound while it heals?
      - Do I need antibiotics for a urinary tract infection?
      - I get heartburn and acid reflux after eating; what medicine can I take?
      - Which vaccines do adults need, and when is a booster due?
      - My knee is swollen and painful after a fall. Could it be broken?
      - I get short of breath and feel tired all the time lately.
      - Is some bleeding or cramping normal in early pregnancy?
      - Someone's face and lips are swelling after a sting; is it an allergic reaction?
      - My elderly father is suddenly confused. What could cause that?
      - Can I drink alcohol while I'm on antibiotics?
      - What are the symptoms of an underactive thyroid?
      - Pain from my lower back runs down my leg. Is it sciatica?
      - How is asthma treated, and when should I use my inhaler?
      - I missed a dose of my medication. Should I take it now or skip it?
      - My period is late and irregular; what could be the reason?
      - What is a safe daily amount of iron or vitamin supplements?
      - My joints ache and are stiff every morning. Could it be arthritis?
      - I was bitten by a dog. Do I need a tetanus or rabies shot?
      - Why do I keep getting nosebleeds?
      - How can I treat a burn on my skin at home?
      - What is a normal resting heart rate, and when is a fast pulse a worry?
      - How do I work out my insulin dose for a meal from its carbohydrates?
      - Is it safe to take sleeping pills or melatonin for a long time?
      - I noticed blood in my urine. Should I be worried?
      - How often should I be screened for breast, bowel or cervical cancer?
      - I've had diarrhoea and vomiting for two days. How do I avoid dehydration?
      - My baby cries for hours every evening. Could it be colic?
      - Our newborn looks a bit yellow. Is jaundice dangerous?
      - I hit my head and now feel sick and sleepy. Could it be a concussion?
      - What should I do when someone has a seizure?
      - I have toothache and the gum around it is swollen.
      - How can I treat acne that keeps leaving scars?
      - How do we get rid of head lice or scabies in the family?
      - I think I have hay fever. Which antihistamine works best?
      - My ear hurts and feels blocked after a cold.
      - The vision in one of my eyes has suddenly gone blurry.
      - My heart is racing and sometimes skips a beat.
      - My calf is painful and swollen. Could it be a blood clot?
      - I have a fever and chest pain when I breathe in. Could it be pneumonia?
      - What helps with constipation that has lasted a week?
      - I'm going through the menopause and the hot flushes are awful.
      - Which contraceptive pill has the fewest side effects?
      - Can an enlarged prostate make me pee often at night?
      - Is this rash measles or chickenpox?
      - How do I do CPR on an adult who has collapsed?
      - Someone is choking on food. What should I do?
      - I can't fall asleep and I wake up at 4 am every night.
      - Could I have ADHD as an adult?
      - I might have a sexually transmitted infection. How do I get tested?
      - What causes muscle cramps in the legs at night?
  - name: dcot
    target: dcot
    utterances:
      - Solve 3x + 7 = 22 step by step.
      - A train leaves at 9:40 and travels 210 km at 70 km/h. When does it arrive?
      - If a shirt costs 40 dollars after a 20% discount, what was its price?
      - Think step by step, which number is larger, 2 to the 10th power or 10 cubed?
      - Alice is older than Bob and Bob is older than Carol. Who is the youngest?
      - How many ways can 5 people sit in a row of 5 chairs?
      - A tank fills in 6 hours with one pipe and 3 with another; how long with both?
      - What is the probability of rolling two sixes with two dice?
      - If all bloops are razzies and all razzies are lazzies, are all bloops lazzies?
      - Work out the compound interest on 1000 dollars at 5 percent for 3 years.
      - Three friends split a 96 dollar bill plus a 12% tip. How much does each pay?
      - A farm has chickens and rabbits with 20 heads and 56 legs. How many of each?
      - If 3 workers finish a job in 10 days, how long would 5 workers take?
      - What is the chance of drawing a red card and then a king from a deck?
      - In how many ways can I choose 3 books out of 8?
      - Solve the quadratic equation x^2 + 2x - 15 = 0.
      - Find the area of a triangle whose sides are 5, 12 and 13 cm.
      - What number comes next in the sequence 3, 9, 27, 81, and why?
      - Prove that the square root of 2 is irrational.
      - A says B is lying, B says C is lying, C says A and B both lie. Who is honest?
      - Four friends sit in a row; Dan is not at an end and Eve is left of Dan. Where?
      - What is the average speed of a round trip at 40 km/h out and 60 km/h back?
      - A price rises by 30% and then falls by 30%. What is the net change?
      - A father is three times his son's age; in 12 years he'll be twice. Ages?
      - How many times a day do the hands of a clock overlap?
      - Find the derivative of x^2 * sin(x) using the product rule.
      - Evaluate the integral of 1/x from 1 to e.
      - Estimate how many golf balls fit in a school bus, step by step.
      - I have 50 dollars, spend 40% of it and then a quarter of the rest. What's left?
      - Every manager is an employee and Sam is not an employee. Can Sam be a manager?
      - A mixture is 20% salt. How much water must I add to 10 kg to make it 8% salt?
      - Is 391 a prime number? Check it carefully.
      - What is the sum of the first 50 odd numbers?
      - Five people live in five houses; use the clues to find who owns the fish.
      - On an island of knights and liars, one says 'we are both liars'. Who is who?
      - How many 6-letter passwords can be made if no letter repeats?
      - Solve the simultaneous equations 3x + 2y = 12 and x - y = 1.
      - A right triangle has legs of 6 cm and 8 cm. How long is the hypotenuse?
      - What is the remainder when 2 to the power 20 is divided by 7?
      - Explain the birthday paradox. How many people until a shared birthday is likely?
      - A man points at a portrait and says his father is my father's son. Who is it?
      - Estimate step by step how many cars cross a busy junction in one day.
      - How many rectangles are there in a 3 by 3 grid of squares?
      - A town of 50,000 grows 3% a year. How many people live there after 10 years?
      - If 5 kg of apples cost 12 euros, how much do 8 kg cost?
      - A machine makes 120 parts an hour, then rests 10 minutes. How long for 1,000?
      - Three friends are a baker, a teacher and a pilot. Use the clues to match them.
      - How many different 5-card hands can be dealt from a 52-card deck?
      - Can you solve this brain teaser? Think carefully, it's a trick question.
      - What is the expected number of rolls of a die until I get a six?
      - Solve the inequality 2x - 5 > 7 and explain each step.
      - What is the area of a circle with a diameter of 10 cm?
      - What is the volume of a box that is 20 cm by 15 cm by 10 cm?
      - Find the mean, median and mode of 4, 8, 8, 10 and 15.
      - What is the standard deviation of 2, 4, 4, 4, 5, 5, 7 and 9?
      - What is the chance of getting exactly two heads in four coin flips?
      - Find the greatest common divisor of 84 and 126.
      - Is 2,345,678 divisible by 3? Explain the rule you use.
      - With a balance scale, find the one heavier coin among 9 in two weighings.
      - How can three missionaries and three cannibals all cross the river safely?
      - Three people wear red or blue hats and see only the others'. How can they guess?
      - Which plan is cheaper for 300 minutes, 10 plus 5 cents a minute or 25 flat?
      - Five tasks depend on each other. What is the shortest time to finish them all?
      - My flight leaves at 23:50 and takes 7 hours 25 minutes. What time does it land?
      - A rectangle's diagonal is 10 cm and one side is 6 cm. What is its perimeter?
      - Here is a logic puzzle with four clues. Work out who lives in which house.
      - How much fencing do I need around a rectangular field 40 m by 25 m?
"""


# --- Routes: the ROUTES valve ------------------------------------------------

ROUTE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ROUTE_KEYS = ("name", "target", "threshold", "path", "utterances")
MAX_ROUTES = 64
MAX_UTTERANCES = 1000
MAX_UTTERANCE_CHARS = 2000
# Checked before parsing: PyYAML read about 1.3 MB a second on the test machine,
# and the Pipelines server handles no other request while it validates an update.
MAX_ROUTES_CHARS = 2_000_000


class InvalidRoutes(ValueError):
    """The ROUTES valve cannot be used; the message names the route and field."""


@dataclass(frozen=True)
class RouteSpec:
    """One route: chats like `utterances` go to the vLLM model `target`."""

    name: str
    target: str
    utterances: tuple[str, ...]
    threshold: float | None = None
    # The adapter's folder as vLLM sees it. When vLLM does not serve `target`
    # yet, the router loads it from here (vLLM must allow runtime LoRA updates).
    path: str | None = None


def parse_routes(text: str) -> tuple[RouteSpec, ...]:
    """Parse and check the routes YAML (JSON is valid YAML too).

    The document is either a mapping with a `routes` list or the list itself.
    Raises InvalidRoutes with a message that names the route and field at fault.
    """
    if len(text) > MAX_ROUTES_CHARS:
        raise InvalidRoutes(
            f"ROUTES is {len(text):,} characters long; at most {MAX_ROUTES_CHARS:,}"
        )
    try:
        document = yaml.safe_load(text)
    except RecursionError:
        raise InvalidRoutes("ROUTES is nested too deeply to be parsed") from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise InvalidRoutes(f"ROUTES is not valid YAML{where}: {problem}") from None

    if isinstance(document, dict) and set(document) == {"routes"}:
        document = document["routes"]
    if document is None:
        raise InvalidRoutes("ROUTES is empty: define at least one route")
    if not isinstance(document, list):
        raise InvalidRoutes(
            "ROUTES must be a list of routes or a mapping with a 'routes' list, "
            f"got {type(document).__name__}"
        )
    if not document:
        raise InvalidRoutes("ROUTES is empty: define at least one route")
    if len(document) > MAX_ROUTES:
        raise InvalidRoutes(f"ROUTES has {len(document)} routes; at most {MAX_ROUTES}")

    routes = tuple(_parse_route(i + 1, item) for i, item in enumerate(document))
    _check_unique(routes)
    return routes


def _parse_route(position: int, item: Any) -> RouteSpec:
    label = f"route {position}"
    if not isinstance(item, dict):
        raise InvalidRoutes(
            f"{label}: must be a mapping with name and utterances, "
            f"got {type(item).__name__}"
        )
    unknown = sorted(str(key) for key in item if key not in ROUTE_KEYS)
    if unknown:
        raise InvalidRoutes(
            f"{label}: unknown field {', '.join(unknown)}; "
            f"allowed are {', '.join(ROUTE_KEYS)}"
        )

    name = item.get("name")
    if not isinstance(name, str) or not ROUTE_NAME_PATTERN.match(name):
        raise InvalidRoutes(
            f"{label}: 'name' must be 1 to 64 letters, digits, '-' or '_', got {name!r}"
        )
    label = f"route {position} ({name})"

    target = item.get("target", name)
    if not isinstance(target, str) or not target.strip() or " " in target.strip():
        raise InvalidRoutes(
            f"{label}: 'target' must be the name of a model that vLLM serves, "
            f"got {target!r}"
        )

    threshold = item.get("threshold")
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0.0 <= threshold <= 1.0
    ):
        raise InvalidRoutes(
            f"{label}: 'threshold' must be a number from 0 to 1, got {threshold!r}"
        )

    path = item.get("path")
    if path is not None and (not isinstance(path, str) or not path.strip()):
        raise InvalidRoutes(
            f"{label}: 'path' must be the adapter's folder on the vLLM host, "
            f"got {path!r}"
        )

    return RouteSpec(
        name=name,
        target=target.strip(),
        utterances=_parse_utterances(label, item.get("utterances")),
        threshold=None if threshold is None else float(threshold),
        path=None if path is None else path.strip(),
    )


def _parse_utterances(label: str, utterances: Any) -> tuple[str, ...]:
    if not isinstance(utterances, list) or not utterances:
        raise InvalidRoutes(f"{label}: 'utterances' must be a non-empty list of text")
    if len(utterances) > MAX_UTTERANCES:
        raise InvalidRoutes(
            f"{label}: 'utterances' has {len(utterances)} entries; "
            f"at most {MAX_UTTERANCES}"
        )
    cleaned: list[str] = []
    for number, utterance in enumerate(utterances, start=1):
        if not isinstance(utterance, str) or not utterance.strip():
            raise InvalidRoutes(
                f"{label}: utterance {number} must be non-empty text, got {utterance!r}"
            )
        if not _is_valid_unicode(utterance):
            raise InvalidRoutes(
                f"{label}: utterance {number} contains half of a UTF-16 surrogate "
                "pair (an escape such as \\ud83d without its partner)"
            )
        if len(utterance) > MAX_UTTERANCE_CHARS:
            raise InvalidRoutes(
                f"{label}: utterance {number} is longer than "
                f"{MAX_UTTERANCE_CHARS} characters"
            )
        if utterance.strip() not in cleaned:
            cleaned.append(utterance.strip())
    return tuple(cleaned)


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_unique(routes: tuple[RouteSpec, ...]) -> None:
    owner: dict[str, str] = {}
    for route in routes:
        if route.name in {other.name for other in routes if other is not route}:
            raise InvalidRoutes(f"route name {route.name!r} is used more than once")
        for utterance in route.utterances:
            first = owner.setdefault(utterance, route.name)
            if first != route.name:
                raise InvalidRoutes(
                    f"utterance {utterance!r} is in both route {first} and route "
                    f"{route.name}; keep it in one"
                )


# --- Valves -------------------------------------------------------------------


def one_line_routes(text: str) -> str:
    """Return valid routes as one line of JSON, and any other text unchanged.

    Open WebUI's valves page shows ROUTES in a one-line field that drops the line
    breaks of what is typed there, so YAML edited in place turns into one
    comment. JSON is YAML too, and survives the field.
    """
    try:
        parse_routes(text)
        return json.dumps(yaml.safe_load(text), ensure_ascii=False)
    except (InvalidRoutes, TypeError, ValueError):
        return text


def _routes_default() -> str:
    """Read the default ROUTES: env ROUTES, else the file named by ROUTES_FILE."""
    if os.environ.get("ROUTES"):
        return one_line_routes(os.environ["ROUTES"])
    path = os.environ.get("ROUTES_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as file:
                return one_line_routes(file.read())
        except OSError as exc:
            log.error(
                "ROUTES_FILE %s cannot be read (%s); using built-in routes",
                path,
                exc.strerror,
            )
    return DEFAULT_ROUTES


DEFAULT_ROUTES = one_line_routes(DEFAULT_ROUTES_YAML)
# Set once Pipeline.on_startup has run: from then on, valves are updates.
STARTED = threading.Event()
UNSENDABLE_KEY = (
    "VLLM_API_KEY contains a character that an HTTP header cannot carry (often "
    "an invisible one pasted with the key, or a line break); type the key again"
)


def is_header_safe(value: str) -> bool:
    """Tell whether `value` can be sent in an HTTP header as it is."""
    return all(" " <= char <= "\xff" and char != "\x7f" for char in value)


OPTIONAL_TEXT_VALVES = ("VLLM_API_KEY", "DEFAULT_MODEL", "ENCODER_LOCAL_DIR")
# Validation context that checks a value as given, without environment defaults.
WITHOUT_ENV: dict[str, bool] = {"without_env": True}


class Valves(BaseModel):
    """Settings shown in Open WebUI under Admin > Settings > Pipelines.

    Each field's default comes from the environment variable of the same name.
    A value that fails validation is rejected before the Pipelines server saves it.
    """

    # Error messages never echo the input value, so a key typed into the wrong
    # field cannot reach the server's log.
    model_config = ConfigDict(hide_input_in_errors=True, extra="ignore")

    VLLM_BASE_URL: str = Field(
        title="vLLM Base URL",
        default="http://vllm:8000/v1",
        description="vLLM's OpenAI-compatible API, for example http://vllm:8000/v1 "
        "(/v1 is added when missing).",
    )
    VLLM_API_KEY: str = Field(
        title="vLLM API Key",
        default="",
        repr=False,
        description="The key that vLLM was started with (--api-key); empty if none.",
    )
    ROUTES: str = Field(
        default=DEFAULT_ROUTES,
        description="Routes as JSON or YAML: a list of {name, target, threshold, "
        "utterances}. target is the vLLM model (adapter) and defaults to name.",
    )
    DEFAULT_MODEL: str = Field(
        default="",
        description="vLLM model that answers when no route matches; empty means "
        "vLLM's base model.",
    )
    # NOTE: 0.7 is an estimate for bge-small-en-v1.5, whose similarities run high;
    # it was not measured here because that model cannot be downloaded offline.
    # all-MiniLM-L6-v2 separates the default routes from small talk at about 0.4.
    ROUTER_SCORE_THRESHOLD: float = Field(
        default=0.7,
        ge=0.0,
        le=1.0,
        description="Similarity (0 to 1) a chat needs to take a route that sets "
        "no threshold of its own. Depends on the encoder: about 0.7 for "
        "bge-small-en-v1.5, 0.4 for all-MiniLM-L6-v2.",
    )
    ROUTER_AGGREGATION: Literal["max", "mean"] = Field(
        default="max",
        description="How a route's score combines its utterances' similarities: "
        "max (the closest utterance) or mean.",
    )
    ENCODER_MODEL: str = Field(
        default="BAAI/bge-small-en-v1.5",
        description="fastembed embedding model used for routing.",
    )
    ENCODER_LOCAL_DIR: str = Field(
        default="",
        description="Folder with the encoder on local disk, for sites without "
        "internet: either the model's ONNX and tokenizer files, or a fastembed "
        "cache folder. Empty downloads the model on first use.",
    )
    ROUTING_USER_TURNS: int = Field(
        default=3,
        ge=1,
        le=20,
        description="How many recent user messages routing reads. The last "
        "message decides alone when it matches a route; when it does not and "
        "reads as a short follow-up, the recent ones together decide.",
    )
    SHOW_ROUTING_STATUS: bool = Field(
        default=True,
        description="Show above each answer of auto which model answered and why.",
    )
    VLLM_CONNECT_TIMEOUT: float = Field(
        title="vLLM Connect Timeout",
        default=5.0,
        gt=0,
        le=600,
        description="Seconds to wait for a connection to vLLM.",
    )
    VLLM_READ_TIMEOUT: float = Field(
        title="vLLM Read Timeout",
        default=300.0,
        gt=0,
        le=3600,
        description="Seconds to wait for vLLM's next bytes (first token included).",
    )
    METRICS_PORT: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port for Prometheus metrics (routing decisions, fallbacks, "
        "upstream errors, routing latency); 0 turns them off.",
    )
    METRICS_HOST: str = Field(
        default="0.0.0.0",
        description="Address the metrics port listens on.",
    )
    MODEL_LIST_TTL: float = Field(
        title="Model List TTL",
        default=60.0,
        ge=1,
        le=86400,
        description="Seconds before the list of vLLM's models is read again.",
    )

    @field_validator("VLLM_BASE_URL")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(
                "VLLM_BASE_URL must start with http:// or https:// and name a "
                "host, for example http://vllm:8000/v1"
            )
        # Checked on updates only, like the checks below.
        if STARTED.is_set() and re.search(r"[\s?#]", value):
            raise ValueError(
                "VLLM_BASE_URL must not contain spaces, a query (?) or a "
                "fragment (#), for example http://vllm:8000/v1"
            )
        if not value.endswith("/v1"):
            value += "/v1"
        return value

    @field_validator("ROUTES")
    @classmethod
    def _check_routes(cls, value: str) -> str:
        parse_routes(value)
        return value

    # The Pipelines server exits when the valves it saved fail validation at
    # start. So the checks below apply only to updates, once the plugin has
    # started. A saved value that fails them is reported when it is used.
    @field_validator("ENCODER_MODEL")
    @classmethod
    def _check_encoder_model(cls, value: str) -> str:
        value = value.strip()
        supported = supported_encoders()
        if STARTED.is_set() and supported and value not in supported:
            raise ValueError(
                f"ENCODER_MODEL {value!r} is not a fastembed text model; "
                "see fastembed's TextEmbedding.list_supported_models()"
            )
        return value

    @field_validator("ENCODER_LOCAL_DIR")
    @classmethod
    def _check_encoder_dir(cls, value: str) -> str:
        value = value.strip()
        if STARTED.is_set() and value and not os.path.isdir(value):
            raise ValueError(f"ENCODER_LOCAL_DIR {value!r} is not a folder")
        return value

    @field_validator("VLLM_API_KEY")
    @classmethod
    def _check_api_key(cls, value: str) -> str:
        value = value.strip()
        if STARTED.is_set() and not is_header_safe(value):
            raise ValueError(UNSENDABLE_KEY)
        return value

    @field_validator("DEFAULT_MODEL")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    # Open WebUI's Admin > Settings > Pipelines page (0.12.4) marks every text
    # field it shows as required, so a form with an empty field cannot be saved.
    # It hides a field whose value is null and sends null for it. So the valves
    # that may be empty travel as null and come back as "".
    @field_validator(*OPTIONAL_TEXT_VALVES, mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value

    # Open WebUI builds a Function's valves as Valves(**saved), and the Pipelines
    # server replaces the whole set on an update, so a valve that is not given
    # takes its environment variable here, not only in Pipeline().
    @model_validator(mode="before")
    @classmethod
    def _fill_from_env(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or info.context is WITHOUT_ENV:
            return data
        return {**env_defaults(), **data}

    @field_serializer(*OPTIONAL_TEXT_VALVES)
    def _empty_is_null(self, value: str) -> str | None:
        return value or None


@functools.lru_cache(maxsize=1)
def supported_encoders() -> frozenset[str]:
    """Return fastembed's text model names, or nothing if fastembed is missing."""
    try:
        from fastembed import TextEmbedding
    except ImportError:
        return frozenset()
    return frozenset(m["model"] for m in TextEmbedding.list_supported_models())


def env_defaults() -> dict[str, Any]:
    """Return the valve values that environment variables of the same names set.

    A variable with an invalid value is logged and left out, so the built-in
    default applies and one typo cannot stop the plugin from loading.
    """
    values: dict[str, Any] = {"ROUTES": _routes_default()}
    for name in Valves.model_fields:
        if name != "ROUTES" and name in os.environ:
            values[name] = os.environ[name]

    good: dict[str, Any] = {}
    for name, value in values.items():
        try:
            Valves.model_validate({name: value}, context=WITHOUT_ENV)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            log.error(
                "environment variable %s is invalid and ignored: %s", name, reason
            )
            continue
        good[name] = value
    return good


def valves_from_env() -> Valves:
    """Build the valves from the environment and the built-in defaults."""
    return Valves()


# --- Messages: what routing reads ---------------------------------------------


def message_text(content: Any) -> str:
    """Return the text of a message's content: a string or a list of parts.

    Image and other non-text parts are skipped, so an image-only message has none.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts)
    return ""


def clip_for_routing(text: str) -> str:
    """Keep the head and tail of a long message: routing reads a bounded part.

    Lone UTF-16 surrogates ("\\ud83d" in JSON is valid JSON but not valid
    Unicode) become "?", because the encoder's tokenizer rejects them.
    """
    text = text.strip()
    if len(text) > ROUTING_HEAD_CHARS + ROUTING_TAIL_CHARS:
        text = f"{text[:ROUTING_HEAD_CHARS]} ... {text[-ROUTING_TAIL_CHARS:]}"
    return text.encode("utf-8", errors="replace").decode("utf-8")


# Words that point back at earlier turns ("how much of it", "is that bad").
REFERRING_WORDS = frozenset(
    "it its it's that this these those they them their theirs she her hers he "
    "him his there same".split()
)
CONTINUATION_STARTS = (
    "and ",
    "but ",
    "so ",
    "also ",
    "then ",
    "what about ",
    "how about ",
    "what if ",
)
FOLLOW_UP_MAX_WORDS = 15
# A follow-up leaves the conversation's route only for a route it matches by
# this much above that route's threshold. NOTE: chosen on all-MiniLM-L6-v2,
# whose scores spread wider than bge-small-en-v1.5's.
FOLLOW_UP_MARGIN = 0.15


def looks_like_follow_up(text: str) -> bool:
    """Tell whether a message reads as a follow-up that needs earlier turns.

    A short message that refers back ("And how much of it can I give her?") is
    one; a short message that stands alone ("Write me a poem") starts a new
    topic. The word lists are English only.
    """
    words = re.findall(r"[a-z']+", text.lower())
    if not words or len(words) > FOLLOW_UP_MAX_WORDS:
        return False
    lowered = " ".join(words) + " "
    return lowered.startswith(CONTINUATION_STARTS) or any(
        word in REFERRING_WORDS for word in words
    )


def recent_user_texts(messages: Any, turns: int) -> list[str]:
    """Return the text of the last `turns` user messages, oldest first.

    The last entry is the current message; it is empty when that message has no
    text (an image, say). Assistant, system and tool messages are not routed on:
    the question is in what the user wrote.
    """
    if not isinstance(messages, list):
        return []
    texts: list[str] = []
    for message in reversed(messages):
        if len(texts) == turns:
            break
        if isinstance(message, dict) and message.get("role") == "user":
            texts.append(clip_for_routing(message_text(message.get("content"))))
    texts.reverse()
    return texts


# --- Router: semantic-router with a local fastembed encoder -------------------


class RouterUnavailable(Exception):
    """The encoder or router could not be built; auto cannot route."""


@dataclass(frozen=True)
class RouteDecision:
    """A routing decision for one chat: the target route and the scores behind it.

    `route` is None when no route passed its threshold; `best` and `score` still
    name the closest route, so the log shows how near it came.
    """

    route: RouteSpec | None
    best: str | None
    score: float
    threshold: float
    runner_up: str | None
    runner_up_score: float
    elapsed_ms: float
    basis: str  # "message", "conversation" or "no text"


# onnxruntime threads per encoder call. With its default (one per core) each
# call uses every core and its idle threads spin after the call, taking CPU from
# vLLM on the same machine. With one thread, concurrent requests still encode in
# parallel, because Pipelines runs each pipe() call in its own thread. On a
# loaded 2-core machine this halved the CPU time per routing decision.
ENCODER_THREADS = 1
ENCODER_BATCH_SIZE = 16

_encoders: dict[tuple[str, str], Any] = {}
_encoders_lock = threading.Lock()


def load_encoder(model: str, local_dir: str) -> Any:
    """Load a fastembed encoder once per (model, folder); later calls reuse it.

    A folder that contains ONNX files is used as the model itself; any other folder
    is fastembed's cache, where the model is downloaded if it is not there yet.
    """
    key = (model, local_dir)
    with _encoders_lock:
        if key in _encoders:
            return _encoders[key]
        try:
            from semantic_router.encoders import FastEmbedEncoder
        except ImportError as exc:
            raise RouterUnavailable(
                f"semantic-router with fastembed is not installed ({exc}); "
                "run pip install 'semantic-router[fastembed]==1.1.1'"
            ) from None

        class LocalFastEmbedEncoder(FastEmbedEncoder):
            model_path: str | None = None

            def _initialize_client(self) -> Any:
                if not self.model_path:
                    return super()._initialize_client()  # type: ignore[no-untyped-call]
                from fastembed import TextEmbedding

                return TextEmbedding(
                    model_name=self.name,
                    specific_model_path=self.model_path,
                    threads=self.threads,
                )

            def __call__(self, docs: list[str]) -> list[list[float]]:
                """Embed `docs`, returning the vectors in the order of `docs`.

                A batch is padded to its longest text, so texts are embedded
                shortest first in small batches. For the default routes' 139
                utterances this cut the CPU time of building the router by 40 %.
                """
                order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
                vectors: list[list[float]] = [[] for _ in docs]
                try:
                    embedded = self._client.embed(
                        [docs[i] for i in order], batch_size=ENCODER_BATCH_SIZE
                    )
                    for index, vector in zip(order, embedded, strict=True):
                        vectors[index] = vector.tolist()
                except Exception as exc:
                    raise ValueError(f"FastEmbed embed failed. Error: {exc}") from exc
                return vectors

        try:
            has_onnx = bool(local_dir) and any(
                name.endswith(".onnx") for name in os.listdir(local_dir)
            )
        except OSError as exc:
            raise RouterUnavailable(
                f"ENCODER_LOCAL_DIR {local_dir} cannot be read ({exc.strerror}); "
                "fix the ENCODER_LOCAL_DIR valve"
            ) from None
        try:
            encoder = LocalFastEmbedEncoder(
                name=model,
                model_path=local_dir if has_onnx else None,
                cache_dir=(local_dir or None) if not has_onnx else None,
                threads=ENCODER_THREADS,
            )
        except Exception as exc:  # noqa: BLE001 - fastembed raises many kinds
            where = f"from {local_dir}" if local_dir else "(download)"
            raise RouterUnavailable(
                f"the encoder {model} could not be loaded {where}: "
                f"{type(exc).__name__}: {str(exc)[:200]}. Check the ENCODER_MODEL "
                "and ENCODER_LOCAL_DIR valves"
            ) from None
        _encoders[key] = encoder
        return encoder


class SemanticRouting:
    """A built router for one set of routes; never changed after it is built.

    Thresholds are applied here, not by semantic-router, so a valves update that
    changes only thresholds reuses the embedded utterances.
    """

    def __init__(
        self,
        routes: tuple[RouteSpec, ...],
        index_router: Any,
        index_key: tuple[Any, ...],
        default_threshold: float,
        user_turns: int,
    ) -> None:
        self.routes = {route.name: route for route in routes}
        self.index_router = index_router
        self.index_key = index_key
        self.default_threshold = default_threshold
        self.user_turns = user_turns

    @classmethod
    def build(
        cls, valves: Valves, previous: "SemanticRouting | None"
    ) -> "SemanticRouting":
        """Build a router for `valves`, reusing `previous`'s index where it fits."""
        routes = parse_routes(valves.ROUTES)
        encoder = load_encoder(valves.ENCODER_MODEL, valves.ENCODER_LOCAL_DIR)
        index_key = (
            id(encoder),
            valves.ROUTER_AGGREGATION,
            tuple((route.name, route.utterances) for route in routes),
        )
        if previous is not None and previous.index_key == index_key:
            index_router = previous.index_router
        else:
            index_router = _build_index_router(
                routes, encoder, valves.ROUTER_AGGREGATION
            )
        return cls(
            routes,
            index_router,
            index_key,
            valves.ROUTER_SCORE_THRESHOLD,
            valves.ROUTING_USER_TURNS,
        )

    def threshold(self, name: str) -> float:
        route = self.routes[name]
        return self.default_threshold if route.threshold is None else route.threshold

    def scores(self, text: str) -> list[tuple[str, float]]:
        """Return every route's score for `text`, best first.

        The result equals IndexedRouter's `router(text, limit=None,
        threshold=-inf)` without a calibrator: the index returns the nearest
        utterances, and each route aggregates its hits (0.0 without a hit).
        Calling the encoder and the index here avoids the sync call's route
        through semantic-router's one background event loop and two thread hops,
        which queued concurrent requests behind each other.
        """
        import numpy as np

        router = self.index_router
        vector = np.asarray(router.encoder([text])[0])
        similarities, names = router.index.query(vector=vector, top_k=router.top_k)
        hits: dict[str, list[float]] = {route.name: [] for route in router.routes}
        for name, similarity in zip(names, similarities, strict=True):
            hits.setdefault(name, []).append(float(similarity))
        scores = {
            name: float(router.aggregate(values)) if values else 0.0
            for name, values in hits.items()
        }
        return sorted(scores.items(), key=lambda item: item[1], reverse=True)

    def decide(self, messages: Any) -> RouteDecision:
        """Choose a route for a chat, or none.

        The last user message decides when a route passes its threshold on it.
        A message that reads as a follow-up (or has no text) must pass by
        FOLLOW_UP_MARGIN; otherwise the recent user messages together decide,
        so "and how much can I give her?" stays with the conversation's route
        while "write me a poem" goes to the default model.
        """
        started = time.perf_counter()
        texts = recent_user_texts(messages, self.user_turns)
        current = texts[-1] if texts else ""
        conversation = "\n".join(text for text in texts if text)

        ranked: list[tuple[str, float]] = []
        basis = "no text"
        if current:
            ranked, basis = self.scores(current), "message"
        follow_up = not current or looks_like_follow_up(current)
        if (
            follow_up
            and conversation
            and conversation != current
            and not self._passes(ranked, margin=FOLLOW_UP_MARGIN)
        ):
            joined = self.scores(conversation)
            if self._passes(joined) or not ranked:
                ranked, basis = joined, "conversation"

        best, score = ranked[0] if ranked else (None, 0.0)
        runner_up, runner_up_score = ranked[1] if len(ranked) > 1 else (None, 0.0)
        return RouteDecision(
            route=self.routes[best] if best and self._passes(ranked) else None,
            best=best,
            score=score,
            threshold=self.threshold(best) if best else self.default_threshold,
            runner_up=runner_up,
            runner_up_score=runner_up_score,
            elapsed_ms=(time.perf_counter() - started) * 1000,
            basis=basis,
        )

    def _passes(self, ranked: list[tuple[str, float]], margin: float = 0.0) -> bool:
        return bool(ranked) and ranked[0][1] >= self.threshold(ranked[0][0]) + margin


def _build_index_router(
    routes: tuple[RouteSpec, ...], encoder: Any, aggregation: Literal["max", "mean"]
) -> Any:
    from semantic_router import IndexedRouter, Route

    total = sum(len(route.utterances) for route in routes)
    try:
        return IndexedRouter(
            encoder=encoder,
            routes=[Route(name=r.name, utterances=list(r.utterances)) for r in routes],
            # Every utterance is a hit, so every route gets a score and the log can
            # name the runner-up.
            top_k=total,
            aggregation=aggregation,
        )
    except Exception as exc:  # noqa: BLE001 - any encoder failure means no router
        raise RouterUnavailable(
            f"the router could not embed the routes' utterances: "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from None


# --- vLLM client ----------------------------------------------------------------


class UpstreamError(Exception):
    """A request to vLLM failed; str() is a sentence for the chat user."""

    status_code = 502


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    status_code = 504


class UpstreamHTTPError(UpstreamError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.status_code = status if 400 <= status < 500 else 502


class UnknownModel(UpstreamHTTPError):
    """vLLM answered 404: it does not serve the requested model."""


@dataclass(frozen=True)
class ServedModel:
    """A model that vLLM serves, under the id this manifold offers for it."""

    id: str
    name: str
    parent: str | None


# vLLM (0.32) rejects a chat that carries `tools` with HTTP 400 and a message
# naming this flag when it was started without a tool parser, because
# `tool_choice` defaults to "auto" once tools are present.
NO_TOOL_PARSER_HINT = "--enable-auto-tool-choice"
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")


def without_tools(payload: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in payload.items() if key not in TOOL_FIELDS}


class VllmClient:
    """One pooled HTTP session to vLLM's OpenAI-compatible API."""

    def __init__(
        self, base_url: str, api_key: str, connect_timeout: float, read_timeout: float
    ) -> None:
        self.base_url = base_url
        self.timeout = (connect_timeout, read_timeout)
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=128, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["Content-Type"] = "application/json"
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self._api_key = api_key
        # Set once vLLM rejected a chat's tools because it has no tool parser.
        self.drops_tools = False

    def __repr__(self) -> str:
        return f"VllmClient({self.base_url!r})"

    def close(self) -> None:
        self.session.close()

    def list_models(self) -> list[dict[str, Any]]:
        response = self._send("GET", "/models", stream=False)
        try:
            data = response.json()["data"]
        except (ValueError, KeyError, TypeError):
            raise UpstreamError(
                f"{self.base_url}/models did not return an OpenAI model list; "
                "check that VLLM_BASE_URL points at vLLM"
            ) from None
        return [entry for entry in data if isinstance(entry, dict) and "id" in entry]

    def chat(self, payload: dict[str, Any], stream: bool) -> requests.Response:
        """Send a chat completion request to vLLM.

        Open WebUI 0.12 adds its built-in tools to every chat sent from its UI.
        A vLLM started without --enable-auto-tool-choice rejects such a chat, so
        after the first rejection this client sends chats without their tool
        fields until it is rebuilt (when the valves change or the server restarts).
        """
        if self.drops_tools and "tools" in payload:
            payload = without_tools(payload)
        try:
            return self._send(
                "POST", "/chat/completions", stream=stream, payload=payload
            )
        except UpstreamHTTPError as exc:
            if (
                exc.status != 400
                or "tools" not in payload
                or NO_TOOL_PARSER_HINT not in str(exc)
            ):
                raise
        self.drops_tools = True
        log.warning(
            "vLLM at %s has no tool parser, so chats are sent without their tools; "
            "start vLLM with --enable-auto-tool-choice --tool-call-parser to use them",
            self.base_url,
        )
        return self._send(
            "POST", "/chat/completions", stream=stream, payload=without_tools(payload)
        )

    def load_adapter(self, name: str, path: str) -> None:
        """Ask vLLM to load a LoRA adapter at run time.

        Raises UnknownModel when vLLM does not offer the endpoint, which it
        only does with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.
        """
        payload = {"lora_name": name, "lora_path": path}
        try:
            self._send("POST", "/load_lora_adapter", stream=False, payload=payload)
        except UnknownModel as exc:
            # A missing endpoint is FastAPI's plain 404, but a path that contains
            # no adapter is a 404 with vLLM's own message.
            if str(exc).endswith(": Not Found"):
                raise
            raise UpstreamHTTPError(str(exc), exc.status) from None
        except UpstreamHTTPError as exc:
            # vLLM returns 400 for a name it already serves: the goal is met.
            if exc.status == 400 and "already" in str(exc).lower():
                return
            raise

    def _send(
        self,
        method: str,
        path: str,
        stream: bool,
        payload: dict[str, Any] | None = None,
    ) -> requests.Response:
        url = self.base_url + path
        try:
            response = self.session.request(
                method,
                url,
                data=None if payload is None else json.dumps(payload),
                stream=stream,
                timeout=self.timeout,
            )
        except requests.ConnectTimeout:
            raise UpstreamTimeout(
                f"vLLM at {self.base_url} did not accept a connection within "
                f"{self.timeout[0]:g} s; check that it is running and "
                "VLLM_BASE_URL is right"
            ) from None
        except requests.ReadTimeout:
            raise UpstreamTimeout(
                f"vLLM at {self.base_url} sent nothing for {self.timeout[1]:g} s; "
                "it may be overloaded (VLLM_READ_TIMEOUT sets the limit)"
            ) from None
        except (UnicodeError, requests.exceptions.InvalidHeader):
            # http.client encodes headers as Latin-1 and refuses line breaks.
            raise UpstreamUnavailable(
                f"the request to vLLM at {self.base_url} could not be sent: "
                f"{UNSENDABLE_KEY}"
            ) from None
        except requests.RequestException as exc:
            raise UpstreamUnavailable(
                f"vLLM at {self.base_url} could not be reached "
                f"({_connection_reason(exc)}); check that it is running and "
                "VLLM_BASE_URL is right"
            ) from None

        if response.status_code >= 400:
            detail = upstream_error_detail(response)
            if self._api_key:
                # A proxy in front of vLLM may repeat the request's headers.
                detail = detail.replace(self._api_key, "[VLLM_API_KEY]")
            response.close()
            error_type = (
                UnknownModel if response.status_code == 404 else UpstreamHTTPError
            )
            raise error_type(
                f"vLLM returned HTTP {response.status_code}: {detail}",
                response.status_code,
            )
        return response


def _connection_reason(exc: requests.RequestException) -> str:
    text = str(exc)
    for reason in (
        "Connection refused",
        "Name or service not known",
        "No route to host",
        "Temporary failure in name resolution",
        "Connection reset",
        "Remote end closed",
    ):
        if reason.lower() in text.lower():
            return reason.lower()
    return type(exc).__name__


def upstream_error_detail(response: requests.Response) -> str:
    """Return vLLM's error message: {"error": {"message"}} or a flat body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason or "no details"
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail")
            if message:
                return str(message)[:300]
        elif isinstance(error, str):
            return error[:300]
        detail = body.get("detail")
        if isinstance(detail, str):
            return detail[:300]
    return json.dumps(body)[:300]


# --- Adapters loaded on demand ------------------------------------------------


class AdapterLoader:
    """Loads a route's adapter into vLLM once, however many requests need it.

    Concurrent first requests wait for the one load. A failed load is not
    retried for RETRY_AFTER seconds, so a broken path does not cost every
    request a round trip.
    """

    RETRY_AFTER = 30.0

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._failures: dict[str, tuple[float, str]] = {}

    def ensure(
        self, client: VllmClient, catalog: "ModelCatalog", name: str, path: str
    ) -> str | None:
        """Load adapter `name` from `path` unless vLLM serves it; return why not."""
        with self._locks_lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name in catalog.names():
                return None
            failed = self._failures.get(name)
            if failed and time.monotonic() - failed[0] < self.RETRY_AFTER:
                return failed[1]
            try:
                client.load_adapter(name, path)
            except UnknownModel:
                reason = (
                    "vLLM does not load adapters at run time; start it with "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True or register the "
                    "adapter with --lora-modules"
                )
            except UpstreamError as exc:
                reason = f"Loading it from {path} failed: {exc}"
            else:
                catalog.refresh(client)
                self._failures.pop(name, None)
                log.info("loaded adapter %s from %s into vLLM", name, path)
                return None
            self._failures[name] = (time.monotonic(), reason)
            return reason


# --- Metrics --------------------------------------------------------------------


class Metrics:
    """Prometheus counters for routing, served on METRICS_PORT when it is set.

    The Pipelines server re-imports the plugin on every reload, so the metric
    objects and the HTTP server are kept on the prometheus_client module,
    which is imported once per process, and reused.
    """

    def __init__(self) -> None:
        self.enabled = False
        self._metrics: dict[str, Any] = {}

    def serve(self, host: str, port: int) -> None:
        """Serve the metrics on host:port and close any other port served before.

        Port 0 closes them all and stops counting.
        """
        self.enabled = False
        try:
            import prometheus_client
        except ImportError:
            if port:
                log.error("METRICS_PORT is set but prometheus-client is not installed")
            return
        state: dict[str, Any] = getattr(prometheus_client, "_lora_router_state", {})
        servers = state.get("servers", {})
        for address in [a for a in servers if a != (host, port) or not port]:
            httpd, _ = servers.pop(address)
            httpd.shutdown()
            httpd.server_close()
            log.info("Prometheus metrics on %s:%d closed", *address)
        if not port:
            return
        if not state:
            registry = prometheus_client.CollectorRegistry()
            state = {
                "registry": registry,
                "servers": {},
                "decisions": prometheus_client.Counter(
                    "lora_router_decisions",
                    "Routing decisions of auto, by route (none: default model).",
                    ["route"],
                    registry=registry,
                ),
                "fallbacks": prometheus_client.Counter(
                    "lora_router_fallbacks",
                    "Requests answered by the default model instead of the "
                    "routed adapter, by reason.",
                    ["reason"],
                    registry=registry,
                ),
                "upstream_errors": prometheus_client.Counter(
                    "lora_router_upstream_errors",
                    "Failed requests to vLLM, by kind.",
                    ["kind"],
                    registry=registry,
                ),
                "routing_seconds": prometheus_client.Histogram(
                    "lora_router_routing_seconds",
                    "Time to choose a route (embedding and scoring).",
                    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
                    registry=registry,
                ),
            }
            prometheus_client._lora_router_state = state  # type: ignore[attr-defined]
        if (host, port) not in state["servers"]:
            try:
                state["servers"][(host, port)] = prometheus_client.start_http_server(
                    port, addr=host, registry=state["registry"]
                )
            except (OSError, ValueError) as exc:
                # ValueError: a host name that the IDNA codec refuses.
                log.error("metrics port %s:%d cannot be opened: %s", host, port, exc)
                return
            log.info("Prometheus metrics on %s:%d/metrics", host, port)
        self._metrics = state
        self.enabled = True

    def decision(self, route: str | None, seconds: float) -> None:
        if self.enabled:
            self._metrics["decisions"].labels(route=route or "none").inc()
            self._metrics["routing_seconds"].observe(seconds)

    def fallback(self, reason: str) -> None:
        if self.enabled:
            self._metrics["fallbacks"].labels(reason=reason).inc()

    def upstream_error(self, error: "UpstreamError") -> None:
        if self.enabled:
            kind = type(error).__name__
            if isinstance(error, UpstreamHTTPError):
                kind = f"http_{error.status}"
            self._metrics["upstream_errors"].labels(kind=kind).inc()


# --- Models offered: auto, the base model and every adapter -------------------


def model_sub_id(name: str, taken: set[str]) -> str:
    """Return an id for a vLLM model name that Pipelines can route.

    Pipelines cannot route ids that contain '/', and 'auto' is ours, so other
    characters become '-' and clashes get a numeric suffix.
    """
    base = re.sub(r"[^A-Za-z0-9_.-]+", "--", name).strip("-.") or "model"
    candidate, number = base, 2
    while candidate in taken or candidate == AUTO_ID:
        candidate, number = f"{base}-{number}", number + 1
    return candidate


def served_models(entries: list[dict[str, Any]]) -> list[ServedModel]:
    """Map vLLM's /v1/models entries to models with manifold ids, base first."""
    base = [e for e in entries if not e.get("parent")]
    adapters = [e for e in entries if e.get("parent")]
    taken: set[str] = set()
    models = []
    for entry in base + adapters:
        sub_id = model_sub_id(str(entry["id"]), taken)
        taken.add(sub_id)
        models.append(ServedModel(sub_id, str(entry["id"]), entry.get("parent")))
    return models


class ModelCatalog:
    """The models vLLM serves, read at start, after valves change and when stale."""

    def __init__(self) -> None:
        self.models: list[ServedModel] = []
        self.fetched_at = 0.0
        self.error: str | None = "not read yet"
        self._lock = threading.Lock()
        self._refreshing = False

    def refresh(self, client: VllmClient) -> None:
        try:
            models = served_models(client.list_models())
        except UpstreamError as exc:
            if self.error is None:
                log.warning("model list not refreshed: %s", exc)
            self.error = str(exc)
        else:
            if [m.name for m in models] != [m.name for m in self.models]:
                log.info(
                    "vLLM at %s serves %s",
                    client.base_url,
                    ", ".join(m.name for m in models),
                )
            self.models, self.error = models, None
        self.fetched_at = time.monotonic()

    def is_stale(self, ttl: float) -> bool:
        # After a failure, retry sooner: vLLM may still be loading.
        age = time.monotonic() - self.fetched_at
        return age >= (min(ttl, 5.0) if self.error else ttl)

    def refresh_in_background(self, client: VllmClient) -> None:
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True

        def run() -> None:
            try:
                self.refresh(client)
            finally:
                self._refreshing = False

        threading.Thread(target=run, name="vllm-model-list", daemon=True).start()

    def serves(self, name: str, client: VllmClient | None) -> bool:
        """Tell whether vLLM serves `name`, reading the list again if it is not fresh.

        An unknown list (vLLM unreachable) counts as serving: the request itself
        then reports what is wrong.
        """
        if name in self.names() or not self.models:
            return True
        if client is not None and time.monotonic() - self.fetched_at > 2.0:
            self.refresh(client)
        return name in self.names() or not self.models

    def by_id(self, sub_id: str) -> ServedModel | None:
        return next((m for m in self.models if m.id == sub_id), None)

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def base_name(self) -> str | None:
        return next((m.name for m in self.models if not m.parent), None)


# --- Streaming: pass vLLM's SSE lines through ---------------------------------


def completion_chunk(model: str, content: str | None, finish: str | None) -> str:
    """Return one SSE line in vLLM's chat.completion.chunk format."""
    delta: dict[str, Any] = (
        {} if content is None else {"role": "assistant", "content": content}
    )
    chunk = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        ],
    }
    return "data: " + json.dumps(chunk, ensure_ascii=False)


def status_event(description: str, done: bool = True) -> dict[str, Any]:
    """Return an Open WebUI status event, shown above the answer."""
    return {
        "event": {"type": "status", "data": {"description": description, "done": done}}
    }


def message_stream(model: str, text: str, events: list[dict[str, Any]]) -> "SSEStream":
    """Return a whole stream that carries one message: for errors and notes."""
    lines: list[Any] = [
        *events,
        completion_chunk(model, text, None),
        completion_chunk(model, None, "stop"),
        "data: [DONE]",
    ]
    return SSEStream(iter(lines))


class SSEStream(Iterator[Any]):
    """The stream handed to the Pipelines server: an iterator, not a generator.

    The server appends its own finish chunk and [DONE] to a generator's output;
    vLLM's stream already ends with both, so the client would see two of each.

    When the client goes away, the server stops pulling but never closes the
    stream, so the request to vLLM would run on. `upstream` is closed instead
    by the abandoned-stream watchdog once nobody pulls for ABANDONED_AFTER s.
    """

    def __init__(
        self, lines: Iterator[Any], upstream: requests.Response | None = None
    ) -> None:
        self._lines = lines
        self.upstream = upstream
        self.waiting_since: float | None = None
        self.abandoned = False
        if upstream is not None:
            watchdog.watch(self)

    def __next__(self) -> Any:
        watchdog.pulled(self.waiting_since)
        self.waiting_since = None
        try:
            line = next(self._lines)
        except BaseException:
            watchdog.forget(self)
            raise
        self.waiting_since = time.monotonic()
        return line

    def close(self) -> None:
        watchdog.forget(self)
        close = getattr(self._lines, "close", None)
        if close:
            close()

    def abandon(self) -> None:
        """Close the request to vLLM, from the watchdog's thread."""
        self.abandoned = True
        if self.upstream is not None:
            self.upstream.close()


# How long a stream may wait for the server to pull its next line. The server
# pulls again as soon as it has sent a line, so only a client that went away (or
# a server starved of threads for this long) leaves a stream waiting.
ABANDONED_AFTER = 0.75
# An overloaded server pulls every stream late, but in the order the streams
# became ready. Streams that became ready within this many seconds of each
# other may be pulled in either order.
PULL_ORDER_SLACK = 0.25
# Under load the limit grows to this many times the longest recent wait of a
# stream that the server did pull. That wait halves every PULL_DELAY_HALF_LIFE s.
PULL_DELAY_FACTOR = 2.0
PULL_DELAY_HALF_LIFE = 2.0
# A watchdog tick this many seconds late means the process got no CPU.
LATE_WAKE_UP = 0.2

# The Pipelines server calls pipe() and each next() of a stream in anyio worker
# threads, at most 40 at once by default. A stream holds a thread while it waits
# for vLLM's next token, so with more streams than threads the rest wait for a
# thread, and none is pulled while vLLM is slow. Threads are made only when needed.
SERVER_THREADS = 256


def raise_server_thread_limit() -> None:
    """Raise the event loop's worker thread limit to SERVER_THREADS.

    Must run in the server's event loop, as on_startup does. Elsewhere it does
    nothing, and a higher limit that is already set is kept.
    """
    try:
        import anyio.to_thread

        limiter = anyio.to_thread.current_default_thread_limiter()
    except (ImportError, RuntimeError):  # no anyio, or not in its event loop
        return
    if limiter.total_tokens < SERVER_THREADS:
        log.info(
            "raising the server's worker thread limit from %d to %d",
            limiter.total_tokens,
            SERVER_THREADS,
        )
        limiter.total_tokens = SERVER_THREADS


class AbandonedStreamWatchdog:
    """A thread that closes upstream requests of streams nobody pulls any more."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._streams: set[SSEStream] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # When the server last pulled from any stream, and the latest moment
        # at which a stream it pulled from had become ready.
        self.last_pull = 0.0
        self.newest_ready_pulled = 0.0
        self.pull_delay = 0.0
        # When this thread last woke up late: the whole process had no CPU, so
        # no stream could be pulled, and waits count only from then.
        self.resumed_at = 0.0

    def pulled(self, ready_since: float | None) -> None:
        """Note that the server pulled from a stream ready since `ready_since`."""
        now = time.monotonic()
        if ready_since is not None:
            decay = 0.5 ** ((now - self.last_pull) / PULL_DELAY_HALF_LIFE)
            self.pull_delay = max(now - ready_since, self.pull_delay * decay)
            if ready_since > self.newest_ready_pulled:
                self.newest_ready_pulled = ready_since
        self.last_pull = now

    def is_abandoned(self, stream: SSEStream, now: float) -> bool:
        """Tell whether nobody will pull from `stream` again.

        Waiting long is not enough, because an overloaded server pulls every
        stream late: with a fixed 0.75 s limit, bench/load.py lost 9% of chats
        at 64 clients and 37% at 128 on 2 busy cores. So the limit grows with
        the longest recent wait of a stream that was pulled, and a wait counts
        only from the last time the process got CPU again. Then the server must
        also have pulled a stream that became ready later, or nothing at all.
        """
        if stream.waiting_since is None:
            return False
        since = max(stream.waiting_since, self.resumed_at)
        limit = max(ABANDONED_AFTER, PULL_DELAY_FACTOR * self.pull_delay)
        if now - since <= limit:
            return False
        skipped = self.newest_ready_pulled > stream.waiting_since + PULL_ORDER_SLACK
        stalled = now - max(self.last_pull, self.resumed_at) > limit
        return skipped or stalled

    def watch(self, stream: SSEStream) -> None:
        with self._lock:
            self._streams.add(stream)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="abandoned-stream-watchdog", daemon=True
                )
                self._thread.start()

    def forget(self, stream: SSEStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def _run(self) -> None:
        while True:
            before = time.monotonic()
            time.sleep(self.interval)
            now = time.monotonic()
            if now - before > self.interval + LATE_WAKE_UP:
                self.resumed_at = now
            with self._lock:
                idle = [s for s in self._streams if self.is_abandoned(s, now)]
                self._streams.difference_update(idle)
            for stream in idle:
                log.info("stream abandoned by its client; closing the request to vLLM")
                stream.abandon()


watchdog = AbandonedStreamWatchdog()


def is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:  # UnicodeDecodeError included
        return False
    return True


def relay_vllm_stream(
    response: requests.Response,
    model: str,
    events: list[dict[str, Any]],
    request_id: str,
) -> Iterator[Any]:
    """Yield Open WebUI events, then vLLM's SSE lines as they arrive.

    Lines are split on raw bytes and decoded whole, so a character whose bytes
    vLLM's stream splits across network reads arrives intact. A stream that ends
    without [DONE] gets a note saying it was cut, then a finish and [DONE].

    The data lines of one network read are yielded as one item, joined by blank
    lines. The Pipelines server sends each item followed by a blank line, so the
    client gets the same bytes, and the server pulls once per read instead of
    once per line: each pull is a hop to a worker thread.
    """
    yield from events
    done = False
    buffer = b""
    try:
        for chunk in response.iter_content(chunk_size=None):
            buffer += chunk
            lines: list[bytes] = []
            while not done and (end := buffer.find(b"\n")) >= 0:
                line, buffer = buffer[:end].rstrip(b"\r"), buffer[end + 1 :]
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments and other SSE fields
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    # The client is finished here. The loop goes on only to read
                    # the end of the body, so the connection returns to the pool.
                elif not is_json(payload):
                    # Clients parse every data line; one bad line can end the chat.
                    log.warning(
                        "request %s: dropped a line from vLLM that is not JSON "
                        "(%d bytes)",
                        request_id,
                        len(line),
                    )
                    continue
                lines.append(line)
            if lines:
                yield b"\n\n".join(lines).decode("utf-8", errors="replace")
    except (requests.RequestException, OSError, ValueError, AttributeError) as exc:
        # A response that the watchdog closed fails with one of the last three.
        log.warning(
            "request %s: stream from vLLM broke: %s", request_id, type(exc).__name__
        )
    finally:
        response.close()

    if not done:
        yield completion_chunk(
            model, "\n\n[The answer from vLLM was cut off before it finished.]", None
        )
        yield completion_chunk(model, None, "stop")
        yield "data: [DONE]"


# --- Request handling ---------------------------------------------------------


@dataclass
class Plan:
    """Which vLLM model gets a request, and what the user is told about it."""

    model: str
    events: list[dict[str, Any]]
    fallback: str | None = None  # the default model, if `model` turns out missing
    note: str | None = None
    route: RouteSpec | None = None


def upstream_payload(body: dict[str, Any], model: str) -> dict[str, Any]:
    """Return the body for vLLM: the client's, for `model`, less Open WebUI's fields."""
    payload = {k: v for k, v in body.items() if k not in OPEN_WEBUI_FIELDS}
    payload["model"] = model
    return payload


def describe_decision(decision: RouteDecision, model: str) -> str:
    """Return the status line for a routing decision, e.g. "doctor, score 0.71"."""
    if decision.route is not None:
        route = (
            "" if decision.route.name == model else f" (route {decision.route.name})"
        )
        how = ", from the conversation" if decision.basis == "conversation" else ""
        return f"{model}{route}, score {decision.score:.2f}{how}"
    if decision.best is None:
        return f"{model}, no text to route"
    return (
        f"{model}, no route matched (best {decision.best} {decision.score:.2f} "
        f"< {decision.threshold:.2f})"
    )


class Pipeline:
    """The manifold: auto, vLLM's base model and each of its LoRA adapters."""

    Valves = Valves

    def __init__(self) -> None:
        self.type = "manifold"
        self.id = "semantic_lora_router"
        self.name = ""
        self.valves = valves_from_env()
        self.catalog = ModelCatalog()
        self.client: VllmClient | None = None
        self.routing: SemanticRouting | None = None
        self.routing_error: str | None = "the router is not built yet"
        self.adapters = AdapterLoader()
        self.metrics = Metrics()
        self._applied: Valves | None = None
        self._apply_lock = threading.Lock()

    # Hooks called by the Pipelines server.

    async def on_startup(self) -> None:
        import asyncio

        raise_server_thread_limit()
        STARTED.set()
        try:
            await asyncio.to_thread(self.apply_valves)
        except Exception as exc:  # noqa: BLE001 - a plugin must never stop the server
            # Only the type: the message of an unexpected error may hold a valve.
            log.error(
                "the valves could not be applied at start (%s); chats will retry",
                type(exc).__name__,
            )

    async def on_shutdown(self) -> None:
        if self.client is not None:
            self.client.close()

    async def on_valves_updated(self) -> None:
        import asyncio

        await asyncio.to_thread(self.apply_valves)

    def pipelines(self) -> list[dict[str, str]]:
        """List the models offered; called by the server on every request."""
        if self.client is not None and self.catalog.is_stale(
            self.valves.MODEL_LIST_TTL
        ):
            self.catalog.refresh_in_background(self.client)
        offered = [{"id": AUTO_ID, "name": AUTO_ID}]
        offered += [{"id": m.id, "name": m.name} for m in self.catalog.models]
        return offered

    def apply_valves(self, wait: bool = True) -> None:
        """Make the current valves take effect: client, model list and router.

        The Pipelines server does not call on_valves_updated for valves it loads
        from disk at start, and pipe() may run before a hook does, so every entry
        point calls this; it does the work once per valves object. The new router
        is swapped in whole, so a request never meets a half-built one. When it
        cannot be built, auto answers with the reason until the valves are fixed.

        With `wait` False, a call that finds another thread applying valves
        returns at once, so requests go on with the router and client they
        have instead of waiting for a rebuild (which can take minutes).
        """
        valves = self.valves
        if valves is self._applied:
            return
        if not self._apply_lock.acquire(blocking=wait or self._applied is None):
            return
        try:
            if valves is self._applied:
                return
            previous = self._applied
            if previous is None or _client_settings(previous) != _client_settings(
                valves
            ):
                old_client = self.client
                self.client = VllmClient(
                    valves.VLLM_BASE_URL,
                    valves.VLLM_API_KEY,
                    valves.VLLM_CONNECT_TIMEOUT,
                    valves.VLLM_READ_TIMEOUT,
                )
                if old_client is not None:
                    old_client.close()
            self.catalog.refresh(self.client)  # type: ignore[arg-type]
            self.metrics.serve(valves.METRICS_HOST, valves.METRICS_PORT)

            started = time.perf_counter()
            try:
                self.routing = SemanticRouting.build(valves, self.routing)
                self.routing_error = None
                log.info(
                    "router ready: %d routes, encoder %s, %.0f ms",
                    len(self.routing.routes),
                    valves.ENCODER_MODEL,
                    (time.perf_counter() - started) * 1000,
                )
            except (RouterUnavailable, InvalidRoutes) as exc:
                self.routing, self.routing_error = None, str(exc)
                log.error("router not available: %s", exc)
            self._applied = valves
        finally:
            self._apply_lock.release()

    # Chat requests.

    def pipe(
        self,
        user_message: str | None,
        model_id: str,
        messages: list[dict[str, Any]],
        body: dict[str, Any],
    ) -> Any:
        """Answer one chat request.

        Streaming returns an SSEStream that ends with exactly one [DONE], and every
        failure becomes a message in that stream. Non-streaming returns vLLM's JSON
        or raises fastapi's HTTPException with the message, which the server turns
        into an HTTP error response.
        """
        request_id = uuid.uuid4().hex[:8]
        stream = body.get("stream", True) is not False
        try:
            self.apply_valves(wait=False)
            plan = self.plan(request_id, model_id, body)
        except UpstreamError as exc:
            self.metrics.upstream_error(exc)
            return self._failure(
                request_id, model_id, str(exc), exc.status_code, stream
            )
        except RouterUnavailable as exc:
            return self._failure(request_id, model_id, str(exc), 503, stream)
        except Exception:
            log.exception("request %s: unexpected error", request_id)
            return self._failure(
                request_id,
                model_id,
                f"The router failed unexpectedly (request {request_id}); "
                "the Pipelines server log has the details.",
                500,
                stream,
            )
        if stream:
            return self._stream(request_id, body, plan)
        return self._complete(request_id, body, plan)

    def plan(self, request_id: str, model_id: str, body: dict[str, Any]) -> Plan:
        if model_id != AUTO_ID:
            return Plan(self.resolve_model(model_id), events=[])

        default = self.default_model()
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and metadata.get("task"):
            # Titles, tags and follow-ups that Open WebUI asks for in the background.
            self.check_default_served(default)
            return Plan(default, events=[])

        if self.routing is None:
            raise RouterUnavailable(f"auto cannot route: {self.routing_error}")
        decision = self.routing.decide(body.get("messages"))
        model = decision.route.target if decision.route else default
        if model == default:
            self.check_default_served(default)
        log.info(
            "request %s: target=%s route=%s best=%s:%.3f threshold=%.2f "
            "runner_up=%s:%.3f basis=%s ms=%.1f",
            request_id,
            model,
            decision.route.name if decision.route else None,
            decision.best,
            decision.score,
            decision.threshold,
            decision.runner_up,
            decision.runner_up_score,
            decision.basis,
            decision.elapsed_ms,
        )
        self.metrics.decision(
            decision.route.name if decision.route else None,
            decision.elapsed_ms / 1000,
        )
        events = []
        if self.valves.SHOW_ROUTING_STATUS:
            events.append(status_event(describe_decision(decision, model)))

        plan = Plan(model, events, route=decision.route)
        if model != default:
            plan.fallback = default
            if not self.catalog.serves(model, self.client):
                reason = self.load_adapter(plan)
                if reason is not None:
                    self.fall_back(request_id, plan, reason)
        return plan

    def load_adapter(self, plan: Plan) -> str | None:
        """Load the routed adapter from its route's path; return why it is missing."""
        route = plan.route
        if route is None or route.path is None:
            return "Register it with --lora-modules or fix the route's target."
        assert self.client is not None
        return self.adapters.ensure(self.client, self.catalog, route.target, route.path)

    def fall_back(self, request_id: str, plan: Plan, reason: str) -> None:
        """Send `plan` to the default model and tell the user why."""
        assert plan.fallback is not None
        plan.note = (
            f"{plan.model} is not served by vLLM at {self.valves.VLLM_BASE_URL}, so "
            f"{plan.fallback} answered. {reason}"
        )
        if not plan.note.endswith("."):
            plan.note += "."
        log.warning("request %s: %s", request_id, plan.note)
        self.metrics.fallback("adapter_missing")
        plan.events = [status_event(plan.note)]
        plan.model, plan.fallback = plan.fallback, None

    def check_default_served(self, default: str) -> None:
        """Raise UnknownModel when vLLM does not serve DEFAULT_MODEL."""
        if default == self.valves.DEFAULT_MODEL and not self.catalog.serves(
            default, self.client
        ):
            raise UnknownModel(
                f"DEFAULT_MODEL {default} is not served by vLLM at "
                f"{self.valves.VLLM_BASE_URL} (it serves "
                f"{', '.join(self.catalog.names())}); fix the DEFAULT_MODEL valve",
                404,
            )

    def default_model(self) -> str:
        if self.valves.DEFAULT_MODEL:
            return self.valves.DEFAULT_MODEL
        base = self.catalog.base_name()
        if base is None:
            self.catalog.refresh(self.client)  # type: ignore[arg-type]
            base = self.catalog.base_name()
        if base is None:
            raise UpstreamUnavailable(
                f"the base model is unknown because {self.catalog.error}"
            )
        return base

    def resolve_model(self, model_id: str) -> str:
        served = self.catalog.by_id(model_id)
        if served is None:
            self.catalog.refresh(self.client)  # type: ignore[arg-type]
            served = self.catalog.by_id(model_id)
        if served is None:
            raise UnknownModel(
                f"model {model_id} is not served by vLLM at {self.valves.VLLM_BASE_URL}"
                f" (it serves {', '.join(self.catalog.names()) or 'no models now'})",
                404,
            )
        return served.name

    def _open(
        self, request_id: str, body: dict[str, Any], plan: Plan, stream: bool
    ) -> requests.Response:
        """Send the request to vLLM.

        On a 404 for a routed adapter (vLLM restarted without it, say), load it
        from its route's path and retry, or else use the default model.
        """
        assert self.client is not None
        try:
            return self.client.chat(upstream_payload(body, plan.model), stream)
        except UnknownModel:
            if plan.fallback is None:
                raise
        self.catalog.refresh(self.client)
        reason = self.load_adapter(plan)
        if reason is None:
            return self.client.chat(upstream_payload(body, plan.model), stream)
        self.fall_back(request_id, plan, reason)
        return self.client.chat(upstream_payload(body, plan.model), stream)

    def _stream(self, request_id: str, body: dict[str, Any], plan: Plan) -> "SSEStream":
        try:
            response = self._open(request_id, body, plan, stream=True)
        except UpstreamError as exc:
            log.warning("request %s: %s", request_id, exc)
            self.metrics.upstream_error(exc)
            return message_stream(plan.model, str(exc), plan.events)
        lines = relay_vllm_stream(response, plan.model, plan.events, request_id)
        return SSEStream(lines, upstream=response)

    def _complete(self, request_id: str, body: dict[str, Any], plan: Plan) -> Any:
        try:
            response = self._open(request_id, body, plan, stream=False)
            result = response.json()
        except UpstreamError as exc:
            self.metrics.upstream_error(exc)
            return self._failure(
                request_id, plan.model, str(exc), exc.status_code, stream=False
            )
        except ValueError:
            return self._failure(
                request_id,
                plan.model,
                "vLLM returned a response that is not JSON",
                502,
                stream=False,
            )
        if plan.note and isinstance(result, dict):
            for choice in result.get("choices") or []:
                message = choice.get("message") if isinstance(choice, dict) else None
                if isinstance(message, dict) and isinstance(
                    message.get("content"), str
                ):
                    message["content"] = f"({plan.note})\n\n{message['content']}"
        return result

    def _failure(
        self, request_id: str, model: str, text: str, status: int, stream: bool
    ) -> Any:
        log.warning("request %s: %s", request_id, text)
        if stream:
            return message_stream(model, text, [])
        try:
            from fastapi import HTTPException
        except ImportError:
            return {"error": {"message": text, "code": status}}
        raise HTTPException(status_code=status, detail=text)


def _client_settings(valves: Valves) -> tuple[Any, ...]:
    return (
        valves.VLLM_BASE_URL,
        valves.VLLM_API_KEY,
        valves.VLLM_CONNECT_TIMEOUT,
        valves.VLLM_READ_TIMEOUT,
    )


# --- Open WebUI Function: the same router without a Pipelines server ----------


class Pipe:
    """The same manifold as an Open WebUI Function (Admin > Functions).

    Open WebUI loads this class when the file is installed as a Function. It
    shares Pipeline's core; only the calling convention differs: the routing
    status goes through `__event_emitter__`, and the stream is handed back as
    a StreamingResponse, which Open WebUI passes through without adding a
    second finish or [DONE].
    """

    Valves = Valves

    def __init__(self) -> None:
        self.core = Pipeline()
        self.valves = self.core.valves

    def _sync_valves(self) -> None:
        # Open WebUI assigns saved valves to `self.valves` directly.
        self.core.valves = self.valves
        self.core.apply_valves()

    async def pipes(self) -> list[dict[str, str]]:
        import asyncio

        await asyncio.to_thread(self._sync_valves)
        return self.core.pipelines()

    async def pipe(
        self,
        body: dict[str, Any],
        __event_emitter__: Any = None,
        __task__: str | None = None,
    ) -> Any:
        import asyncio

        model = str(body.get("model", ""))
        model_id = model.split(".", 1)[1] if "." in model else model
        if __task__:
            # Open WebUI removes `metadata` from a Function's body and passes
            # the background task on its own.
            body = {**body, "metadata": {"task": __task__}}

        await asyncio.to_thread(self._sync_valves)
        result = await asyncio.to_thread(
            self.core.pipe, None, model_id, body.get("messages") or [], body
        )
        if not isinstance(result, SSEStream):
            return result

        lines: list[str] = []
        while True:
            item = await asyncio.to_thread(next, result, None)
            if not isinstance(item, dict):
                break
            if __event_emitter__ is not None:
                await __event_emitter__(item["event"])
        if item is not None:
            lines.append(item)

        from starlette.responses import StreamingResponse

        def sse() -> Iterator[str]:
            for line in itertools.chain(lines, result):
                if isinstance(line, str):
                    yield f"{line}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")
