"""Reading the official AdaFace checkpoints (adaface-neurips/adaface-models) without running their pickles.

The files are full pickles of the AdaFace generator objects (reference/official-checkpoints.md §1.3):
`{"string_to_subj_basis_generator_dict": ModuleDict({"z": generator}), "placeholder_strings", "subject_strings",
...}` where the generator is either the Arc2Face-driven `SubjBasisGenerator` or, in the joint checkpoints,
`ModuleList([consistentID generator, arc2face generator])`. `safe_pickle` turns them into records; this module
takes the arc2face generator's tensors and settings out of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelFileError
from .safe_pickle import Record, load_restricted

GENERATORS_KEY = "string_to_subj_basis_generator_dict"
SUBJECT_PLACEHOLDER = "z"
# In the joint checkpoints the order is fixed by the official Joint_FaceID2AdaPrompt: name2idx.
JOINT_BRANCHES = {"consistentID": 0, "arc2face": 1}
ARC2FACE_NUM_ID_VECS = 16
CLIP_LAYERS_PREFIX = "prompt2token_proj.text_model.encoder.layers."
MAX_MODULE_DEPTH = 32  # the official generators nest 8 levels; deeper is a malformed or hostile file


@dataclass
class OfficialInverter:
    """The arc2face prompt inverter of an official AdaFace file, in transformers' (4.x) parameter names."""

    state_dict: dict[str, torch.Tensor]
    multipliers: list[int]  # per CLIP layer: how many key/value copies each token contributes
    num_id_vecs: int
    hidden_state_layer_weights: torch.Tensor  # [L, 1]: weights of the last L hidden states
    pad_embeddings: torch.Tensor | None  # [77, width] (positional embeddings included) when the file has it


def read_official_adaface(path: str, branch: str = "arc2face") -> OfficialInverter:
    """The prompt inverter of an official AdaFace `.pt` file, read without executing anything in it."""
    if branch not in JOINT_BRANCHES:
        raise ModelFileError(f"unknown AdaFace branch {branch!r}; expected one of {sorted(JOINT_BRANCHES)}")
    if branch == "consistentID":
        raise ModelFileError("the ConsistentID branch of a joint AdaFace checkpoint needs ConsistentID's own image "
                             "and face-parsing encoders, which this pack does not provide; use branch 'arc2face'")
    checkpoint = load_restricted(path)
    generator = _arc2face_generator(path, checkpoint)
    state_dict: dict[str, torch.Tensor] = {}
    _collect_tensors(path, generator, "", state_dict, depth=0)
    attributes = generator.attributes
    hidden_state_layer_weights = state_dict.get("hidden_state_layer_weights")
    if hidden_state_layer_weights is None or hidden_state_layer_weights.dim() != 2:
        raise _layout_error(path, "a hidden_state_layer_weights parameter of shape [L, 1]")
    pad_embeddings = attributes.get("pad_embeddings")
    return OfficialInverter(
        state_dict=state_dict,
        multipliers=_multipliers(path, attributes, state_dict),
        num_id_vecs=_num_id_vecs(attributes),
        hidden_state_layer_weights=hidden_state_layer_weights,
        pad_embeddings=pad_embeddings if isinstance(pad_embeddings, torch.Tensor) else None,
    )


def _layout_error(path: str, expected: str) -> ModelFileError:
    return ModelFileError(f"{path} is not an official AdaFace checkpoint: expected {expected}. Use a file from "
                          "adaface-neurips/adaface-models (models/adaface/*.pt) or one exported by this pack.")


def _module_children(record: Record) -> dict:
    modules = record.attributes.get("_modules")
    return modules if isinstance(modules, dict) else {}


