"""Imports this checkout as the package ``comfyui_idadapter`` for a script in tools/ run by its path: runs the
trainers' bootstrap, training/_bootstrap.py (this file is what ``import _bootstrap`` finds beside a tools/ script)."""

import pathlib
import runpy

runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "training" / "_bootstrap.py"))
