"""Imports this checkout as the package ``comfyui_idadapter`` (never as top-level ``nodes``: that name is
ComfyUI's), so that tests can import the pack's core and its trainers, in a ComfyUI process too; the trainers'
own bootstrap does it."""

import pathlib
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]

runpy.run_path(str(ROOT / "training" / "_bootstrap.py"))
