"""Starts a real ComfyUI checkout with this pack installed (no server) and runs one check of
``comfyui_checks.py`` in it.

Usage: python comfyui_runner.py COMFYUI_PATH WORK_DIR CHECK PAYLOAD_JSON RESULT_JSON

WORK_DIR holds custom_nodes/ (with this pack linked in), models/, input/ and output/. Run as a subprocess by
the tests: ComfyUI's top-level ``nodes`` module would clash with the pack's.
"""

import asyncio
import importlib.util
import json
import os
import sys


def main():
    comfy, work, check, payload_file, result_file = sys.argv[1:6]
    os.chdir(comfy)
    sys.path.insert(0, comfy)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported
    import folder_paths

    folder_paths.models_dir = os.path.join(work, "models")
    folder_paths.set_output_directory(os.path.join(work, "output"))
    folder_paths.set_input_directory(os.path.join(work, "input"))
    folder_paths.add_model_folder_path("custom_nodes", os.path.join(work, "custom_nodes"), is_default=True)
    for kind in ("checkpoints", "clip_vision", "embeddings"):
        folder_paths.add_model_folder_path(kind, os.path.join(work, "models", kind), is_default=True)

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    spec = importlib.util.spec_from_file_location("comfyui_checks", os.path.join(os.path.dirname(__file__), "comfyui_checks.py"))
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    with open(payload_file) as f:
        payload = json.load(f)
    result = getattr(checks, check)(work, payload)
    with open(result_file, "w") as f:
        json.dump(result, f, indent=1, default=repr)


if __name__ == "__main__":
    main()
