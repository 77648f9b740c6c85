"""Draw bench/results/benchmark.png from results.json (matplotlib, Agg backend).

    python bench/plot_results.py results.json benchmark.png

benchmark.py runs it with the LiteLLM venv's Python, which has matplotlib.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "direct": "1. direct to vLLM",
    "pipelines": "2. Pipelines, auto",
    "litellm": "3. LiteLLM + hook",
}


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as file:
        results = json.load(file)
    levels = results["levels"]
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))

    panels = [
        (axes[0][0], "ttft_p50_ms", "TTFT p50 (ms)"),
        (axes[0][1], "ttft_p95_ms", "TTFT p95 (ms)"),
        (axes[1][0], "tokens_per_s", "tokens/s seen by the client"),
    ]
    for axis, field, title in panels:
        for name, label in LABELS.items():
            rows = results["paths"][name]
            values = [rows[str(level)][field] for level in levels]
            axis.plot(levels, values, marker="o", label=label)
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.set_xlabel("concurrent requests")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()

    router = results["router"]
    names = ["mix p50", "mix p95", "64 words p95", "200k chars p95"]
    values = [
        router["mix"]["p50_ms"],
        router["mix"]["p95_ms"],
        router["words64"]["p95_ms"],
        router["chars200k"]["p95_ms"],
    ]
    limits = [5, 10, 10, 20]
    axis = axes[1][1]
    axis.bar(names, values, color="tab:green", label="measured")
    axis.scatter(names, limits, color="black", marker="_", s=600, label="target")
    axis.set_title("4. router alone: routing decision (ms)")
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend()

    load = results["load_start"][0]
    figure.suptitle(
        f"auto vs direct vLLM vs LiteLLM ({results['machine']['cores']} cores, "
        f"load {load:.1f} at start, {results['size']} run)"
    )
    figure.tight_layout()
    figure.savefig(sys.argv[2], dpi=100)


if __name__ == "__main__":
    main()
