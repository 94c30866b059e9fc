"""The pack's nodes as its source declares them, read without importing the node modules (they import ComfyUI, which
most tests run without): one list for the help pages, the example workflows and the ComfyUI registration check."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def declared_nodes() -> dict[str, str]:
    """{node_id: display_name} of every io.Schema(...) in the pack's node modules."""
    nodes = {}
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        for call in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(call, ast.Call):
                continue
            keywords = {k.arg: k.value for k in call.keywords if isinstance(k.value, ast.Constant)}
            if "node_id" in keywords:
                nodes[keywords["node_id"].value] = keywords["display_name"].value
    return nodes
