"""Open WebUI in a real browser uses the auto model, end to end.

Real vLLM (the tiny model with the doctor and dcot adapters), the real Pipelines
server with the plugin, and Open WebUI from PyPI, connected to Pipelines as an
OpenAI API connection. Playwright drives Debian's Chromium through the pages that
a user and an admin see. tests/e2e/setup.sh installs Open WebUI and Chromium,
and tests/run passes their paths in SLR_OPENWEBUI_BIN and SLR_CHROMIUM.

The tests run in file order on one browser page, because the last two change
the valves that the others route with. Each step saves a screenshot in the
pytest temporary folder; with SLR_UPDATE_DOC_SCREENSHOTS=1 the two used by the
docs are also copied to docs/screenshots/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from livechat import (
    MATH,
    MEDICAL,
    PIPELINE_ID,
    SMALL_TALK,
    TEST_ENCODER,
    TEST_THRESHOLD,
    update_valves,
)

from servers import (
    PipelinesServer,
    ServerProcess,
    start_open_webui,
    start_pipelines,
)

pytestmark = [
    pytest.mark.e2e,
    # The first test also waits for vLLM, Pipelines and Open WebUI to start,
    # which takes 1 to 3 minutes on 2 busy cores.
    pytest.mark.timeout(480),
]

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="playwright is not installed in the test venv; run the tests with tests/run",
)
expect = sync_api.expect
# Playwright's default of 5 s is too short for Open WebUI's admin pages on 2
# busy cores: they load the model list through Pipelines before they show.
expect.set_options(timeout=30_000)

OPENWEBUI_BIN = os.environ.get("SLR_OPENWEBUI_BIN", "")
CHROMIUM = os.environ.get("SLR_CHROMIUM", "/usr/bin/chromium")
if not Path(OPENWEBUI_BIN).is_file():
    pytest.skip(
        f"SLR_OPENWEBUI_BIN={OPENWEBUI_BIN!r} is not an open-webui executable; "
        "run the tests with tests/run, which calls tests/e2e/setup.sh",
        allow_module_level=True,
    )
if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"Chromium not found at {CHROMIUM}; run tests/e2e/setup.sh, which installs "
        "Debian's chromium package",
        allow_module_level=True,
    )

REPO = Path(__file__).resolve().parents[2]
PLUGIN_PATH = REPO / "pipelines" / "semantic_lora_router.py"
DOC_SCREENSHOTS = REPO / "docs" / "screenshots"

# A whole answer of the tiny model (up to vLLM's 512-token context) with the
# browser rendering it as it streams.
ANSWER_TIMEOUT_MS = 120_000

# Debian's Chromium without the network calls, sync and first-run pages of a
# desktop browser. --no-sandbox: tests may run as root, where the sandbox fails.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 800}

# Records the length of the newest answer's text each time the page changes, and
# whether that answer was finished then (its Regenerate button is shown). The
# browser does this itself: sampling from Python misses the stream, because one
# call can wait seconds while the page renders a burst of tokens.
RECORD_ANSWER_LENGTHS = """() => {
  const samples = [];
  window.answerSamples = samples;
  new MutationObserver(() => {
    const answers = document.querySelectorAll('#response-content-container');
    if (!answers.length) return;
    const answer = answers[answers.length - 1];
    const message = answer.closest('[id^="message-"]');
    const done = !!message?.querySelector('button[aria-label="Regenerate"]');
    const length = answer.textContent.length;
    const last = samples[samples.length - 1];
    if (!last || last.length !== length || last.done !== done) {
      samples.push({length, done});
    }
  }).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""

ROUTED_LOG_LINE = re.compile(r"request \w+: target=(\S+) route=")


@dataclass
class Answer:
    """What the page showed for one answer, once it was finished."""

    model_name: str
    status: str | None
    text: str
    samples: list[dict[str, Any]]

    def partial_lengths(self) -> list[int]:
        """Return the text lengths seen before the answer was finished."""
        return [s["length"] for s in self.samples if not s["done"] and s["length"]]


# Open WebUI renders the streamed reply as markdown. A closed `*` or `_` turns
# into formatting, so the page text can lose a few characters for a moment.
MARKDOWN_MARKER_SLACK = 4


def assert_never_shrank(partial: list[int]) -> None:
    """Assert that no sample is shorter than an earlier one by more than the slack."""
    longest = 0
    for length in partial:
        assert length >= longest - MARKDOWN_MARKER_SLACK, (
            f"the answer shrank from {longest} to {length} characters while "
            f"streaming: {partial}"
        )
        longest = max(longest, length)


# --- Servers and browser ------------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(vllm_server, encoder_dir, tmp_path_factory) -> Iterator[PipelinesServer]:
    """The Pipelines server with the plugin, routing with the test encoder."""
    pipelines_dir = tmp_path_factory.mktemp("pipelines")
    shutil.copy(PLUGIN_PATH, pipelines_dir / PLUGIN_PATH.name)
    server = start_pipelines(
        pipelines_dir,
        {
            "VLLM_BASE_URL": vllm_server.api_base,
            "ENCODER_MODEL": TEST_ENCODER,
            "ENCODER_LOCAL_DIR": str(encoder_dir),
            "ROUTER_SCORE_THRESHOLD": TEST_THRESHOLD,
            "SHOW_ROUTING_STATUS": "true",
        },
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def open_webui(pipelines, tmp_path_factory) -> Iterator[ServerProcess]:
    """Open WebUI with Pipelines as its only OpenAI API connection.

    Open WebUI takes a Pipelines server as the connection's base URL without
    /v1, and recognises it by the `pipelines` field of its model list; that
    makes the Admin > Settings > Pipelines page manage its valves.
    """
    data_dir = tmp_path_factory.mktemp("open-webui")
    connection = {
        "ENABLE_OPENAI_API": "true",
        "OPENAI_API_BASE_URLS": pipelines.base_url,
        "OPENAI_API_KEYS": pipelines.api_key,
    }
    with start_open_webui(OPENWEBUI_BIN, data_dir, connection) as server:
        yield server


@pytest.fixture(scope="module")
def page(open_webui) -> Iterator[Any]:
    """A Chromium page on Open WebUI, past the What's New dialog of a new user."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(30_000)
        page.goto(open_webui.base_url + "/")
        dismiss_whats_new(page)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


# --- Steps a user takes -------------------------------------------------------


def dismiss_whats_new(page) -> None:
    """Close the release notes that Open WebUI shows once to each new user."""
    button = page.get_by_role("button", name="Okay, Let's Go!")
    button.wait_for(timeout=60_000)
    button.click()
    expect(button).to_be_hidden()


def start_chat(page, base_url: str, model_name: str) -> None:
    """Open a new chat and pick `model_name` in the model menu."""
    page.goto(base_url + "/")
    page.locator("#model-selector-model-button").click()
    page.locator(f'[role="option"][data-value="{PIPELINE_ID}.{model_name}"]').click()
    expect(page.locator("#model-selector-model-button")).to_have_text(model_name)


def send(page, text: str) -> None:
    page.evaluate(RECORD_ANSWER_LENGTHS)
    page.locator("#chat-input").fill(text)
    page.locator("#send-message-button").click()


def wait_for_answer(page) -> Answer:
    """Wait until the newest answer is finished and return what it showed."""
    message = (
        page.locator('[id^="message-"]')
        .filter(has=page.locator("#response-content-container"))
        .last
    )
    regenerate = message.get_by_role("button", name="Regenerate")
    expect(regenerate).to_be_visible(timeout=ANSWER_TIMEOUT_MS)

    status = message.get_by_role("button", name="Toggle status history")
    return Answer(
        model_name=message.locator("#response-message-model-name").inner_text(),
        status=status.inner_text().strip() if status.count() else None,
        text=message.locator("#response-content-container").inner_text().strip(),
        samples=page.evaluate("window.answerSamples"),
    )


def ask(page, base_url: str, model_name: str, text: str) -> Answer:
    start_chat(page, base_url, model_name)
    send(page, text)
    return wait_for_answer(page)


def open_pipeline_valves(page, base_url: str) -> None:
    page.goto(base_url + "/admin/settings/pipelines")
    expect(page.get_by_placeholder("Routes", exact=True)).to_be_visible()


def save_valves(page, toast_type: str) -> Any:
    """Press Save on the valves form and wait for its toast of `toast_type`.

    After a successful save Open WebUI also closes the settings and shows a
    second toast, so the form is gone when this returns.
    """
    page.get_by_role("button", name="Save", exact=True).click()
    toast = page.locator(
        f'[data-sonner-toast][data-mounted="true"][data-type="{toast_type}"]'
    ).filter(has_not_text="You're now logged in")
    expect(toast.first).to_be_visible()
    # Let the toast finish sliding in, so that screenshots show it sharp.
    page.wait_for_timeout(500)
    return toast


def scroll_to_question(page) -> None:
    """Scroll the chat back to the question, so the status shows in screenshots."""
    page.locator('[id^="message-"]').first.evaluate(
        "element => element.scrollIntoView({block: 'start'})"
    )


def shoot(page, screenshots: Path, name: str, doc_name: str | None = None) -> None:
    """Save a screenshot, and with SLR_UPDATE_DOC_SCREENSHOTS=1 a small copy of
    it as docs/screenshots/`doc_name`."""
    path = screenshots / f"{name}.png"
    page.screenshot(path=str(path))
    if doc_name and os.environ.get("SLR_UPDATE_DOC_SCREENSHOTS") == "1":
        DOC_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        save_small_png(path, DOC_SCREENSHOTS / doc_name)


def save_small_png(source: Path, target: Path) -> None:
    """Save a copy with a 32-colour palette, about a quarter of the size."""
    from PIL import Image  # installed with fastembed, in the test venv

    with Image.open(source) as image:
        image.convert("RGB").quantize(colors=32).save(target, optimize=True)


# --- Server-side evidence -------------------------------------------------------


def routed_targets(pipelines: PipelinesServer) -> list[str]:
    """Return the target of every auto request in the plugin's log, oldest first."""
    text = pipelines.log_path.read_text(encoding="utf-8", errors="replace")
    return ROUTED_LOG_LINE.findall(text)


def saved_valves(pipelines: PipelinesServer) -> dict[str, Any]:
    response = requests.get(f"{pipelines.base_url}/{PIPELINE_ID}/valves", timeout=10)
    response.raise_for_status()
    return response.json()


def assert_routed(pipelines, before: int, target: str) -> None:
    targets = routed_targets(pipelines)[before:]
    assert targets == [target], (
        f"the plugin logged targets {targets} for this chat, expected [{target!r}]"
    )


def assert_real_answer(answer: Answer) -> None:
    assert answer.text, "the answer is empty"
    assert "vLLM returned" not in answer.text, answer.text[:300]
    assert "could not be reached" not in answer.text, answer.text[:300]


# --- Tests ----------------------------------------------------------------------


def test_model_menu_offers_auto_and_adapters(
    page, open_webui, vllm_server, screenshots
):
    page.goto(open_webui.base_url + "/")
    page.locator("#model-selector-model-button").click()
    options = page.get_by_role("option")
    expect(options.first).to_be_visible()
    offered = {
        options.nth(i).get_attribute("data-value") for i in range(options.count())
    }
    shoot(page, screenshots, "01-model-menu")
    page.keyboard.press("Escape")

    base = vllm_server.served_model_name
    assert offered == {
        f"{PIPELINE_ID}.auto",
        f"{PIPELINE_ID}.doctor",
        f"{PIPELINE_ID}.dcot",
        f"{PIPELINE_ID}.{base}",
    }


def test_auto_streams_medical_answer_from_doctor(
    page, open_webui, pipelines, screenshots
):
    before = len(routed_targets(pipelines))
    start_chat(page, open_webui.base_url, "auto")
    send(page, MEDICAL)

    status = page.get_by_role("button", name="Toggle status history").last
    expect(status).to_contain_text("doctor, score", timeout=ANSWER_TIMEOUT_MS)
    page.wait_for_function(
        "() => window.answerSamples.some(s => s.length > 0)",
        timeout=ANSWER_TIMEOUT_MS,
    )
    shoot(page, screenshots, "02-auto-doctor-streaming")
    answer = wait_for_answer(page)
    scroll_to_question(page)
    shoot(page, screenshots, "03-auto-doctor-answer", "open-webui-auto-doctor.png")

    assert answer.model_name == "auto"
    assert answer.status is not None
    assert re.fullmatch(r"doctor, score [01]\.\d\d", answer.status), answer.status
    assert_real_answer(answer)
    assert_routed(pipelines, before, "doctor")
    partial = answer.partial_lengths()
    assert len(set(partial)) >= 3, (
        f"the answer did not grow while it streamed: lengths before it was "
        f"finished {partial}, final length {len(answer.text)}"
    )
    assert_never_shrank(partial)


def test_auto_sends_reasoning_question_to_dcot(
    page, open_webui, pipelines, screenshots
):
    before = len(routed_targets(pipelines))
    answer = ask(page, open_webui.base_url, "auto", MATH)
    scroll_to_question(page)
    shoot(page, screenshots, "04-auto-dcot")

    assert answer.status is not None
    assert answer.status.startswith("dcot, score"), answer.status
    assert_real_answer(answer)
    assert_routed(pipelines, before, "dcot")


def test_auto_sends_small_talk_to_base_model(
    page, open_webui, pipelines, vllm_server, screenshots
):
    base = vllm_server.served_model_name
    before = len(routed_targets(pipelines))
    answer = ask(page, open_webui.base_url, "auto", SMALL_TALK)
    scroll_to_question(page)
    shoot(page, screenshots, "05-auto-base")

    assert answer.status is not None
    assert answer.status.startswith(f"{base}, no route matched"), answer.status
    assert_real_answer(answer)
    assert_routed(pipelines, before, base)


def test_doctor_picked_in_menu_answers(page, open_webui, pipelines, screenshots):
    before = len(routed_targets(pipelines))
    answer = ask(page, open_webui.base_url, "doctor", MEDICAL)
    scroll_to_question(page)
    shoot(page, screenshots, "06-doctor-direct")

    assert answer.model_name == "doctor"
    assert answer.status is None, "only auto shows a routing status"
    assert_real_answer(answer)
    assert routed_targets(pipelines)[before:] == [], "doctor itself does not route"


def test_broken_routes_rejected_in_ui_keep_old_routes(
    page, open_webui, pipelines, screenshots
):
    routes_before = saved_valves(pipelines)["ROUTES"]
    open_pipeline_valves(page, open_webui.base_url)
    # The valves form shows every text valve on one line, so routes typed there
    # are JSON (which is also YAML). This route has no utterances.
    page.get_by_placeholder("Routes", exact=True).fill(
        '[{"name": "doctor", "target": "doctor"}]'
    )
    save_valves(page, "error")
    shoot(page, screenshots, "07-broken-routes-rejected")

    # Open WebUI 0.12.4 shows "Pipeline not found" for any error that Pipelines
    # returns for a valves update. The plugin's reason is only in the Pipelines log.
    assert saved_valves(pipelines)["ROUTES"] == routes_before
    assert "'utterances' must be a non-empty list of text" in pipelines.log_tail(200)

    before = len(routed_targets(pipelines))
    answer = ask(page, open_webui.base_url, "auto", MEDICAL)
    assert answer.status is not None
    assert answer.status.startswith("doctor, score"), answer.status
    assert_routed(pipelines, before, "doctor")


def test_default_routes_edited_in_ui_change_routing(
    page, open_webui, pipelines, vllm_server, screenshots
):
    saved = saved_valves(pipelines)
    open_pipeline_valves(page, open_webui.base_url)
    field = page.get_by_placeholder("Routes", exact=True)
    # The default routes are shown as one line of JSON, so they can be edited
    # in place: here doctor gets a threshold that no question reaches.
    routes = json.loads(field.input_value())
    doctor = next(route for route in routes["routes"] if route["name"] == "doctor")
    doctor["threshold"] = 0.99
    field.fill(json.dumps(routes))
    save_valves(page, "success")

    try:
        before = len(routed_targets(pipelines))
        answer = ask(page, open_webui.base_url, "auto", MEDICAL)
        scroll_to_question(page)
        shoot(page, screenshots, "08-routes-edited-in-place")
        assert answer.status is not None
        base = vllm_server.served_model_name
        assert answer.status.startswith(f"{base}, no route matched"), answer.status
        assert answer.status.endswith("< 0.99)"), answer.status
        assert_routed(pipelines, before, base)
    finally:
        update_valves(pipelines, saved).raise_for_status()
    assert saved_valves(pipelines)["ROUTES"] == saved["ROUTES"]


def test_threshold_raised_in_ui_sends_auto_to_base(
    page, open_webui, pipelines, vllm_server, screenshots
):
    base = vllm_server.served_model_name
    open_pipeline_valves(page, open_webui.base_url)
    threshold = page.get_by_placeholder("Router Score Threshold", exact=True)
    threshold.fill("1.0")
    toasts = save_valves(page, "success")
    expect(toasts.filter(has_text="Valves updated successfully")).to_have_count(1)

    # Opened again, the form shows the value read back from Pipelines.
    open_pipeline_valves(page, open_webui.base_url)
    expect(threshold).to_have_value(re.compile(r"^1(\.0)?$"))
    threshold.scroll_into_view_if_needed()
    shoot(page, screenshots, "09-threshold-saved", "open-webui-pipelines-valves.png")
    assert saved_valves(pipelines)["ROUTER_SCORE_THRESHOLD"] == 1.0

    before = len(routed_targets(pipelines))
    answer = ask(page, open_webui.base_url, "auto", MEDICAL)
    scroll_to_question(page)
    shoot(page, screenshots, "10-auto-after-threshold")

    assert answer.status is not None
    assert answer.status.startswith(f"{base}, no route matched (best doctor"), (
        answer.status
    )
    assert answer.status.endswith("< 1.00)"), answer.status
    assert_real_answer(answer)
    assert_routed(pipelines, before, base)
