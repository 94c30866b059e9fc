"""The Arc2Face ID encoder (reference/official-checkpoints.md §2): the ``encoder`` folder of FoivosPar/Arc2Face, a
transformers ``CLIPTextModel`` (config.json + pytorch_model.bin, or model.safetensors), read into this pack's
:class:`adaface.CLIPTextTransformer` without transformers and without running anything the files hold.

config.json is checked first (every size bounded, quick_gelu, the layer-norm epsilon the module uses), then the
weights' names and shapes are compared with a ``meta``-device module: from the safetensors header, or from a
tensors-only pickle opened memory-mapped, so nothing is read before the check. NaN or infinite weights are refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Callable, Iterator

import torch

from ..errors import ModelFileError
from . import adaface
from .files import check_regular_file, check_shapes, read_tensors_only

CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")  # what transformers writes (the release has the .bin)
MAX_CONFIG_BYTES = 1 << 20  # a CLIP text config is under 1 KiB
# config.json's names -> TextModelConfig's
CONFIG_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                 "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                 "max_position_embeddings": "max_positions"}
TEXT_MODEL_PREFIX = "text_model."  # transformers 4.x writes CLIPTextModel's keys under it, transformers 5 without
POSITION_IDS = "text_model.embeddings.position_ids"  # a buffer holding 0..n-1 (persistent in old transformers)
_FIX = ("Use Arc2Face's ID encoder as released: the folder 'encoder' of FoivosPar/Arc2Face on Hugging Face "
        "(config.json + pytorch_model.bin), unchanged")


def load_arc2face_encoder(path: str) -> adaface.CLIPTextTransformer:
    """The Arc2Face ID encoder in ``path``: its folder, or the weights file inside it (config.json next to it)."""
    config_path, weights_path = _encoder_files(path)
    with torch.device("meta"):  # shapes only: the values come from the file once its shapes fit
        module = adaface.CLIPTextTransformer(_encoder_config(config_path))
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    with _weights_file(weights_path) as (shapes, read):
        file_names = _module_names(weights_path, shapes)
        check_shapes(weights_path, {ours: shapes[theirs] for ours, theirs in file_names.items()}, expected,
                     f"the CLIP text model its {CONFIG_NAME} describes", _FIX)
        state = {ours: _checked_tensor(weights_path, theirs, read(theirs)) for ours, theirs in file_names.items()}
    return adaface.materialized(module, state)


def _encoder_files(path: str) -> tuple[str, str]:
    """(config.json, weights file) of an encoder folder or of a weights file inside one."""
    if os.path.isdir(path):
        folder = path
        # lexists: a weights file that is something else (a folder, a FIFO) is named as such when read
        weights = next((os.path.join(path, n) for n in WEIGHT_NAMES if os.path.lexists(os.path.join(path, n))), None)
        if weights is None:
            raise ModelFileError(f"{path} holds no {' or '.join(WEIGHT_NAMES)}: expected the Arc2Face ID encoder's "
                                 f"folder. {_FIX}")
    else:
        check_regular_file(path, "Arc2Face ID encoder", _FIX)
        folder, weights = os.path.dirname(path), path
    config = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config):
        raise ModelFileError(f"{folder or '.'} has no {CONFIG_NAME} (the encoder's sizes, next to its weights "
                             f"{' or '.join(WEIGHT_NAMES)}). {_FIX}")
    return config, weights


def _encoder_config(path: str) -> adaface.TextModelConfig:
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ModelFileError(f"{path} is over {MAX_CONFIG_BYTES} bytes, expected a CLIP text config. {_FIX}")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
        raise ModelFileError(f"{path} is not JSON ({type(exc).__name__}). {_FIX}") from exc
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path} holds a JSON {type(raw).__name__}, expected an object. {_FIX}")
    values = {ours: adaface.bounded_int(path, theirs, raw.get(theirs), 1, adaface.TEXT_MODEL_LIMITS[ours], _FIX)
              for theirs, ours in CONFIG_FIELDS.items()}
    problems = []
    if values["hidden_size"] % values["num_heads"]:
        problems.append(f"num_attention_heads {values['num_heads']} does not divide hidden_size "
                        f"{values['hidden_size']}")
    if values["max_positions"] < adaface.ARC2FACE_PROMPT_LENGTH:
        problems.append(f"max_position_embeddings is {values['max_positions']}, expected at least "
                        f"{adaface.ARC2FACE_PROMPT_LENGTH} (the ID prompt's length)")
    if raw.get("hidden_act") != "quick_gelu":
        problems.append(f"hidden_act is {raw.get('hidden_act')!r}, expected 'quick_gelu' (CLIP ViT-L/14's)")
    eps = raw.get("layer_norm_eps", adaface.LAYER_NORM_EPS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or \
            not math.isclose(eps, adaface.LAYER_NORM_EPS, rel_tol=1e-3):
        problems.append(f"layer_norm_eps is {eps!r}, expected {adaface.LAYER_NORM_EPS} (CLIP's)")
    if problems:
        raise ModelFileError(f"{path}: {'; '.join(problems)}. {_FIX}")
    return adaface.TextModelConfig(**values)


@contextlib.contextmanager
def _weights_file(path: str) -> Iterator[tuple[dict[str, tuple], Callable[[str], torch.Tensor]]]:
    """(name -> shape, read(name)) of a weights file, the shapes known before any tensor data is read."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        check_regular_file(path, "Arc2Face ID encoder weights", _FIX)
        try:
            handle_context = safe_open(path, framework="pt")
        except Exception as exc:
            raise ModelFileError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}). "
                                 f"{_FIX}") from exc
        with handle_context as handle:
            yield {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}, handle.get_tensor
        return
    state = read_tensors_only(path, "Arc2Face ID encoder weights", _FIX)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ModelFileError(f"{path} holds a {type(state).__name__}, expected a state dict (names -> tensors). "
                             f"{_FIX}")
    yield {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__


def _module_names(path: str, file_names) -> dict[str, str]:
    """The module's name (``text_model.…``) of each weight in the file, position ids left out."""
    names = {}
    for name in file_names:
        ours = name if name.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + name
        if ours == POSITION_IDS:
            continue
        if ours in names:
            raise ModelFileError(f"{path} holds {ours!r} twice, with and without the {TEXT_MODEL_PREFIX!r} prefix. "
                                 f"{_FIX}")
        names[ours] = name
    return names


def _checked_tensor(path: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise ModelFileError(f"{path}: {name!r} is {tensor.dtype}, expected floating-point weights. {_FIX}")
    if not torch.isfinite(tensor).all():
        raise ModelFileError(f"{path}: {name!r} holds NaN or infinite values, expected finite numbers; the file is "
                             f"damaged. {_FIX}")
    return tensor
