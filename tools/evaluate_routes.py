"""Evaluate routes on labelled examples, plot their scores and fit thresholds.

    python tools/evaluate_routes.py valves/routes.yaml valves/dev-set.jsonl \\
        --encoder-model sentence-transformers/all-MiniLM-L6-v2 \\
        --encoder-dir ENCODER_FOLDER --threshold 0.4 --fit

The routes file has the format of the plugin's ROUTES valve. The examples file is
JSON Lines (one object per line) or CSV with a header line. Each example has the
fields `text` and `route`, where `route` is a route name, or `none` (or empty)
for a message that should go to the default model.

Routing is done by the plugin itself (its parse_routes, load_encoder and
SemanticRouting, imported from pipelines/semantic_lora_router.py), so the numbers
are what the plugin does with the same valves. Each example is routed as a chat
with one user message.

--fit chooses a threshold per route, and the aggregation (max or mean) with the
better cross-validated accuracy, then writes the routes with those thresholds as
YAML for the ROUTES valve. Thresholds depend on the encoder: fit them with the
encoder that production uses.

Exit status: 0 on success, 2 for a bad option or input file, 1 when the encoder
cannot be loaded or an output file cannot be written.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
PLUGIN_PATH = REPO / "pipelines" / "semantic_lora_router.py"

# The label of examples that no route should take: the default model answers them.
NONE_LABEL = "none"
AGGREGATIONS = ("max", "mean")
# A fitted threshold that lies beyond every example's score sits this far outside.
EDGE_MARGIN = 0.01
# Pixel size of one route's row in the score plot, at PLOT_DPI.
PLOT_WIDTH = 1000
PLOT_ROW_HEIGHT = 300
PLOT_DPI = 100


class InputError(Exception):
    """An option or input file cannot be used; exit status 2."""


class RunError(Exception):
    """The evaluation could not run (encoder, output file); exit status 1."""


def load_plugin(path: Path = PLUGIN_PATH) -> ModuleType:
    """Import the plugin file by its path, as the Pipelines server does."""
    spec = importlib.util.spec_from_file_location("semantic_lora_router", path)
    if spec is None or spec.loader is None:
        raise RunError(f"the plugin {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- Input files ----------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One labelled message; `expected` is a route name or None (default model)."""

    text: str
    expected: str | None
    where: str  # "file:line", for messages


def read_routes(plugin: ModuleType, path: Path) -> tuple[str, tuple[Any, ...]]:
    """Return the routes file's text and the plugin's parsed routes."""
    text = read_text(path, "routes file")
    try:
        routes = plugin.parse_routes(text)
    except plugin.InvalidRoutes as exc:
        raise InputError(f"{path}: {exc}") from None
    if any(route.name == NONE_LABEL for route in routes):
        raise InputError(
            f"{path}: a route is named {NONE_LABEL!r}, which the examples use for "
            "the default model; rename the route"
        )
    return text, routes


