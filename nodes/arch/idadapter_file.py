"""The ``idadapter/1`` file format, read without trusting it: the :class:`IDAdapterConfig` a file records, every
field checked (:func:`config_from_metadata`), and which cross-attention K/V delta tensors it must hold
(:func:`kv_delta_shapes`). ``arch/idadapter.py`` builds the modules from these and reads and writes the files.

File format ``idadapter/1``: safetensors; ``__metadata__`` holds ``format``, ``family``, ``config`` (JSON of
:class:`IDAdapterConfig`) and ``recognizer``, the fingerprint of the ArcFace file that made the training set's
identity vectors (absent in files exported before it was recorded: unknown). Tensors: ``mff.*``, ``textual.*``,
``adapters.<block>.*`` and ``kv_delta.<block>.to_k`` / ``.to_v`` ([out, context_dim], trained minus base weight),
where ``<block>`` is ComfyUI's block key written ``input_4_0`` (block, id, index inside the SpatialTransformer).
K/V deltas are all or nothing: a file holds both ``to_k`` and ``to_v`` of every configured block (what the trainer
exports), or no ``kv_delta.*`` tensor at all (an adapter trained without K/V fine-tuning). A block with only one of
the two, or deltas for some blocks but not others, is a malformed file.

:func:`.idadapter.load_idadapter` trusts nothing in a file: every config field is checked (type, sign, generous
upper bounds, heads dividing widths), the module is built on the ``meta`` device and its shapes compared with the
safetensors header before any memory is allocated, and NaN or infinite weights are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from ..errors import ModelFileError
from .files import first_few, metadata_json
from .unet_blocks import FAMILIES, BlockSpec, FamilyBlocksConfig

FORMAT = "idadapter/1"
WRITER = "training/train_idadapter.py (IP-Adapter, AdaFace and W+ files go into their own loaders)"
REEXPORT = "The file is damaged or was edited: export it again with training/train_idadapter.py"
KV_PREFIX = "kv_delta."
KV_PROJECTIONS = ("to_k", "to_v")
# Upper bounds of the config's integers: far above any real model (SDXL's widest block has 1280 channels and 20
# heads), low enough that a hostile config cannot make building the module loop or allocate without end.
CONFIG_LIMITS = {"clip_vision_dim": 8192, "arcface_dim": 8192, "width": 8192, "mff_heads": 256, "mff_depth": 64,
                  "num_tokens": 1024, "embed_dim": 8192, "textual_hidden": 16384, "num_images": 256}
_BLOCK_LIMITS = {"channels": 8192, "heads": 256, "context_dim": 8192}
_MAX_BLOCKS = 1024  # SDXL has 70 transformer blocks
FACE_CROP_MARGIN_LIMIT = 4.0  # a square 9 face boxes wide: the whole photo, for any face worth a reference
_BLOCK_NAME = re.compile(r"(input|middle|output)_\d+_\d+")


@dataclass
class IDAdapterConfig(FamilyBlocksConfig):
    family: str
    blocks: dict[str, BlockSpec]  # block name -> dims of that UNet transformer block
    clip_vision_dim: int = 1280  # width of the CLIP vision encoder (ViT-H/14: 1280, ViT-L/14: 1024)
    arcface_dim: int = 512
    width: int = 768  # MFF transformer width
    mff_heads: int = 12
    mff_depth: int = 2  # the paper's "two attention blocks"
    num_tokens: int = 16  # M, the number of E_r tokens
    embed_dim: int = 768  # E_r width (projected per UNet block)
    textual_hidden: int = 1024
    num_images: int = 4  # N, reference images per identity
    text_dims: dict[str, int] = field(default_factory=dict)
    # what CLIP vision sees of a reference (reference_crop): a square around the face, the box's longer side plus
    # this fraction of it on each side; None: the whole photo (files written before face crops)
    face_crop_margin: float | None = None

    def __post_init__(self):
        self.check_family_and_blocks()
        if not self.text_dims:
            self.text_dims = dict(FAMILIES[self.family]["text_dims"])


def config_from_metadata(meta: dict[str, str], path: str) -> IDAdapterConfig:
    """The :class:`IDAdapterConfig` in an ``idadapter/1`` file's metadata, every field checked."""

    def refuse(name: str, expected: str, got) -> ModelFileError:
        return ModelFileError(f"{path}: IDAdapter config field {name!r} must be {expected}, got {got!r}. {REEXPORT}")

    def bounded_int(name: str, value, limit: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise refuse(name, f"an integer from 1 to {limit}", value)
        return value

    def divides(heads_name: str, heads: int, width_name: str, width: int) -> None:
        if width % heads:
            raise refuse(heads_name, f"a divisor of {width_name} ({width})", heads)

    raw = metadata_json(meta, path, "config", "the JSON IDAdapter config", REEXPORT)
    if not isinstance(raw, dict):
        raise refuse("config", "a JSON object", type(raw).__name__)
    unknown = sorted(set(raw) - {f.name for f in fields(IDAdapterConfig)})
    if unknown:
        raise ModelFileError(f"{path}: unknown IDAdapter config fields {first_few(unknown)}; this loader knows "
                             f"{sorted(f.name for f in fields(IDAdapterConfig))}. {REEXPORT}")
    family = raw.get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        raise refuse("family", f"one of {sorted(FAMILIES)}", family)
    values = {name: bounded_int(name, raw[name], limit) for name, limit in CONFIG_LIMITS.items() if name in raw}
    divides("mff_heads", values.get("mff_heads", IDAdapterConfig.mff_heads),
            "width", values.get("width", IDAdapterConfig.width))
    margin = raw.get("face_crop_margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not 0 <= margin <= FACE_CROP_MARGIN_LIMIT):
        raise refuse("face_crop_margin", f"null or a number from 0 to {FACE_CROP_MARGIN_LIMIT}", margin)
    text_dims = raw.get("text_dims", FAMILIES[family]["text_dims"])
    if text_dims != FAMILIES[family]["text_dims"]:
        raise refuse("text_dims", f"{family}'s text encoder widths {FAMILIES[family]['text_dims']}", text_dims)
    blocks = raw.get("blocks")
    if not isinstance(blocks, dict) or len(blocks) > _MAX_BLOCKS:
        raise refuse("blocks", f"a mapping of at most {_MAX_BLOCKS} block names to block dims",
                     blocks if not isinstance(blocks, dict) else f"{len(blocks)} blocks")
    specs = {}
    for name, spec in blocks.items():
        if not _BLOCK_NAME.fullmatch(name):
            raise refuse(f"blocks.{name}", "named like 'input_4_0' (input/middle/output, block id, index)", name)
        if not isinstance(spec, dict) or set(spec) != set(_BLOCK_LIMITS):
            raise refuse(f"blocks.{name}", f"a mapping with exactly {sorted(_BLOCK_LIMITS)}", spec)
        dims = {k: bounded_int(f"blocks.{name}.{k}", spec[k], limit) for k, limit in _BLOCK_LIMITS.items()}
        divides(f"blocks.{name}.heads", dims["heads"], f"blocks.{name}.channels", dims["channels"])
        if dims["context_dim"] != FAMILIES[family]["context_dim"]:
            raise refuse(f"blocks.{name}.context_dim", f"{family}'s cross-attention width "
                         f"{FAMILIES[family]['context_dim']}", dims["context_dim"])
        specs[name] = BlockSpec(**dims)
    return IDAdapterConfig(family=family, blocks=specs, text_dims=dict(text_dims),
                           face_crop_margin=None if margin is None else float(margin), **values)


def kv_delta_shapes(cfg: IDAdapterConfig, names, path: str) -> dict[str, tuple[int, int]]:
    """The K/V delta tensors a file must hold, given the tensor ``names`` it has: none, or both projections of
    every configured block (see the module docstring)."""
    present: dict[str, set[str]] = {}
    for key in names:
        if not key.startswith(KV_PREFIX):
            continue
        parts = key.split(".")
        if len(parts) != 3 or parts[1] not in cfg.blocks or parts[2] not in KV_PROJECTIONS:
            raise ModelFileError(
                f"{path}: malformed K/V delta tensor {key!r}; expected '{KV_PREFIX}<block>.to_k' or '.to_v' with "
                f"<block> one of the config's blocks {first_few(sorted(cfg.blocks))}. {REEXPORT}"
            )
        present.setdefault(parts[1], set()).add(parts[2])
    if not present:
        return {}
    halves = sorted(name for name, projections in present.items() if len(projections) < len(KV_PROJECTIONS))
    if halves:
        raise ModelFileError(f"{path}: the K/V deltas of blocks {first_few(halves)} hold only one of to_k/to_v; "
                             f"every block needs both. {REEXPORT}")
    missing = sorted(set(cfg.blocks) - set(present))
    if missing:
        raise ModelFileError(f"{path}: K/V deltas are missing for blocks {first_few(missing)}; a file holds them for "
                             f"every configured block or for none. {REEXPORT}")
    return {f"{KV_PREFIX}{name}.{projection}": (spec.channels, spec.context_dim)
            for name, spec in cfg.blocks.items() for projection in KV_PROJECTIONS}