def _arc2face_generator(path: str, checkpoint) -> Record:
    generators = checkpoint.get(GENERATORS_KEY) if isinstance(checkpoint, dict) else None
    if not (isinstance(generators, Record) and generators.class_name == "ModuleDict"):
        raise _layout_error(path, f"a dict whose {GENERATORS_KEY!r} is a ModuleDict")
    generator = _module_children(generators).get(SUBJECT_PLACEHOLDER)
    if isinstance(generator, Record) and generator.class_name == "ModuleList":
        branches = _module_children(generator)
        if len(branches) != len(JOINT_BRANCHES):
            raise _layout_error(path, f"a joint generator list of {len(JOINT_BRANCHES)} (consistentID, arc2face), "
                                      f"not {len(branches)}")
        generator = branches.get(str(JOINT_BRANCHES["arc2face"]))
        if isinstance(generator, Record) and _num_id_vecs(generator.attributes) != ARC2FACE_NUM_ID_VECS:
            raise _layout_error(path, f"the second joint generator (arc2face) to have N_ID {ARC2FACE_NUM_ID_VECS}")
    if not (isinstance(generator, Record) and generator.class_name in ("SubjBasisGenerator", "ImgPrompt2TextPrompt")):
        raise _layout_error(path, f"the {SUBJECT_PLACEHOLDER!r} generator to be a SubjBasisGenerator or a ModuleList "
                                  "of two")
    return generator


def _collect_tensors(path: str, module: Record, prefix: str, out: dict, depth: int) -> None:
    """`module.state_dict()` as torch would make it: parameters, persistent buffers, then child modules in order."""
    if depth > MAX_MODULE_DEPTH:
        raise _layout_error(path, f"modules nested at most {MAX_MODULE_DEPTH} levels")
    attributes = module.attributes
    non_persistent = attributes.get("_non_persistent_buffers_set") or ()
    for table in ("_parameters", "_buffers"):
        tensors = attributes.get(table) or {}
        if not isinstance(tensors, dict):
            raise _layout_error(path, f"{module.qualified_name}.{table} to be a dict")
        for name, tensor in tensors.items():
            if tensor is None or (table == "_buffers" and name in non_persistent):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise _layout_error(path, f"{prefix}{name} to be a tensor")
            out[prefix + name] = tensor.detach()
    for name, child in _module_children(module).items():
        if child is None:
            continue
        if not isinstance(child, Record):
            raise _layout_error(path, f"{prefix}{name} to be a module")
        _collect_tensors(path, child, f"{prefix}{name}.", out, depth + 1)


def _num_id_vecs(attributes: dict) -> int:
    num_id_vecs = attributes.get("N_ID", attributes.get("num_id_vecs", ARC2FACE_NUM_ID_VECS))
    return num_id_vecs if type(num_id_vecs) is int else ARC2FACE_NUM_ID_VECS


def _multipliers(path: str, attributes: dict, state_dict: dict) -> list[int]:
    """The per-layer key/value multipliers: stored by the official code, else read off the k_proj shapes."""
    layer_indices = sorted({int(key[len(CLIP_LAYERS_PREFIX):].split(".")[0])
                            for key in state_dict if key.startswith(CLIP_LAYERS_PREFIX)})
    if not layer_indices or layer_indices != list(range(len(layer_indices))):
        raise _layout_error(path, f"CLIP text layers under {CLIP_LAYERS_PREFIX}0, 1, ...")
    inferred = []
    for index in layer_indices:
        layer = f"{CLIP_LAYERS_PREFIX}{index}.self_attn."
        q_weight, k_weight = state_dict.get(layer + "q_proj.weight"), state_dict.get(layer + "k_proj.weight")
        if q_weight is None or k_weight is None or q_weight.dim() != 2 or k_weight.dim() != 2:
            raise _layout_error(path, f"{layer}q_proj.weight and k_proj.weight matrices")
        width = q_weight.shape[0]
        if width == 0 or k_weight.shape[0] % width or k_weight.shape[1] != q_weight.shape[1]:
            raise _layout_error(path, f"{layer}k_proj.weight of shape [{width} x m, {q_weight.shape[1]}]")
        inferred.append(k_weight.shape[0] // width)
    stored = attributes.get("prompt2token_proj_attention_multipliers")
    if isinstance(stored, (list, tuple)) and list(stored) != inferred:
        raise _layout_error(path, f"prompt2token_proj_attention_multipliers {inferred} (as the k_proj shapes say), "
                                  f"not {list(stored)[:len(inferred) + 1]}")
    return inferred
