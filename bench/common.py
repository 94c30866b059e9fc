"""What the bench scripts share: the pack's import, a full-size SD1.5 UNet's diffusers config, the interleaved timer,
its summary (median, min-max, ratio of medians, overlapping spreads) and the writer of bench/results/*.json.

Importing this module imports the checkout as the package ``comfyui_idadapter`` (ComfyUI owns the top-level name
``nodes``), so a bench imports it before the pack.
"""

import datetime
import json
import os
import pathlib
import platform
import re
import runpy
import shlex
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START_DIR = pathlib.Path.cwd()

runpy.run_path(str(ROOT / "training" / "_bootstrap.py"))  # the trainers' import of the checkout

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def interleaved(variants, rounds, device):
    """Seconds per call of each variant of ``variants`` (name -> callable), {name: [one per round]}.

    Round 0 warms up (allocator, kernels, caches) and is not kept; then ``rounds`` rounds, each calling every variant
    once, the order rotated by one each round: drift and warm-up spread over all variants instead of landing on
    whichever runs first, and no variant always follows the same one. On CUDA each call is timed by CUDA events (its
    span on the stream) and the GPU is synchronised once per round, not between calls; on the CPU, by the wall
    clock.
    """
    if device.type == "cuda":
        def mark():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        def between(start, end):
            return start.elapsed_time(end) / 1000
    else:
        mark, between = time.perf_counter, lambda start, end: end - start
    names = list(variants)
    seconds = {name: [] for name in names}
    for r in range(rounds + 1):
        shift = r % len(names)
        marks = []
        for name in names[shift:] + names[:shift]:
            start = mark()
            variants[name]()
            marks.append((name, start, mark()))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if r:
            for name, start, end in marks:
                seconds[name].append(between(start, end))
    return seconds


def summarize(seconds, baseline):
    """{name: {median, min, max, ratio (of medians, to ``baseline``), overlaps, seconds}} from :func:`interleaved`'s
    lists. ``overlaps`` names the other variants whose min-max spread overlaps this one's: their difference is
    within what the runs scattered."""
    spread = {name: (min(values), max(values)) for name, values in seconds.items()}
    base = statistics.median(seconds[baseline])
    return {name: {"median": statistics.median(values), "min": spread[name][0], "max": spread[name][1],
                   "ratio": statistics.median(values) / base,
                   "overlaps": [other for other, (lo, hi) in spread.items()
                                if other != name and lo <= spread[name][1] and spread[name][0] <= hi],
                   "seconds": values}
            for name, values in seconds.items()}


def comparison(seconds, baseline, unit="s"):
    """One table's figures: the summary of ``seconds`` against ``baseline``, shown in ``unit`` (s or ms)."""
    return {"baseline": baseline, "unit": unit, "variants": summarize(seconds, baseline)}


def comparison_lines(table):
    """A :func:`comparison` as text lines: median (min-max), ratio to the baseline, and any overlapping spreads."""
    scale = {"s": 1, "ms": 1000}[table["unit"]]
    width = max(map(len, table["variants"]))
    lines = []
    for name, v in table["variants"].items():
        ratio = "" if name == table["baseline"] else f"   {v['ratio']:.3f}x {table['baseline']}"
        overlap = f"   spread overlaps {', '.join(v['overlaps'])}" if v["overlaps"] else ""
        lines.append(f"  {name:{width}s} {v['median'] * scale:8.4g} {table['unit']} "
                     f"({v['min'] * scale:.4g}-{v['max'] * scale:.4g}){ratio}{overlap}")
    return lines


def device_name(device):
    """The GPU's name, or the CPU's model (from /proc/cpuinfo where there is one) and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        model = re.search(r"^model name\s*:\s*(.+)$", pathlib.Path("/proc/cpuinfo").read_text(), re.M).group(1)
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"{model.strip()} ({os.cpu_count()} cores)"


def command_line():
    """How this process was started, as one would type it at the checkout's root (the thread count set in the
    environment included: it changes CPU figures)."""
    script = (START_DIR / sys.argv[0]).resolve()  # a bench may chdir (comfyui_overhead.py runs inside ComfyUI)
    if script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    threads = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else []
    return shlex.join([*threads, "python", str(script), *sys.argv[1:]])


def write_results(bench, device, figures, folder=RESULTS):
    """Writes ``figures`` with what they were measured on to ``folder/<bench>-<device>.json``; returns its path.

    ``bench`` names the script and whatever setting would otherwise make two runs overwrite each other's file.
    """
    name = device_name(device)
    record = {
        "bench": bench,
        "device": name,
        "threads": None if device.type == "cuda" else torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": command_line(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "figures": figures,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = pathlib.Path(folder) / f"{bench}-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
