"""bench/common.py's shared machinery (interleaved timing, its summary, the results file) and bench/report.py, on cheap
fake callables: no model is timed."""

import importlib.util
import json
import types

import torch

from pack_import import ROOT


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = load("common")
report = load("report")


def test_interleaved_rotates_the_order_and_keeps_no_warm_up_round():
    calls = []
    seconds = common.interleaved({name: lambda name=name: calls.append(name) for name in "abc"}, 3,
                                 torch.device("cpu"))
    assert calls == list("abc" "bca" "cab" "abc")  # round 0 warms up; each round starts one variant later
    assert {name: len(values) for name, values in seconds.items()} == {"a": 3, "b": 3, "c": 3}


def test_interleaved_times_each_call(monkeypatch):
    now = [0.0]  # a clock that only the timed calls move: the machine's load cannot blur the figures
    monkeypatch.setattr(common, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def slow():
        now[0] += 0.25  # exact in binary: the differences come out exact

    seconds = common.interleaved({"fast": lambda: None, "slow": slow}, 2, torch.device("cpu"))
    assert seconds == {"fast": [0.0, 0.0], "slow": [0.25, 0.25]}


def test_summary_medians_spreads_ratio_and_overlaps():
    summary = common.summarize({"base": [3.0, 1.0, 2.0], "x": [10.0, 2.5, 3.0], "y": [4.0, 6.0, 5.0, 5.5]}, "base")
    assert (summary["base"]["median"], summary["base"]["min"], summary["base"]["max"]) == (2.0, 1.0, 3.0)
    assert (summary["x"]["median"], summary["x"]["min"], summary["x"]["max"]) == (3.0, 2.5, 10.0)
    assert summary["y"]["median"] == 5.25
    assert summary["x"]["ratio"] == 1.5 and summary["y"]["ratio"] == 2.625 and summary["base"]["ratio"] == 1.0
    assert summary["base"]["overlaps"] == ["x"]  # 1-3 meets x's 2.5-10, not y's 4-6
    assert summary["x"]["overlaps"] == ["base", "y"]
    assert summary["y"]["overlaps"] == ["x"]
    assert summary["y"]["seconds"] == [4.0, 6.0, 5.0, 5.5]


def test_printout_says_which_spreads_overlap():
    lines = common.comparison_lines(common.comparison({"base": [1.0, 1.2], "same": [1.1, 1.3], "slower": [2.0, 2.2]},
                                                      "base", "ms"))
    assert lines[1].split() == ["same", "1200", "ms", "(1100-1300)", "1.091x", "base", "spread",
                                "overlaps", "base"]
    assert "overlaps" not in lines[2] and "1.909x base" in lines[2]


def test_results_file_holds_the_machine_the_command_and_the_figures(tmp_path):
    figures = {"resolution": 256, "step": common.comparison({"base": [2.0, 2.2], "idadapter": [2.4, 2.6]}, "base")}
    path = common.write_results("unet_overhead-test", torch.device("cpu"), figures, tmp_path)
    assert path.parent == tmp_path and path.name.startswith("unet_overhead-test-") and path.suffix == ".json"
    record = json.loads(path.read_text())
    assert set(record) == {"bench", "device", "threads", "torch", "cuda", "command", "date", "figures"}
    assert record["bench"] == "unet_overhead-test" and record["torch"] == torch.__version__
    assert record["threads"] == torch.get_num_threads() and record["device"]
    assert " python " in f" {record['command']}" and record["date"][:2] == "20"
    assert record["figures"]["step"]["variants"]["idadapter"]["ratio"] == 2.5 / 2.1
    assert record["figures"]["resolution"] == 256

    text = "\n".join(report.markdown(record))
    assert f"`{record['command']}`" in text and record["device"] in text
    assert "| idadapter | 2.5 s | 2.4–2.6 | 1.190× | — |" in text
    assert "resolution 256" in text
    alone = report.comparison_table("step", common.comparison({"step": [1.0, 3.0, 2.0]}, "step"))
    assert alone == ["| step | median | min–max |", "|---|---|---|", "| step | 2 s | 1–3 |"]  # no ratio to itself
