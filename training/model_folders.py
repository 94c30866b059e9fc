"""What the model folders the trainers and the evaluation load must hold, checked from their files alone (no model
is loaded, nothing heavy is imported): a diffusers Stable Diffusion folder for --base_model and a transformers CLIP
vision folder for --clip_vision. Each check returns its problems as messages that say what was expected and how to
fix it (empty: the folder has what the loader reads)."""

from __future__ import annotations

import json
import os

# a diffusers folder's parts that the trainers load, and the file that describes each
SD_PARTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
            "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
SDXL_PARTS = {"text_encoder_2": "config.json", "tokenizer_2": "tokenizer_config.json"}
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
SD_LAYOUT = ("a diffusers Stable Diffusion folder holds model_index.json, unet/, vae/ and text_encoder/ (each a "
             "config.json and its weights), tokenizer/ (tokenizer_config.json with model_max_length, and vocab.json + "
             "merges.txt or tokenizer.json) and scheduler/ (scheduler_config.json); SDXL also text_encoder_2/ and "
             "tokenizer_2/")

CLIP_VISION_TYPES = ("clip_vision_model", "clip")
CLIP_VISION_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json")
CLIP_VISION_EXPECTED = ("expected a transformers CLIP vision model folder (config.json of model_type "
                        "clip_vision_model or clip, and model.safetensors), e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
                        "or the models/image_encoder folder of h94/IP-Adapter")


def _json(path: str):
    """A JSON file's content; None when it is unreadable or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _has_weights(folder: str) -> bool:
    return any(name.endswith(WEIGHTS_SUFFIXES) for name in os.listdir(folder))


def base_model_problems(path: str) -> list[str]:
    """--base_model: a diffusers folder must hold every part the loader reads (a single-file checkpoint is checked
    by diffusers when it loads)."""
    if not os.path.isdir(path):
        return []
    option = f"--base_model {path!r}"
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isfile(os.path.join(parent, "model_index.json")):
            return [f"{option} is the {os.path.basename(os.path.abspath(path))}/ part of the Stable Diffusion folder "
                    f"{parent!r}: pass that folder as --base_model"]
        return [f"{option} is a folder without model_index.json, not a diffusers Stable Diffusion folder: "
                f"{SD_LAYOUT}. Pass such a folder, or a single-file .safetensors checkpoint"]
    index = _json(os.path.join(path, "model_index.json"))
    if not isinstance(index, dict):
        return [f"{option}: its model_index.json is not a JSON object: the folder is damaged; download it again"]
    parts = dict(SD_PARTS)
    listed = index.get("text_encoder_2")
    if os.path.isdir(os.path.join(path, "text_encoder_2")) or (isinstance(listed, list) and any(listed)):
        parts.update(SDXL_PARTS)
    missing = []
    for part, described_by in parts.items():
        folder = os.path.join(path, part)
        if not os.path.isdir(folder):
            missing.append(f"no {part}/")
        elif not os.path.isfile(os.path.join(folder, described_by)):
            missing.append(f"no {part}/{described_by}")
        elif part.startswith("tokenizer"):
            missing.extend(_tokenizer_problems(folder, part))
        elif described_by == "config.json" and not _has_weights(folder):
            missing.append(f"no weights in {part}/ (e.g. {'model' if 'text' in part else 'diffusion_pytorch_model'}"
                           ".safetensors)")
    if missing:
        return [f"{option} is not a complete diffusers folder ({'; '.join(missing)}): {SD_LAYOUT}. Download the "
                "missing files again (or pass a single-file .safetensors checkpoint)"]
    return []


def _tokenizer_problems(folder: str, part: str) -> list[str]:
    settings = _json(os.path.join(folder, "tokenizer_config.json"))
    problems = []
    if not isinstance(settings, dict):
        problems.append(f"{part}/tokenizer_config.json is not a JSON object")
    elif not (isinstance(settings.get("model_max_length"), int) and 0 < settings["model_max_length"] <= 4096):
        # without it transformers pads prompts to a sentinel length of 1e30 tokens
        problems.append(f"{part}/tokenizer_config.json sets no usable model_max_length (77 for Stable Diffusion's "
                        f"CLIP tokenizers), got {settings.get('model_max_length')!r}")
    names = set(os.listdir(folder))
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        problems.append(f"no vocabulary in {part}/ (vocab.json + merges.txt, or tokenizer.json)")
    return problems


def clip_vision_problems(path: str) -> list[str]:
    """--clip_vision: a transformers CLIPVisionModelWithProjection (or CLIPModel) folder."""
    option = f"--clip_vision {path!r}"
    if not os.path.isdir(path):
        return [f"{option} is a file: {CLIP_VISION_EXPECTED}. Single-file checkpoints (such as ComfyUI's "
                "models/clip_vision/*.safetensors) are not read by the trainer: pass the folder the file came from"]
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return [f"{option} is a Stable Diffusion folder (model_index.json), not a CLIP vision model: "
                f"{CLIP_VISION_EXPECTED}"]
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return [f"{option} has no config.json: {CLIP_VISION_EXPECTED}"]
    config = _json(config_path)
    if not isinstance(config, dict):
        return [f"{option}: its config.json is not a JSON object: {CLIP_VISION_EXPECTED}"]
    if config.get("model_type") not in CLIP_VISION_TYPES:
        kind = config.get("model_type") or config.get("_class_name") or "model of unknown type"
        return [f"{option} holds a {kind} (its config.json), not a CLIP vision model: {CLIP_VISION_EXPECTED}"]
    if not any(os.path.isfile(os.path.join(path, name)) for name in CLIP_VISION_WEIGHTS):
        return [f"{option} has no weights ({' or '.join(CLIP_VISION_WEIGHTS[::2])}): {CLIP_VISION_EXPECTED}"]
    return []


# the path options whose folder layout is checked up front, and their checks
LAYOUT_CHECKS = {"base_model": base_model_problems, "clip_vision": clip_vision_problems}
