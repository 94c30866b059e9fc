"""FACE_EMBEDS: ArcFace identity vectors with the face geometry they came from, and their file format.

Files are safetensors (never pickle) with ``__metadata__["format"] = "face_embeds/1"`` and ``"recognizer"``, the
fingerprint of the ArcFace file that made the vectors (absent in files written before it was recorded: unknown).
The loader checks the tensor names and shapes in the header before reading any data, and refuses NaN or infinite
values and all-zero ArcFace vectors (no identity at all).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..errors import ConfigError, ModelFileError, NoFaceError
from .files import check_fingerprint, check_shapes, first_few, open_safetensors, same_weights, write_safetensors

FORMAT = "face_embeds/1"
COMBINE_MODES = ("mean", "norm-mean", "concat")
_RESAVE = "Save the faces again with Save Face Embeds"


FACE_SELECTIONS = ("largest", "index", "in mask", "all")
MIN_MASK_SHARE = 0.5  # "in mask": at least half of the face's box must be under the mask


def select_faces(boxes: torch.Tensor, selection: str, index: int = 0, mask: torch.Tensor | None = None) -> list[int]:
    """Which of one image's faces (boxes [F, 4], x1 y1 x2 y2 in pixels) a rule picks, the one rule of every node
    that takes faces from a photo with several people:

    - ``largest``: the face with the largest box;
    - ``index``: the ``index``-th face from the left (none if there are fewer);
    - ``in mask``: the face with the largest share of its box under ``mask`` ([H, W] in 0..1 at the image's size),
      if that share is at least half (none otherwise);
    - ``all``: every face, left to right.
    """
    if selection not in FACE_SELECTIONS:
        raise ConfigError(f"face selection must be one of {FACE_SELECTIONS}, got {selection!r}")
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    left_to_right = sorted(range(len(boxes)), key=lambda i: float(boxes[i, 0]))
    if len(boxes) == 0 or selection == "all":
        return left_to_right
    if selection == "largest":
        return [int(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argmax())]
    if selection == "index":
        return [left_to_right[index]] if 0 <= index < len(boxes) else []
    if mask is None:
        raise ConfigError("face selection 'in mask' needs a mask: connect face_mask (white where the person is)")
    shares = [_share_under(mask, box) for box in boxes]
    best = max(range(len(boxes)), key=lambda i: shares[i])
    return [best] if shares[best] >= MIN_MASK_SHARE else []


def largest_face_of_each_image(faces: "FaceEmbeds", count: int, needs: str) -> list[int]:
    """For images 0..count-1, the index (into ``faces``) of the image's largest face (:func:`select_faces`'s
    "largest"; Face Embed may already have picked one face per image by another rule). ``needs`` completes the
    errors: what the calling node does with each face."""
    if not faces.has_geometry:
        raise NoFaceError(f"face_embeds has no face boxes (averaged vectors describe no single photo), and {needs}: "
                          "connect Face Embed's output for these images")
    chosen = []
    for image in range(count):
        mine = (faces.image_index == image).nonzero().flatten()
        if len(mine) == 0:
            raise NoFaceError(f"image {image} has no face in face_embeds, and {needs} (use photos with a detectable "
                              "face, or Face Embed with on_no_face 'error' to see which)")
        chosen.append(int(mine[select_faces(faces.boxes[mine], "largest")[0]]))
    return chosen


def _share_under(mask: torch.Tensor, box: torch.Tensor) -> float:
    """The mean of ``mask`` over the box (clipped to the image); 0 for a box outside it."""
    height, width = mask.shape[-2:]
    x1, y1 = max(int(box[0]), 0), max(int(box[1]), 0)
    x2, y2 = min(int(torch.ceil(box[2])), width), min(int(torch.ceil(box[3])), height)
    if x2 <= x1 or y2 <= y1:
        return 0.0
    return float(mask[y1:y2, x1:x2].float().mean())


@dataclass(frozen=True)
class FaceEmbeds:
    """F faces. ``embeds`` [F, D] float32 (unit norm when they come from Face Embed).

    Geometry is per face and in the source image's pixels: ``boxes`` [F, 4] (x1, y1, x2, y2), ``landmarks``
    [F, 5, 2], ``scores`` [F] detector confidence, ``image_index`` [F] which batch image the face is from.
    Averaged embeddings describe no single face, so their geometry is None. ``recognizer`` is the fingerprint
    (``files.file_fingerprint``) of the ArcFace file that made the vectors, "" when unknown: vectors of two
    recognizers lie in different spaces and must not be mixed.
    """

    embeds: torch.Tensor
    boxes: torch.Tensor | None = None
    landmarks: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    image_index: torch.Tensor | None = None
    recognizer: str = ""

    def __post_init__(self):
        validate(self, "FACE_EMBEDS")

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def has_geometry(self) -> bool:
        return self.boxes is not None

    @property
    def dim(self) -> int:
        return int(self.embeds.shape[1])


_GEOMETRY = {"boxes": (4,), "landmarks": (5, 2), "scores": (), "image_index": ()}


def validate(fe: FaceEmbeds, source: str) -> None:
    e = fe.embeds
    if not isinstance(e, torch.Tensor) or e.ndim != 2 or e.shape[1] == 0:
        shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
        raise ModelFileError(f"{source}: embeds must be a [faces, dim] tensor, got {shape}")
    if not torch.isfinite(e).all():
        raise ModelFileError(f"{source}: embeds contain NaN or infinite values")
    check_fingerprint(fe.recognizer, source, "Make the FACE_EMBEDS with Face Embed or Load Face Embeds")
    present = [name for name in _GEOMETRY if getattr(fe, name) is not None]
    if present and len(present) != len(_GEOMETRY):
        raise ModelFileError(f"{source}: face geometry is partial ({present}); expected all of {list(_GEOMETRY)}")
    for name in present:
        value = getattr(fe, name)
        expected = (e.shape[0], *_GEOMETRY[name])
        if tuple(value.shape) != expected:
            raise ModelFileError(f"{source}: {name} has shape {tuple(value.shape)}, expected {expected}")


def combine(items: list[FaceEmbeds], mode: str) -> FaceEmbeds:
    """mean: the average vector; norm-mean: the average rescaled to unit length; concat: all faces kept.

    Faces of two different recognizers are refused. The result's recognizer is the one every input shares; when
    some input's is unknown, so is the result's (its vectors may come from any recognizer)."""
    if mode not in COMBINE_MODES:
        raise ConfigError(f"combine mode must be one of {COMBINE_MODES}, got {mode!r}")
    items = [fe for fe in items if fe is not None and len(fe) > 0]
    if not items:
        raise NoFaceError("nothing to combine: every FACE_EMBEDS input is empty (no face was found)")
    dims = sorted({fe.dim for fe in items})
    if len(dims) > 1:
        raise ModelFileError(f"cannot combine FACE_EMBEDS of different sizes {dims}: use one recognition model")
    known = [fe.recognizer for fe in items if fe.recognizer]
    other = next((r for r in known if not same_weights(r, known[0])), None)
    if other is not None:
        raise ModelFileError(f"cannot combine FACE_EMBEDS made by two ArcFace recognizers, {known[0]} and {other}: "
                             "their vectors lie in different spaces. Embed every photo with the same Load "
                             "InsightFace pack")
    recognizer = known[0] if len(known) == len(items) else ""
    embeds = torch.cat([fe.embeds for fe in items])
    if mode == "concat":
        if all(fe.has_geometry for fe in items):
            geometry = {name: torch.cat([getattr(fe, name) for fe in items]) for name in _GEOMETRY}
            return FaceEmbeds(embeds, **geometry, recognizer=recognizer)
        return FaceEmbeds(embeds, recognizer=recognizer)
    mean = embeds.mean(dim=0, keepdim=True)
    if mode == "norm-mean":
        mean = torch.nn.functional.normalize(mean, dim=-1)
    return FaceEmbeds(mean, recognizer=recognizer)


def save_face_embeds(fe: FaceEmbeds, path: str, *, replace: bool = True) -> None:
    """Writes ``fe`` as ``face_embeds/1`` safetensors; ``replace=False``: FileExistsError if ``path`` exists."""
    tensors = {"embeds": fe.embeds.float().contiguous().cpu()}
    if fe.has_geometry:
        for name in _GEOMETRY:
            value = getattr(fe, name)
            tensors[name] = (value.long() if name == "image_index" else value.float()).contiguous().cpu()
    meta = {"format": FORMAT, "faces": str(len(fe)), "dim": str(fe.dim), "geometry": json.dumps(fe.has_geometry),
            "recognizer": fe.recognizer}
    write_safetensors(tensors, path, meta, replace=replace)


def load_face_embeds(path: str) -> FaceEmbeds:
    with open_safetensors(path, FORMAT, "face embeds file", "Save Face Embeds") as f:
        embeds_shape = f.shapes.get("embeds")
        if embeds_shape is None:
            raise ModelFileError(f"{path} has no 'embeds' tensor (keys: {sorted(f.shapes)}). {_RESAVE}")
        if len(embeds_shape) != 2 or embeds_shape[1] == 0:
            raise ModelFileError(f"{path}: embeds must be a [faces, dim] tensor, got {embeds_shape}. {_RESAVE}")
        present = [name for name in _GEOMETRY if name in f.shapes]
        if present and len(present) != len(_GEOMETRY):
            raise ModelFileError(f"{path}: face geometry is partial ({present}); expected all of {list(_GEOMETRY)}. "
                                 f"{_RESAVE}")
        expected = {"embeds": embeds_shape}
        expected.update({name: (embeds_shape[0], *_GEOMETRY[name]) for name in present})
        check_shapes(path, f.shapes, expected, "the face embeds layout", _RESAVE)
        recognizer = check_fingerprint(f.metadata.get("recognizer", ""), path, _RESAVE)
        tensors = f.tensors()
    zero_rows = (tensors["embeds"] == 0).all(dim=1).nonzero().flatten().tolist()
    if zero_rows:
        raise ModelFileError(f"{path}: embeds rows {first_few(zero_rows)} are all zeros, expected ArcFace vectors "
                             f"of non-zero length. {_RESAVE}")
    try:
        return FaceEmbeds(**tensors, recognizer=recognizer)
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc
