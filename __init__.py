"""comfyui-idadapter: ComfyUI entry point (V3 node API), model-folder registration and the web folder. Nothing
else."""

import os

# served by ComfyUI under /extensions/<this folder>/: its docs/<node id>.md are the nodes' help pages
WEB_DIRECTORY = "./web"

try:
    import folder_paths
except ModuleNotFoundError:  # imported outside ComfyUI, e.g. by pytest collecting the checkout: nothing to do
    folder_paths = None

# folder type -> file endings listed in its dropdowns (None: the folder holds model packs, not files)
MODEL_FOLDERS = {
    "insightface": None,
    "idadapter": {".safetensors"},
    "adaface": {".safetensors", ".pt", ".ckpt"},
    "wplus": {".safetensors", ".bin", ".pt", ".npy"},
    "face_embeds": {".safetensors"},
    "wplus_codes": {".safetensors", ".pth"},
}


def _register_model_folders():
    for name, extensions in MODEL_FOLDERS.items():
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        if extensions:
            paths, known = folder_paths.folder_names_and_paths[name]
            folder_paths.folder_names_and_paths[name] = (paths, set(known) | extensions)
    # Save Face Embeds and Save W+ write under output/face_embeds/ and output/wplus/; their Load nodes list them too.
    folder_paths.add_model_folder_path("face_embeds", os.path.join(folder_paths.get_output_directory(), "face_embeds"))
    folder_paths.add_model_folder_path("wplus_codes", os.path.join(folder_paths.get_output_directory(), "wplus"))


if folder_paths is not None:
    from .nodes.extension import comfy_entrypoint

    _register_model_folders()
    __all__ = ["comfy_entrypoint"]
