"""The Markdown tables of bench/README.md, made from what the benches wrote to bench/results/.

    python bench/report.py                                    # every bench/results/*.json
    python bench/report.py bench/results/unet_overhead-*.json # some

For each file: a heading with the bench and the machine, the date, torch (and CUDA) versions and the exact command;
then a table per comparison (variant, median, min-max, ratio of medians to the baseline, the variants whose spread
overlaps), a table per other group of figures (e.g. TFLOP per module) and one line of the remaining figures.
"""

import json
import pathlib
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TIMING_KEYS = ("median", "min", "max", "ratio", "overlaps", "seconds")


def number(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def comparison_table(title, table):
    """A comparison's rows, plus a column for each figure a variant carries beyond its timing (e.g. images/s); a
    comparison of one variant (a step timed alone) has no ratio or overlap columns."""
    unit = table["unit"]
    scale = {"s": 1, "ms": 1000}[unit]
    extra = list(dict.fromkeys(key for v in table["variants"].values() for key in v if key not in TIMING_KEYS))
    against = len(table["variants"]) > 1
    columns = [title, "median", "min–max"] + [f"× {table['baseline']}", "spread overlaps"] * against + extra
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for name, v in table["variants"].items():
        cells = [name, f"{v['median'] * scale:.4g} {unit}", f"{v['min'] * scale:.4g}–{v['max'] * scale:.4g}"]
        cells += [f"{v['ratio']:.3f}×", ", ".join(v["overlaps"]) or "—"] * against
        lines.append("| " + " | ".join(cells + [number(v.get(key, "—")) for key in extra]) + " |")
    return lines


def markdown(record):
    """One results file as Markdown lines."""
    machine = record["device"] + (f", {record['threads']} thread(s)" if record.get("threads") else "")
    versions = f"torch {record['torch']}" + (f", CUDA {record['cuda']}" if record.get("cuda") else "")
    lines = [f"#### `{record['bench']}` — {machine}", "",
             f"{record['date'][:10]}, {versions}: `{record['command']}`", ""]
    figures = record["figures"]
    groups = {key: value for key, value in figures.items() if isinstance(value, dict)}
    for key, value in sorted(groups.items(), key=lambda item: "variants" not in item[1]):  # timings first
        if "variants" in value:
            lines += comparison_table(key, value) + [""]
        else:
            lines += [f"| {key} | |", "|---|---|"] + [f"| {k} | {number(v)} |" for k, v in value.items()] + [""]
    scalars = [f"{key} {'—' if value is None else number(value)}" for key, value in figures.items() if key not in groups]
    if scalars:
        lines += ["; ".join(scalars), ""]
    return lines


def main(paths):
    for path in paths or sorted(RESULTS.glob("*.json")):
        print("\n".join(markdown(json.loads(pathlib.Path(path).read_text()))))


if __name__ == "__main__":
    main(sys.argv[1:])
