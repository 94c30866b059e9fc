"""Reading the official AdaFace checkpoints (adaface-neurips/adaface-models) without running their pickles.

The files are full pickles of the AdaFace generator objects (reference/official-checkpoints.md §1.3):
`{"string_to_subj_basis_generator_dict": ModuleDict({"z": generator}), "placeholder_strings", "subject_strings",
...}` where the generator is either the Arc2Face-driven `SubjBasisGenerator` or, in the joint checkpoints,
`ModuleList([consistentID generator, arc2face generator])`. `safe_pickle` turns them into records; this module
takes the arc2face generator's tensors and settings out of them (`read_official_adaface`), turns them into this
pack's inverter (`to_adaface_weights`) and writes that as an `adaface/1` file (`convert_official_adaface`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError, ModelFileError
from . import adaface
from .arc2face import load_arc2face_encoder
from .files import check_shapes
from .safe_pickle import Record, load_restricted

GENERATORS_KEY = "string_to_subj_basis_generator_dict"
SUBJECT_PLACEHOLDER = "z"
# In the joint checkpoints the order is fixed by the official Joint_FaceID2AdaPrompt: name2idx.
JOINT_BRANCHES = {"consistentID": 0, "arc2face": 1}
ARC2FACE_NUM_ID_VECS = 16
INVERTER_PREFIX = "prompt2token_proj."
CLIP_LAYERS_PREFIX = INVERTER_PREFIX + "text_model.encoder.layers."
# a buffer holding 0..n-1, persistent in older transformers: not a weight
POSITION_IDS = INVERTER_PREFIX + "text_model.embeddings.position_ids"
CLIP_HEAD_WIDTH = 64  # CLIP ViT-L/14's: 12 heads of 64 over 768 (what the inverter is initialised from)
MAX_MODULE_DEPTH = 32  # the official generators nest 8 levels; deeper is a malformed or hostile file
CONVERTED_DTYPES = (torch.float16, torch.float32)


@dataclass
class OfficialInverter:
    """The arc2face prompt inverter of an official AdaFace file, in transformers' (4.x) parameter names."""

    path: str  # the file it was read from (named in messages)
    state_dict: dict[str, torch.Tensor]
    multipliers: list[int]  # per CLIP layer: how many key/value copies each token contributes
    num_heads: int  # attention heads of the CLIP text model
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
    if hidden_state_layer_weights is None or hidden_state_layer_weights.dim() != 2 or \
            hidden_state_layer_weights.shape[1] != 1:
        raise _layout_error(path, "a hidden_state_layer_weights parameter of shape [L, 1]")
    pad_embeddings = attributes.get("pad_embeddings")
    multipliers = _multipliers(path, attributes, state_dict)  # checks the layers' q_proj matrices
    width = state_dict[CLIP_LAYERS_PREFIX + "0.self_attn.q_proj.weight"].shape[0]
    return OfficialInverter(
        path=path,
        state_dict=state_dict,
        multipliers=multipliers,
        num_heads=_num_heads(path, generator, width),
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


def _num_heads(path: str, generator: Record, width: int) -> int:
    """The CLIP text model's head count: the pickled transformers config's `num_attention_heads`, else (no config, or
    a count that does not divide the width) heads as wide as CLIP ViT-L/14's, from which every inverter starts."""
    wrapper = _module_children(generator).get(INVERTER_PREFIX.rstrip("."))
    config = wrapper.attributes.get("config") if isinstance(wrapper, Record) else None
    heads = config.attributes.get("num_attention_heads") if isinstance(config, Record) else None
    if type(heads) is int and heads > 0 and width % heads == 0:
        return heads
    if width % CLIP_HEAD_WIDTH:
        raise _layout_error(path, f"prompt2token_proj.config.num_attention_heads dividing the width {width}, or a "
                                  f"width that is a multiple of CLIP's head width {CLIP_HEAD_WIDTH}")
    return width // CLIP_HEAD_WIDTH


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


def to_adaface_weights(official: OfficialInverter,
                       arc2face: adaface.CLIPTextTransformer | None = None) -> adaface.AdaFaceWeights:
    """The official inverter as this pack's module (float32), with the Arc2Face ID encoder bundled when given.

    Kept are the tensors the official inference reads: the CLIP text model under `prompt2token_proj.` (each of its
    weights, nothing more, in the shapes its embeddings and layers give) and `hidden_state_layer_weights`, plus
    `pad_embeddings` when they cover every position. The official loader builds a fresh face generator and copies a
    file's tensors into it with `strict=False`, so the rest plays no part at inference and is dropped: the non-face
    `obj_proj_in`, the gradient scaler, `layerwise_proj` (an Identity in that generator), the static image-suffix
    embeddings (appended only when `enable_static_img_suffix_embs` is set, off by default) and background parts.
    """
    path = official.path
    fix = ("The checkpoint is damaged or not an AdaFace release: use a file from adaface-neurips/adaface-models "
           "(models/adaface/*.pt)")
    state = {name: tensor for name, tensor in official.state_dict.items()
             if name.startswith(INVERTER_PREFIX) and name != POSITION_IDS}
    config = adaface.checked_config(asdict(adaface.AdaFaceConfig(
        inverter=_inverter_config(official, state),
        arc2face=None if arc2face is None else arc2face.config,
        num_id_vecs=official.num_id_vecs,
        hidden_state_layers=official.hidden_state_layer_weights.shape[0],
    )), path, fix)
    with torch.device("meta"):  # shapes only: the weights are copied in once every shape fits
        inverter = adaface.CLIPTextTransformer(config.inverter)
    check_shapes(path, {name: tuple(tensor.shape) for name, tensor in state.items()},
                 {INVERTER_PREFIX + name: tuple(t.shape) for name, t in inverter.state_dict().items()},
                 "the CLIP text model its embeddings and layers describe", fix)
    pad = official.pad_embeddings
    if pad is not None and tuple(pad.shape) != (config.inverter.max_positions, config.inverter.hidden_size):
        pad = None  # not the padding prompt's embeddings this inverter mixes towards
    extras = {"hidden_state_layer_weights": official.hidden_state_layer_weights, "pad_embeddings": pad}
    for name, tensor in [*state.items(), *extras.items()]:
        if tensor is not None and not torch.isfinite(tensor).all():
            raise ModelFileError(f"{path}: {name} holds NaN or infinite values, expected finite numbers. {fix}")

    def float32(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().to(torch.float32, copy=True)

    return adaface.AdaFaceWeights(
        config=config,
        inverter=adaface.materialized(inverter, {n[len(INVERTER_PREFIX):]: t for n, t in state.items()}),
        hidden_state_layer_weights=adaface.checked_layer_weights(float32(official.hidden_state_layer_weights),
                                                                 path, fix),
        pad_embeddings=float32(pad),
        arc2face=arc2face,
    )


def _inverter_config(official: OfficialInverter, state: dict[str, torch.Tensor]) -> adaface.TextModelConfig:
    """The inverter's sizes, read off its token and position embeddings and first MLP (the heads and multipliers
    were read with it)."""
    def matrix_shape(name: str) -> torch.Size:
        tensor = state.get(INVERTER_PREFIX + name)
        if tensor is None or tensor.dim() != 2:
            raise _layout_error(official.path, f"a matrix {INVERTER_PREFIX}{name}")
        return tensor.shape

    vocab_size, hidden_size = matrix_shape("text_model.embeddings.token_embedding.weight")
    max_positions = matrix_shape("text_model.embeddings.position_embedding.weight")[0]
    intermediate_size = matrix_shape("text_model.encoder.layers.0.mlp.fc1.weight")[0]
    return adaface.TextModelConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=len(official.multipliers), num_heads=official.num_heads, max_positions=max_positions,
        kv_multipliers=list(official.multipliers))


def convert_official_adaface(pt_path: str, out_path: str, arc2face_path: str | None = None,
                             dtype: torch.dtype = torch.float16, overwrite: bool = False) -> adaface.AdaFaceWeights:
    """Writes the arc2face inverter of an official AdaFace checkpoint as an `adaface/1` file, bundling the Arc2Face
    ID encoder (its `encoder` folder, see `load_arc2face_encoder`) when `arc2face_path` is given; returns what it
    wrote. float16 by default: the official inverter is stored and run in float16, and so is Arc2Face.
    """
    if dtype not in CONVERTED_DTYPES:
        raise ConfigError(f"dtype {dtype} is not one of {[str(d) for d in CONVERTED_DTYPES]}: use float16 (half the "
                          "size) or float32")
    if os.path.exists(out_path) and not overwrite:
        raise ConfigError(f"{out_path} already exists; choose another output file, or allow overwriting it "
                          "(--overwrite)")
    arc2face = None if arc2face_path is None else load_arc2face_encoder(arc2face_path)
    weights = to_adaface_weights(read_official_adaface(pt_path), arc2face)
    adaface.save_adaface(weights, out_path, dtype)
    return weights
