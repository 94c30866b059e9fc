"""Runs API-format prompts through a real ComfyUI checkout with this pack installed, without a server.

Usage: python comfyui_runner.py COMFYUI_PATH WORK_DIR PROMPTS_JSON RESULT_JSON

WORK_DIR holds custom_nodes/ (with this pack linked in), models/, input/ and output/. The prompts are run in
order in one process, so a failing prompt followed by a good one shows the process survives the failure.
Run as a subprocess by the tests: ComfyUI's top-level ``nodes`` module would clash with the pack's.
"""

import asyncio
import json
import os
import sys


class _Server:
    """The attributes ComfyUI's executor and progress hook use on PromptServer."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata = {}

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def main():
    comfy, work, prompts_file, result_file = sys.argv[1:5]
    os.chdir(comfy)
    sys.path.insert(0, comfy)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported
    import folder_paths

    folder_paths.models_dir = os.path.join(work, "models")
    folder_paths.set_output_directory(os.path.join(work, "output"))
    folder_paths.set_input_directory(os.path.join(work, "input"))
    folder_paths.add_model_folder_path("custom_nodes", os.path.join(work, "custom_nodes"), is_default=True)

    import execution
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    with open(prompts_file) as f:
        prompts = json.load(f)
    result = {
        "registered": sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("IDA_")),
        "folders": {k: folder_paths.get_folder_paths(k) for k in ("insightface", "idadapter", "face_embeds")},
        "runs": [],
    }
    server = _Server()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)
    for i, prompt in enumerate(prompts):
        valid = asyncio.run(execution.validate_prompt(f"p{i}", prompt, None))
        run = {"valid": valid[0], "validation_error": _jsonable(valid[1]), "node_errors": _jsonable(valid[3])}
        if valid[0]:
            executor.execute(prompt, f"p{i}", extra_data={}, execute_outputs=valid[2])
            run["success"] = executor.success
            run["outputs"] = _jsonable(executor.history_result.get("outputs", {}))
            run["errors"] = [_jsonable(d) for e, d in executor.status_messages if e == "execution_error"]
        result["runs"].append(run)
    with open(result_file, "w") as f:
        json.dump(result, f, indent=1, default=repr)


if __name__ == "__main__":
    main()