def read_text(path: Path, kind: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{kind} {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InputError(f"{kind} {path} cannot be read: {reason}") from None


def read_examples(path: Path, route_names: Sequence[str]) -> list[Example]:
    """Read labelled examples from a .jsonl or .csv file and check their labels."""
    text = read_text(path, "examples file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path, text)
    elif suffix == ".csv":
        rows = _csv_rows(path, text)
    else:
        raise InputError(
            f"examples file {path}: unknown format {suffix or '(no extension)'}; "
            "use .jsonl or .csv"
        )

    examples = [_example(where, row, route_names) for where, row in rows]
    if not examples:
        raise InputError(f"examples file {path} has no examples")
    return examples


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: invalid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise InputError(
                f"{where}: expected an object with text and route, "
                f"got {type(row).__name__}"
            )
        rows.append((where, row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    columns = reader.fieldnames or []
    for column in ("text", "route"):
        if column not in columns:
            found = ", ".join(columns) or "none"
            raise InputError(
                f"{path}: missing column {column!r} in the header line "
                f"(columns found: {found})"
            )
    rows = []
    try:
        for row in reader:
            if any((value or "").strip() for value in row.values()):
                rows.append((f"{path}:{reader.line_num}", dict(row)))
    except csv.Error as exc:
        raise InputError(f"{path}:{reader.line_num}: invalid CSV: {exc}") from None
    return rows


def _example(where: str, row: dict[str, Any], route_names: Sequence[str]) -> Example:
    for column in ("text", "route"):
        if column not in row:
            raise InputError(f"{where}: missing field {column!r}")
    text, label = row["text"], row["route"]
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: 'text' must be non-empty text, got {text!r}")
    if label is None or (isinstance(label, str) and label.strip() in ("", NONE_LABEL)):
        return Example(text, None, where)
    if not isinstance(label, str) or label.strip() not in route_names:
        known = ", ".join([*route_names, NONE_LABEL])
        raise InputError(f"{where}: unknown route {label!r}; use one of {known}")
    return Example(text, label.strip(), where)


# --- Scoring and metrics --------------------------------------------------------


@dataclass
class Scored:
    """Each example's score for every route, and where the plugin sent it."""

    examples: list[Example]
    route_names: list[str]
    scores: list[dict[str, float]]
    routed: list[str | None]


def build_routing(
    plugin: ModuleType,
    routes_text: str,
    encoder_model: str,
    encoder_dir: str,
    threshold: float,
    aggregation: str,
) -> Any:
    """Build the plugin's SemanticRouting for these routes and valve values."""
    # The arguments are new values, so check them as the server checks an update.
    plugin.STARTED.set()
    try:
        valves = plugin.Valves(
            ROUTES=routes_text,
            ENCODER_MODEL=encoder_model,
            ENCODER_LOCAL_DIR=encoder_dir,
            ROUTER_SCORE_THRESHOLD=threshold,
            ROUTER_AGGREGATION=aggregation,
        )
    except plugin.ValidationError as exc:
        error = exc.errors()[0]
        field_name = error["loc"][0] if error["loc"] else "value"
        raise InputError(f"{field_name}: {error['msg']}") from None
    try:
        return plugin.SemanticRouting.build(valves, None)
    except plugin.RouterUnavailable as exc:
        raise RunError(
            f"{exc} (in this tool: --encoder-model, --encoder-dir)"
        ) from None


def score_examples(routing: Any, examples: list[Example]) -> Scored:
    """Route every example as a one-message chat and record all route scores.

    The scores recorded are the ones the plugin's decide() computed for the
    message, caught on their way, so each example is embedded once.
    """
    names = list(routing.routes)
    scores, routed = [], []
    seen: list[list[tuple[str, float]]] = []
    compute = routing.scores

    def remember(text: str) -> list[tuple[str, float]]:
        ranked: list[tuple[str, float]] = compute(text)
        seen.append(ranked)
        return ranked

    # decide() calls self.scores, so this instance attribute receives its calls.
    routing.scores = remember
    try:
        for example in examples:
            seen.clear()
            decision = routing.decide([{"role": "user", "content": example.text}])
            if len(seen) != 1:
                raise RunError(
                    f"{example.where}: the plugin scored this message {len(seen)} "
                    "times, but the tool expects once; it cannot record its scores"
                )
            routed.append(decision.route.name if decision.route else None)
            scores.append(dict(seen[0]))
    finally:
        del routing.scores
    return Scored(examples, names, scores, routed)


def predict(scores: dict[str, float], thresholds: dict[str, float]) -> str | None:
    """Apply the plugin's rule: the best route, if it reaches its own threshold.

    A best route below its threshold sends the chat to the default model even when
    the runner-up would pass its own lower threshold.
    """
    best = max(scores, key=scores.__getitem__)
    return best if scores[best] >= thresholds[best] else None


@dataclass
class Metrics:
    """Accuracy, per-label precision and recall, and the confusion matrix."""

    labels: list[str | None]
    total: int
    correct: int
    # confusion[expected][routed] counts examples
    confusion: dict[str | None, dict[str | None, int]] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def precision(self, label: str | None) -> float:
        routed = sum(row[label] for row in self.confusion.values())
        return self.confusion[label][label] / routed if routed else 0.0

    def recall(self, label: str | None) -> float:
        support = self.support(label)
        return self.confusion[label][label] / support if support else 0.0

    def support(self, label: str | None) -> int:
        return sum(self.confusion[label].values())


def measure(
    route_names: Sequence[str],
    expected: Sequence[str | None],
    routed: Sequence[str | None],
) -> Metrics:
    labels: list[str | None] = [*route_names, None]
    confusion = {row: {column: 0 for column in labels} for row in labels}
    for truth, got in zip(expected, routed, strict=True):
        confusion[truth][got] += 1
    correct = sum(confusion[label][label] for label in labels)
    return Metrics(labels, len(expected), correct, confusion)


# --- Fitting --------------------------------------------------------------------


def fit_threshold(
    pairs: Sequence[tuple[float, str | None]], route: str
) -> float | None:
    """Choose the threshold for `route` that routes the most examples correctly.

    `pairs` are (score, expected label) of the examples on which `route` scores
    highest. Only those examples can take the route, so each route's threshold is
    fitted on its own. Among equally good thresholds the middle of the widest gap
    between scores wins. Returns None when no example scores highest on the route.
    """
    if not pairs:
        return None
    values = sorted({score for score, _ in pairs})
    candidates = [(max(values[0] - EDGE_MARGIN, 0.0), 2 * EDGE_MARGIN)]
    candidates += [
        ((low + high) / 2, high - low)
        for low, high in zip(values, values[1:], strict=False)
    ]
    candidates.append((min(values[-1] + EDGE_MARGIN, 1.0), 2 * EDGE_MARGIN))

    def correct(threshold: float) -> int:
        return sum(
            (label == route and score >= threshold)
            or (label is None and score < threshold)
            for score, label in pairs
        )

    best = max(candidates, key=lambda item: (correct(item[0]), item[1]))
    return _short(best[0], values)


def _short(threshold: float, values: Sequence[float]) -> float:
    """Round to the fewest decimals that keep every example on the same side."""
    for digits in (2, 3, 4, 5, 6):
        rounded = round(threshold, digits)
        if all((value >= rounded) == (value >= threshold) for value in values):
            return rounded
    return threshold


def fit_thresholds(
    scores: Sequence[dict[str, float]],
    expected: Sequence[str | None],
    route_names: Sequence[str],
    fallback: dict[str, float],
) -> dict[str, float]:
    """Fit every route's threshold; a route that no example favours keeps `fallback`."""
    favoured: dict[str, list[tuple[float, str | None]]] = {n: [] for n in route_names}
    for row, label in zip(scores, expected, strict=True):
        best = max(row, key=row.__getitem__)
        favoured[best].append((row[best], label))
    thresholds = {}
    for name in route_names:
        fitted = fit_threshold(favoured[name], name)
        thresholds[name] = fallback[name] if fitted is None else fitted
    return thresholds


def stratified_folds(
    expected: Sequence[str | None], folds: int, seed: int
) -> list[int]:
    """Assign each example a fold, spreading every label evenly over the folds."""
    by_label: dict[str | None, list[int]] = {}
    for index, label in enumerate(expected):
        by_label.setdefault(label, []).append(index)
    rng = random.Random(seed)
    assignment = [0] * len(expected)
    offset = 0
    for label in sorted(by_label, key=lambda item: item or ""):
        indices = by_label[label]
        rng.shuffle(indices)
        for position, index in enumerate(indices):
            assignment[index] = (position + offset) % folds
        offset += len(indices)
    return assignment


def cross_validate(
    scored: Scored, fallback: dict[str, float], folds: int, seed: int
) -> float:
    """Return the accuracy of fitting on k-1 folds and routing the held-out one."""
    expected = [example.expected for example in scored.examples]
    assignment = stratified_folds(expected, folds, seed)
    correct = 0
    for fold in range(folds):
        train = [i for i, f in enumerate(assignment) if f != fold]
        thresholds = fit_thresholds(
            [scored.scores[i] for i in train],
            [expected[i] for i in train],
            scored.route_names,
            fallback,
        )
        correct += sum(
            predict(scored.scores[i], thresholds) == expected[i]
            for i, f in enumerate(assignment)
            if f == fold
        )
    return correct / len(expected)


def tuned_routes_yaml(
    routes: Sequence[Any], thresholds: dict[str, float], header: Sequence[str]
) -> str:
    """Return `routes` with fitted thresholds as YAML text for the ROUTES valve."""
    document = {
        "routes": [
            {
                "name": route.name,
                "target": route.target,
                "threshold": thresholds[route.name],
                "utterances": list(route.utterances),
            }
            for route in routes
        ]
    }
    body = yaml.safe_dump(
        document, sort_keys=False, allow_unicode=True, width=88, indent=2
    )
    return "".join(f"# {line}\n" for line in header) + body


# --- Report -----------------------------------------------------------------------


def label_name(label: str | None) -> str:
    return NONE_LABEL if label is None else label


def format_report(
    scored: Scored, routed: Sequence[str | None], thresholds: dict[str, float]
) -> str:
    """Return the accuracy, per-route table, confusion matrix and misrouted list."""
    expected = [example.expected for example in scored.examples]
    metrics = measure(scored.route_names, expected, routed)
    width = max(len(label_name(label)) for label in metrics.labels) + 2
    lines = [
        f"accuracy {metrics.accuracy:.3f} ({metrics.correct}/{metrics.total})",
        "",
        f"{'route':<{width}}{'precision':>10}{'recall':>8}{'support':>9}",
    ]
    for label in metrics.labels:
        lines.append(
            f"{label_name(label):<{width}}{metrics.precision(label):>10.3f}"
            f"{metrics.recall(label):>8.3f}{metrics.support(label):>9}"
        )

    lines += ["", "confusion matrix (rows: expected, columns: routed to)"]
    columns = [label_name(label) for label in metrics.labels]
    cell = max(8, *(len(name) + 2 for name in columns))
    lines.append(" " * width + "".join(f"{name:>{cell}}" for name in columns))
    for truth in metrics.labels:
        counts = "".join(
            f"{metrics.confusion[truth][got]:>{cell}}" for got in metrics.labels
        )
        lines.append(f"{label_name(truth):<{width}}{counts}")

    wrong = [i for i, got in enumerate(routed) if got != expected[i]]
    lines += ["", f"misrouted: {len(wrong)}"]
    for index in wrong:
        lines.append(_misrouted_line(scored, index, routed[index], thresholds))
    return "\n".join(lines)


def _misrouted_line(
    scored: Scored, index: int, got: str | None, thresholds: dict[str, float]
) -> str:
    example = scored.examples[index]
    ranked = sorted(scored.scores[index].items(), key=lambda item: -item[1])
    scores = ", ".join(
        f"{name} {score:.3f}/{thresholds[name]:.3f}" for name, score in ranked
    )
    text = example.text if len(example.text) <= 90 else example.text[:87] + "..."
    return (
        f"  expected {label_name(example.expected)}, routed {label_name(got)} "
        f"(score/threshold: {scores}) {example.where}: {text}"
    )


def format_thresholds(
    route_names: Sequence[str], before: dict[str, float], after: dict[str, float]
) -> str:
    lines = [f"{'route':<12}{'before':>8}{'after':>8}"]
    for name in route_names:
        lines.append(f"{name:<12}{before[name]:>8.3f}{after[name]:>8.3f}")
    return "\n".join(lines)


# --- Plot -----------------------------------------------------------------------


def plot_scores(
    path: Path,
    scored: Scored,
    thresholds: dict[str, float],
    title: str,
    fitted: dict[str, float] | None = None,
) -> None:
    """Draw each route's score histogram by expected label, with thresholds.

    The image is PLOT_WIDTH pixels wide and PLOT_ROW_HEIGHT high per route.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = scored.route_names
    figure, axes = plt.subplots(
        len(names),
        1,
        figsize=(PLOT_WIDTH / PLOT_DPI, PLOT_ROW_HEIGHT * len(names) / PLOT_DPI),
        dpi=PLOT_DPI,
        squeeze=False,
    )
    every = [score for row in scored.scores for score in row.values()]
    bins = np.linspace(min(every), max(every), 41)
    groups = [*names, None]
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:brown"]
    for row, name in enumerate(names):
        axis = axes[row][0]
        for position, label in enumerate(groups):
            values = [
                scores[name]
                for scores, example in zip(scored.scores, scored.examples, strict=True)
                if example.expected == label
            ]
            if not values:
                continue
            colour = "tab:gray" if label is None else colours[position % len(colours)]
            axis.hist(
                values,
                bins=bins,
                alpha=0.5,
                color=colour,
                label=f"expected {label_name(label)} ({len(values)})",
            )
        axis.axvline(thresholds[name], color="black", linestyle="--", label="threshold")
        if fitted is not None:
            axis.axvline(fitted[name], color="black", label="fitted threshold")
        axis.set_title(f"score for route {name}", fontsize=10)
        axis.set_ylabel("examples")
        axis.legend(fontsize=8, loc="upper left")
    axes[-1][0].set_xlabel("similarity score")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=PLOT_DPI)
    except OSError as exc:
        raise RunError(f"the plot {path} cannot be written: {exc.strerror}") from None
    finally:
        plt.close(figure)


# --- Command --------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None, plugin: ModuleType) -> argparse.Namespace:
    fields = plugin.Valves.model_fields
    parser = argparse.ArgumentParser(
        prog="evaluate_routes.py",
        description="Route labelled examples with the plugin, print accuracy, "
        "precision, recall and the misrouted examples, plot the scores, and with "
        "--fit choose per-route thresholds.",
    )
    parser.add_argument("routes", type=Path, help="routes YAML, as in the ROUTES valve")
    parser.add_argument(
        "examples",
        type=Path,
        help="labelled examples: .jsonl or .csv with fields text and route "
        f"(a route name, or {NONE_LABEL} for the default model)",
    )
    parser.add_argument(
        "--encoder-model",
        default=fields["ENCODER_MODEL"].default,
        help="fastembed model name, as the ENCODER_MODEL valve (default %(default)s)",
    )
    parser.add_argument(
        "--encoder-dir",
        default="",
        help="folder with the encoder's ONNX and tokenizer files, or a fastembed "
        "cache folder, as the ENCODER_LOCAL_DIR valve (default: download)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=fields["ROUTER_SCORE_THRESHOLD"].default,
        help="similarity (0 to 1) for routes without their own threshold, as the "
        "ROUTER_SCORE_THRESHOLD valve (default %(default)s)",
    )
    parser.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default=fields["ROUTER_AGGREGATION"].default,
        help="how a route's score combines its utterances, as the "
        "ROUTER_AGGREGATION valve (default %(default)s)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=Path("route-scores.png"),
        help="PNG file for the score distributions (default %(default)s)",
    )
    parser.add_argument(
        "--fit",
        action="store_true",
        help="choose per-route thresholds and the aggregation by cross-validation, "
        "and write the tuned routes",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("routes-tuned.yaml"),
        help="where --fit writes the tuned routes YAML (default %(default)s)",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=5,
        help="number of cross-validation folds for --fit (default %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for splitting the examples into folds (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        raise InputError(f"--threshold must be from 0 to 1, got {args.threshold}")
    if args.folds < 2:
        raise InputError(f"--folds must be at least 2, got {args.folds}")
    return args


def run(argv: Sequence[str] | None = None) -> int:
    plugin = load_plugin()
    args = parse_args(argv, plugin)
    routes_text, routes = read_routes(plugin, args.routes)
    names = [route.name for route in routes]
    examples = read_examples(args.examples, names)
    if args.fit and len(examples) < args.folds:
        raise InputError(
            f"--folds {args.folds} needs at least {args.folds} examples, "
            f"but {args.examples} has {len(examples)}"
        )

    before = {
        route.name: args.threshold if route.threshold is None else route.threshold
        for route in routes
    }
    routing = build_routing(
        plugin,
        routes_text,
        args.encoder_model,
        args.encoder_dir,
        args.threshold,
        args.aggregation,
    )
    scored = score_examples(routing, examples)
    _check_rule(scored, before)

    counts = ", ".join(
        f"{label_name(label)} {sum(e.expected == label for e in examples)}"
        for label in [*names, None]
    )
    print(f"routes: {args.routes} ({', '.join(names)})")
    print(f"examples: {args.examples}, {len(examples)} ({counts})")
    print(f"encoder: {args.encoder_model}, aggregation {args.aggregation}")
    print("thresholds: " + ", ".join(f"{n} {before[n]:.3f}" for n in names))
    print()
    print(format_report(scored, scored.routed, before))

    if not args.fit:
        plot_scores(args.plot, scored, before, plot_title(args, args.aggregation))
        print(f"\nscore plot written to {args.plot}")
        return 0

    return run_fit(plugin, args, routes, routes_text, scored, before)


def plot_title(args: argparse.Namespace, aggregation: str) -> str:
    return (
        f"{args.routes.name} on {args.examples.name}: encoder {args.encoder_model}, "
        f"aggregation {aggregation}"
    )


def run_fit(
    plugin: ModuleType,
    args: argparse.Namespace,
    routes: Sequence[Any],
    routes_text: str,
    scored: Scored,
    before: dict[str, float],
) -> int:
    """Fit thresholds and aggregation, report before and after, write the YAML."""
    by_aggregation = {args.aggregation: scored}
    for aggregation in AGGREGATIONS:
        if aggregation not in by_aggregation:
            routing = build_routing(
                plugin,
                routes_text,
                args.encoder_model,
                args.encoder_dir,
                args.threshold,
                aggregation,
            )
            by_aggregation[aggregation] = score_examples(routing, scored.examples)

    print(f"\n--- fit: {args.folds}-fold cross-validation, seed {args.seed} ---")
    validated = {
        aggregation: cross_validate(candidate, before, args.folds, args.seed)
        for aggregation, candidate in by_aggregation.items()
    }
    for aggregation, accuracy in validated.items():
        print(f"aggregation {aggregation}: cross-validated accuracy {accuracy:.3f}")
    # The current aggregation stays unless another one is strictly better.
    chosen = max(validated, key=lambda a: (validated[a], a == args.aggregation))
    print(f"chosen aggregation: {chosen}")

    best = by_aggregation[chosen]
    expected = [example.expected for example in best.examples]
    fitted = fit_thresholds(best.scores, expected, best.route_names, before)
    print()
    print(format_thresholds(best.route_names, before, fitted))

    accuracy_before = measure(best.route_names, expected, scored.routed).accuracy
    tuned_routing = build_routing(
        plugin,
        tuned_routes_yaml(routes, fitted, []),
        args.encoder_model,
        args.encoder_dir,
        args.threshold,
        chosen,
    )
    after = score_examples(tuned_routing, best.examples)
    _check_rule(after, fitted)
    accuracy_after = measure(best.route_names, expected, after.routed).accuracy

    print(f"\n--- after fitting (aggregation {chosen}) ---")
    print(format_report(after, after.routed, fitted))
    print(
        f"\naccuracy before {accuracy_before:.3f}, after {accuracy_after:.3f} on "
        f"these examples; cross-validated {validated[chosen]:.3f}"
    )
    if chosen != args.aggregation:
        print(f"set the ROUTER_AGGREGATION valve to {chosen} with these routes")

    header = [
        f"Routes tuned by tools/evaluate_routes.py on {args.examples.name} "
        f"({len(expected)} examples)",
        f"for the encoder {args.encoder_model} with ROUTER_AGGREGATION={chosen}.",
        "These thresholds fit that encoder only. Accuracy on the examples:",
        f"{accuracy_before:.3f} before, {accuracy_after:.3f} after; "
        f"{validated[chosen]:.3f} by {args.folds}-fold cross-validation.",
    ]
    write_text(args.output, tuned_routes_yaml(routes, fitted, header))
    print(f"tuned routes written to {args.output}")
    title = f"{plot_title(args, chosen)}, fitted thresholds"
    plot_scores(args.plot, after, before, title, fitted)
    print(f"score plot written to {args.plot}")
    return 0


def _check_rule(scored: Scored, thresholds: dict[str, float]) -> None:
    """Warn if the fitting rule disagrees with the plugin's own decision."""
    for scores, routed, example in zip(
        scored.scores, scored.routed, scored.examples, strict=True
    ):
        if predict(scores, thresholds) != routed:
            print(
                f"warning: {example.where}: the plugin routed to "
                f"{label_name(routed)}, but the fitting rule gives "
                f"{label_name(predict(scores, thresholds))}; fitted thresholds "
                "may not match the plugin",
                file=sys.stderr,
            )


def write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RunError(f"{path} cannot be written: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except InputError as exc:
        print(f"evaluate_routes.py: error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"evaluate_routes.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
