"""Imports this checkout as the package ``comfyui_idadapter`` (never as top-level ``nodes``: that name is
ComfyUI's), so that tests can import the pack's core and its trainers, in a ComfyUI process too."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

if "comfyui_idadapter" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("comfyui_idadapter", ROOT / "__init__.py",
                                                   submodule_search_locations=[str(ROOT)])
    sys.modules["comfyui_idadapter"] = _pack = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_pack)
