"""tools/evaluate_routes.py with the real test encoder, and the shipped routes
measured on the labelled sets in valves/.

The encoder is the int8 all-MiniLM-L6-v2 that tests/run builds (SLR_ENCODER_DIR).
"""

import importlib.util
import json
import struct
import subprocess
import sys

import pytest
from livechat import TEST_ENCODER, TEST_THRESHOLD
from plugin_loader import REPO

TOOL_PATH = REPO / "tools" / "evaluate_routes.py"
DEV_SET = REPO / "valves" / "dev-set.jsonl"
HOLDOUT = REPO / "valves" / "holdout.jsonl"
SHIPPED_ROUTES = REPO / "valves" / "routes.yaml"


def load_tool():
    spec = importlib.util.spec_from_file_location("evaluate_routes", TOOL_PATH)
    module = importlib.util.module_from_spec(spec)
    # The tool's dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tool = load_tool()

SMALL_ROUTES = """\
routes:
  - name: doctor
    utterances:
      - I have a fever and a headache, what should I do?
      - My throat is sore and I have a high temperature.
      - I twisted my ankle and it is swollen.
  - name: dcot
    utterances:
      - Solve 2x + 3 = 11 step by step.
      - Find x if 5x - 4 = 16.
      - A train travels 120 km in 2 hours. What is its average speed?
"""

# Three examples carry a wrong label on purpose, so precision, recall and the
# confusion matrix have something to count besides the diagonal.
SMALL_EXAMPLES = [
    ("I have had a fever and a bad headache since this morning", "doctor"),
    ("My throat hurts and my temperature is high", "doctor"),
    ("I sprained my ankle and now it is swollen", "doctor"),
    ("Solve 3x + 4 = 19 step by step", "dcot"),
    ("What is x if 5x - 4 = 26?", "dcot"),
    ("Hello, how are you today?", "none"),
    ("What is the capital of France?", "none"),
    ("I have a fever and feel dizzy", "dcot"),  # routed to doctor
    ("Solve x + 1 = 2 step by step", "none"),  # routed to dcot
    ("Write a short poem about the sea", "doctor"),  # routed to the default model
    ("I have a terrible headache and a fever", "none"),  # routed to doctor
]


@pytest.fixture(scope="module")
def plugin():
    return tool.load_plugin()


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    routes = folder / "routes.yaml"
    routes.write_text(SMALL_ROUTES, encoding="utf-8")
    examples = folder / "examples.jsonl"
    examples.write_text(
        "".join(
            json.dumps({"text": text, "route": route}) + "\n"
            for text, route in SMALL_EXAMPLES
        ),
        encoding="utf-8",
    )
    return routes, examples


def encoder_args(encoder_dir, threshold=TEST_THRESHOLD):
    return [
        "--encoder-model",
        TEST_ENCODER,
        "--encoder-dir",
        str(encoder_dir),
        "--threshold",
        str(threshold),
    ]


