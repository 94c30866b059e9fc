"""Imports this checkout as the package ``comfyui_idadapter`` for a script run by its path (``python
training/train_idadapter.py``, ``accelerate launch training/train_idadapter.py``): the pack's files import one another
relatively, and ComfyUI owns the top-level name ``nodes``. Each such script starts with

    if not __package__:  # run as a script
        import _bootstrap  # noqa: F401

which finds this file beside it, a script's own folder being sys.path[0]; tools/_bootstrap.py runs this one."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

if "comfyui_idadapter" not in sys.modules:
    spec = importlib.util.spec_from_file_location("comfyui_idadapter", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    sys.modules["comfyui_idadapter"] = pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