def run_tool(*args):
    return subprocess.run(
        [sys.executable, str(TOOL_PATH), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", header[16:24])


# --- Evaluation numbers -----------------------------------------------------------


def test_small_set_metrics_are_exact(plugin, small_files, encoder_dir):
    routes_path, examples_path = small_files
    routes_text, routes = tool.read_routes(plugin, routes_path)
    examples = tool.read_examples(examples_path, [r.name for r in routes])
    routing = tool.build_routing(
        plugin, routes_text, TEST_ENCODER, str(encoder_dir), 0.4, "max"
    )

    scored = tool.score_examples(routing, examples)
    expected = [example.expected for example in examples]
    metrics = tool.measure(scored.route_names, expected, scored.routed)

    assert scored.routed == [
        "doctor",
        "doctor",
        "doctor",
        "dcot",
        "dcot",
        None,
        None,
        "doctor",
        "dcot",
        None,
        "doctor",
    ]
    assert (metrics.correct, metrics.total) == (7, 11)
    assert metrics.confusion == {
        "doctor": {"doctor": 3, "dcot": 0, None: 1},
        "dcot": {"doctor": 1, "dcot": 2, None: 0},
        None: {"doctor": 1, "dcot": 1, None: 2},
    }
    assert metrics.precision("doctor") == 3 / 5
    assert metrics.recall("doctor") == 3 / 4
    assert metrics.precision("dcot") == 2 / 3
    assert metrics.recall("dcot") == 2 / 3
    assert metrics.precision(None) == 2 / 3
    assert metrics.recall(None) == 2 / 4


@pytest.fixture(scope="module")
def small_run(small_files, encoder_dir):
    """One run of the command on the small set, with its plot file."""
    routes_path, examples_path = small_files
    plot = routes_path.parent / "scores.png"
    result = run_tool(
        routes_path, examples_path, *encoder_args(encoder_dir), "--plot", plot
    )
    return result, plot


def test_command_prints_report(small_run):
    result, _ = small_run

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "accuracy 0.636 (7/11)" in lines
    assert "doctor       0.600   0.750        4" in lines
    assert "dcot         0.667   0.667        3" in lines
    assert "none         0.667   0.500        4" in lines
    assert "doctor         3       0       1" in lines
    assert "dcot           1       2       0" in lines
    assert "none           1       1       2" in lines
    assert "misrouted: 4" in lines
    misrouted = [line for line in lines if line.startswith("  expected ")]
    assert len(misrouted) == 4
    assert misrouted[0].startswith("  expected dcot, routed doctor (score/threshold: ")
    assert misrouted[0].endswith("examples.jsonl:8: I have a fever and feel dizzy")
    assert "warning" not in result.stderr


def test_csv_examples_read_like_jsonl(plugin, small_files, tmp_path):
    _, jsonl_path = small_files
    csv_path = tmp_path / "examples.csv"
    rows = ["text,route"] + [f'"{text}",{route}' for text, route in SMALL_EXAMPLES]
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")

    from_csv = tool.read_examples(csv_path, ["doctor", "dcot"])
    from_jsonl = tool.read_examples(jsonl_path, ["doctor", "dcot"])

    assert [(e.text, e.expected) for e in from_csv] == [
        (e.text, e.expected) for e in from_jsonl
    ]
    assert from_csv[0].where.endswith("examples.csv:2")


# --- Plot -------------------------------------------------------------------------


def test_plot_has_expected_size(small_run):
    result, plot = small_run

    assert result.returncode == 0, result.stderr
    assert f"score plot written to {plot}" in result.stdout
    width = tool.PLOT_WIDTH
    height = 2 * tool.PLOT_ROW_HEIGHT
    assert png_size(plot) == (width, height)


# --- Fitting ----------------------------------------------------------------------


def test_fit_improves_bad_threshold(plugin, small_files, encoder_dir, tmp_path):
    routes_path, examples_path = small_files
    tuned_path = tmp_path / "tuned.yaml"
    plot = tmp_path / "fitted.png"

    result = run_tool(
        routes_path,
        examples_path,
        *encoder_args(encoder_dir, threshold=0.95),
        "--fit",
        "--folds",
        "2",
        "--output",
        tuned_path,
        "--plot",
        plot,
    )

    assert result.returncode == 0, result.stderr
    # At 0.95 nothing passes, so only the four examples labelled none are right.
    assert "accuracy 0.364 (4/11)" in result.stdout
    summary = next(
        line
        for line in result.stdout.splitlines()
        if line.startswith("accuracy before")
    )
    before, after = (float(word.rstrip(",")) for word in summary.split()[2:5:2])
    assert before == pytest.approx(4 / 11, abs=0.001)
    assert after > before
    assert f"tuned routes written to {tuned_path}" in result.stdout
    assert png_size(plot) == (tool.PLOT_WIDTH, 2 * tool.PLOT_ROW_HEIGHT)

    tuned_text = tuned_path.read_text(encoding="utf-8")
    tuned = {route.name: route for route in plugin.parse_routes(tuned_text)}
    assert set(tuned) == {"doctor", "dcot"}
    for route in tuned.values():
        assert route.threshold is not None
        assert route.threshold < 0.95
    assert tuned_text.startswith("# Routes tuned by tools/evaluate_routes.py")

    # The tuned routes, routed by the plugin itself, reach the reported accuracy.
    examples = tool.read_examples(examples_path, list(tuned))
    routing = tool.build_routing(
        plugin, tuned_text, TEST_ENCODER, str(encoder_dir), 0.95, "max"
    )
    scored = tool.score_examples(routing, examples)
    expected = [example.expected for example in examples]
    metrics = tool.measure(scored.route_names, expected, scored.routed)
    assert metrics.accuracy == pytest.approx(after, abs=0.001)


def test_fit_threshold_picks_widest_gap():
    pairs = [(0.2, None), (0.3, None), (0.5, "doctor"), (0.6, "doctor"), (0.35, "dcot")]
    assert tool.fit_threshold(pairs, "doctor") == pytest.approx(0.42, abs=0.005)


def test_fit_threshold_keeps_fallback_without_examples():
    scores = [{"doctor": 0.9, "dcot": 0.1}]
    thresholds = tool.fit_thresholds(
        scores,
        ["doctor"],
        ["doctor", "dcot"],
        {
            "doctor": 0.7,
            "dcot": 0.7,
        },
    )
    assert thresholds["dcot"] == 0.7
    assert thresholds["doctor"] < 0.9


def test_folds_spread_each_label():
    labels = ["doctor"] * 6 + ["dcot"] * 6 + [None] * 6
    folds = tool.stratified_folds(labels, 3, seed=1)
    pairs = list(zip(folds, labels, strict=True))
    for label in ("doctor", "dcot", None):
        counts = [pairs.count((fold, label)) for fold in range(3)]
        assert counts == [2, 2, 2], (label, counts)


# --- Bad input --------------------------------------------------------------------

BAD_INPUTS = [
    pytest.param(
        "examples.csv",
        "text,label\nI have a fever,doctor\n",
        "missing column 'route' in the header line (columns found: text, label)",
        id="csv-missing-column",
    ),
    pytest.param(
        "examples.jsonl",
        '{"text": "I have a fever", "route": "doctor"}\n'
        '{"text": "Solve x + 1 = 2", "route": "math"}\n',
        "examples.jsonl:2: unknown route 'math'; use one of doctor, dcot, none",
        id="unknown-route",
    ),
    pytest.param(
        "examples.jsonl",
        '{"text": "I have a fever"}\n',
        "examples.jsonl:1: missing field 'route'",
        id="jsonl-missing-field",
    ),
    pytest.param(
        "examples.jsonl",
        '{"text": "I have a fever", "route": "doctor"\n',
        "examples.jsonl:1: invalid JSON",
        id="invalid-json",
    ),
    pytest.param(
        "examples.txt",
        "I have a fever\n",
        "unknown format .txt; use .jsonl or .csv",
        id="unknown-format",
    ),
    pytest.param("examples.jsonl", "\n", "has no examples", id="empty"),
]


def assert_clean_error(result, message):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("evaluate_routes.py: error: ")
    assert message in lines[0]


@pytest.mark.parametrize(("name", "content", "message"), BAD_INPUTS)
def test_bad_examples_file_gets_clear_error(
    small_files, tmp_path, name, content, message
):
    routes_path, _ = small_files
    examples = tmp_path / name
    examples.write_text(content, encoding="utf-8")
    assert_clean_error(run_tool(routes_path, examples), message)


def test_missing_examples_file_gets_clear_error(small_files, tmp_path):
    routes_path, _ = small_files
    missing = tmp_path / "nowhere.jsonl"
    assert_clean_error(
        run_tool(routes_path, missing), f"examples file {missing} not found"
    )


def test_unreadable_examples_file_gets_clear_error(small_files, tmp_path):
    routes_path, _ = small_files
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    assert_clean_error(
        run_tool(routes_path, folder), f"examples file {folder} cannot be read"
    )


def test_invalid_routes_file_gets_clear_error(small_files, tmp_path):
    _, examples = small_files
    routes = tmp_path / "routes.yaml"
    routes.write_text("- name: doctor\n  utterances: []\n", encoding="utf-8")
    assert_clean_error(
        run_tool(routes, examples),
        "route 1 (doctor): 'utterances' must be a non-empty list",
    )


def test_encoder_dir_not_folder_gets_clear_error(small_files, tmp_path):
    routes, examples = small_files
    assert_clean_error(
        run_tool(routes, examples, "--encoder-dir", tmp_path / "missing"),
        "ENCODER_LOCAL_DIR",
    )


# --- Shipped routes on the labelled sets ----------------------------------------


def read_labelled(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_labelled_sets_are_large_and_separate():
    dev = read_labelled(DEV_SET)
    holdout = read_labelled(HOLDOUT)
    for rows, minimum in ((dev, 60), (holdout, 30)):
        for label in ("doctor", "dcot", "none"):
            assert sum(row["route"] == label for row in rows) >= minimum, label
    assert not {row["text"] for row in dev} & {row["text"] for row in holdout}


@pytest.fixture(scope="module")
def shipped(plugin, encoder_dir):
    """The shipped routes scored on the dev and held-out sets at TEST_THRESHOLD."""
    routes_text, routes = tool.read_routes(plugin, SHIPPED_ROUTES)
    names = [route.name for route in routes]
    routing = tool.build_routing(
        plugin,
        routes_text,
        TEST_ENCODER,
        str(encoder_dir),
        float(TEST_THRESHOLD),
        "max",
    )
    dev = tool.score_examples(routing, tool.read_examples(DEV_SET, names))
    holdout = tool.score_examples(routing, tool.read_examples(HOLDOUT, names))
    return routes, dev, holdout


def expected_of(scored):
    return [example.expected for example in scored.examples]


def medical_sent_to_dcot(scored, routed):
    return [
        example.text
        for example, got in zip(scored.examples, routed, strict=True)
        if example.expected == "doctor" and got == "dcot"
    ]


def test_fitting_rule_matches_plugin(shipped):
    _, dev, holdout = shipped
    thresholds = {"doctor": float(TEST_THRESHOLD), "dcot": float(TEST_THRESHOLD)}
    for scored in (dev, holdout):
        predicted = [tool.predict(scores, thresholds) for scores in scored.scores]
        assert predicted == scored.routed


def test_shipped_routes_at_test_threshold(shipped):
    _, dev, holdout = shipped
    for scored in (dev, holdout):
        assert medical_sent_to_dcot(scored, scored.routed) == []
    dev_metrics = tool.measure(dev.route_names, expected_of(dev), dev.routed)
    holdout_metrics = tool.measure(
        holdout.route_names, expected_of(holdout), holdout.routed
    )
    # Measured when the routes were tuned: 0.954 on the dev set and 0.848 on the
    # held-out set. A fixed threshold of 0.4 is a little high for these routes.
    assert dev_metrics.accuracy >= 0.93
    assert holdout_metrics.accuracy >= 0.80


def test_shipped_routes_with_fitted_thresholds(plugin, shipped, encoder_dir):
    """Thresholds fitted on the dev set route the held-out set >= 90% correctly."""
    routes, dev, holdout = shipped
    fallback = {route.name: float(TEST_THRESHOLD) for route in routes}
    fitted = tool.fit_thresholds(
        dev.scores, expected_of(dev), dev.route_names, fallback
    )
    tuned_text = tool.tuned_routes_yaml(routes, fitted, [])
    routing = tool.build_routing(
        plugin, tuned_text, TEST_ENCODER, str(encoder_dir), float(TEST_THRESHOLD), "max"
    )

    scored = tool.score_examples(routing, holdout.examples)
    metrics = tool.measure(scored.route_names, expected_of(scored), scored.routed)

    assert medical_sent_to_dcot(scored, scored.routed) == []
    assert metrics.accuracy >= 0.90, tool.format_report(scored, scored.routed, fitted)
