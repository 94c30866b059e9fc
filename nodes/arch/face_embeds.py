"""FACE_EMBEDS: ArcFace identity vectors with the face geometry they came from, and their file format.

Files are safetensors (never pickle) with ``__metadata__["format"] = "face_embeds/1"`` and ``"recognizer"``, the
fingerprint of the ArcFace file that made the vectors (absent in files written before it was recorded: unknown),
and ``"image_sizes"``, the JSON list of ``[height, width]`` of the images the faces were found in (absent in files
written before they were recorded, and for averaged vectors: unknown). The loader checks the tensor names and shapes
in the header before reading any data, and refuses NaN or infinite values and all-zero ArcFace vectors (no identity
at all).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..errors import ConfigError, ImageInputError, ModelFileError, NoFaceError
from .files import (check_fingerprint, check_shapes, first_few, metadata_json, open_safetensors, same_weights,
                    write_safetensors)

FORMAT = "face_embeds/1"
COMBINE_MODES = ("mean", "norm-mean", "concat")
_RESAVE = "Save the faces again with Save Face Embeds"
_REMAKE = "Make the FACE_EMBEDS with Face Embed or Load Face Embeds"


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
    recognizers lie in different spaces and must not be mixed. ``image_sizes`` is the (height, width) of each image
    of the batch the faces were found in, images without a face included; None when unknown (no geometry, or a file
    from before sizes were recorded). Nodes that use the geometry on an IMAGE check it against the IMAGE
    (:func:`check_made_from`).
    """

    embeds: torch.Tensor
    boxes: torch.Tensor | None = None
    landmarks: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    image_index: torch.Tensor | None = None
    recognizer: str = ""
    image_sizes: tuple[tuple[int, int], ...] | None = None

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
    check_fingerprint(fe.recognizer, source, _REMAKE)
    present = [name for name in _GEOMETRY if getattr(fe, name) is not None]
    if present and len(present) != len(_GEOMETRY):
        raise ModelFileError(f"{source}: face geometry is partial ({present}); expected all of {list(_GEOMETRY)}")
    for name in present:
        value = getattr(fe, name)
        expected = (e.shape[0], *_GEOMETRY[name])
        if tuple(value.shape) != expected:
            raise ModelFileError(f"{source}: {name} has shape {tuple(value.shape)}, expected {expected}")
    check_image_sizes(fe.image_sizes, fe.has_geometry, source, _REMAKE)
    if fe.image_sizes is not None and len(fe) and int(fe.image_index.max()) >= len(fe.image_sizes):
        raise ModelFileError(f"{source}: a face of image {int(fe.image_index.max())} (counting from 0), but image "
                             f"sizes of only {len(fe.image_sizes)} image(s)")


MAX_IMAGE_SIDE = 2**31 - 1


def check_image_sizes(sizes, has_geometry: bool, source: str, fix: str) -> None:
    """Refuses ``image_sizes`` (see :class:`FaceEmbeds`) that are not (height, width) pairs of whole pixels, or that
    come with faces without geometry: what a file's header alone tells, so the loader checks it before reading.
    ``source`` names where they come from, ``fix`` how to get good ones."""
    if sizes is None:
        return
    if not has_geometry:
        raise ModelFileError(f"{source}: image sizes are given for faces without boxes (averaged vectors describe no "
                             f"image). {fix}")
    if not isinstance(sizes, tuple) or not all(
            isinstance(size, tuple) and len(size) == 2 and all(
                isinstance(side, int) and not isinstance(side, bool) and 0 < side <= MAX_IMAGE_SIDE for side in size)
            for size in sizes):
        shown = first_few(list(sizes)) if isinstance(sizes, (tuple, list)) else type(sizes).__name__
        raise ModelFileError(f"{source}: image_sizes must be (height, width) pairs of whole pixels from 1 to "
                             f"{MAX_IMAGE_SIDE}, got {shown}. {fix}")


def _describe_images(sizes: tuple[tuple[int, int], ...]) -> str:
    """What a batch of images of ``sizes`` (height, width) holds, for messages: "2 images of 512x512 px", or in
    order "3 images (2 of 512x512 px, 1 of 640x480 px)"."""
    runs = []  # [size, how many images in a row have it]
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
    noun = "image" if len(sizes) == 1 else "images"
    if len(runs) <= 1:
        return f"{len(sizes)} {noun}" + (f" of {sizes[0][1]}x{sizes[0][0]} px" if sizes else "")
    shown = ", ".join(f"{count} of {width}x{height} px" for (height, width), count in runs[:4])
    return f"{len(sizes)} {noun} ({shown}{', ...' if len(runs) > 4 else ''})"


def check_made_from(faces: FaceEmbeds, images: torch.Tensor, node: str) -> None:
    """Refuses ``faces`` whose boxes and landmarks were found in other images than ``images`` (an IMAGE
    [B, H, W, C]) before ``node`` uses them there: another count or size would put every face on the wrong pixels
    without a word. Averaged vectors (no geometry) describe no image and pass. Faces whose image sizes are unknown
    (a file from before they were recorded) pass when every face's image is in the batch."""
    if not faces.has_geometry:
        return
    count, height, width = (int(n) for n in images.shape[:3])
    given = f"{node} was given {_describe_images(((height, width),) * count)}"
    fix = (f"Run Face Embed on the same images that go into {node}, or connect insightface to {node} in place of "
           "face_embeds")
    if faces.image_sizes is None:
        last = int(faces.image_index.max()) if len(faces) else -1
        if last >= count:
            raise ImageInputError(f"face_embeds hold a face of image {last} (counting from 0; they do not record their "
                                  f"images' sizes), but {given}: the faces belong to other images. {fix}")
        return
    if faces.image_sizes != ((height, width),) * count:
        raise ImageInputError(f"face_embeds were made from {_describe_images(faces.image_sizes)}, but {given}: their "
                              f"face boxes and landmarks would fall on the wrong pixels. {fix}")


def combine(items: list[FaceEmbeds], mode: str) -> FaceEmbeds:
    """mean: the average vector; norm-mean: the average rescaled to unit length; concat: all faces kept, each
    input's images numbered after the previous inputs' images, as if their image batches were joined in order (an
    input's image count is its number of image sizes, or when those are unknown, its last face's image + 1); the
    image sizes are joined likewise, and unknown if any input's are. Inputs without a face are left out.

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
        if not all(fe.has_geometry for fe in items):
            return FaceEmbeds(embeds, recognizer=recognizer)
        geometry = {name: torch.cat([getattr(fe, name) for fe in items]) for name in ("boxes", "landmarks", "scores")}
        image_counts = [len(fe.image_sizes) if fe.image_sizes is not None else int(fe.image_index.max()) + 1
                        for fe in items]
        firsts = [sum(image_counts[:i]) for i in range(len(items))]
        image_index = torch.cat([fe.image_index + first for fe, first in zip(items, firsts)])
        sizes_known = all(fe.image_sizes is not None for fe in items)
        image_sizes = sum((fe.image_sizes for fe in items), ()) if sizes_known else None
        return FaceEmbeds(embeds, **geometry, image_index=image_index, recognizer=recognizer, image_sizes=image_sizes)
    mean = embeds.mean(dim=0, keepdim=True)
    if mode == "norm-mean":
        mean = torch.nn.functional.normalize(mean, dim=-1)
    return FaceEmbeds(mean, recognizer=recognizer)


def mean_identity_vector(arcface: torch.Tensor) -> torch.Tensor:
    """f_a: the unit-length mean of the references' unit ArcFace vectors ([..., F, d] -> [..., d])."""
    normalize = torch.nn.functional.normalize
    return normalize(normalize(arcface.float(), dim=-1).mean(-2), dim=-1)


def save_face_embeds(fe: FaceEmbeds, path: str, *, replace: bool = True) -> None:
    """Writes ``fe`` as ``face_embeds/1`` safetensors; ``replace=False``: FileExistsError if ``path`` exists."""
    tensors = {"embeds": fe.embeds.float().contiguous().cpu()}
    if fe.has_geometry:
        for name in _GEOMETRY:
            value = getattr(fe, name)
            tensors[name] = (value.long() if name == "image_index" else value.float()).contiguous().cpu()
    meta = {"format": FORMAT, "faces": str(len(fe)), "dim": str(fe.dim), "geometry": json.dumps(fe.has_geometry),
            "recognizer": fe.recognizer}
    if fe.image_sizes is not None:
        meta["image_sizes"] = json.dumps([list(size) for size in fe.image_sizes])
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
        image_sizes = _image_sizes_field(f.metadata, path)
        check_image_sizes(image_sizes, bool(present), path, _RESAVE)
        tensors = f.tensors()
    zero_rows = (tensors["embeds"] == 0).all(dim=1).nonzero().flatten().tolist()
    if zero_rows:
        raise ModelFileError(f"{path}: embeds rows {first_few(zero_rows)} are all zeros, expected ArcFace vectors "
                             f"of non-zero length. {_RESAVE}")
    try:
        return FaceEmbeds(**tensors, recognizer=recognizer, image_sizes=image_sizes)
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc


def _image_sizes_field(meta: dict[str, str], path: str) -> tuple[tuple, ...] | None:
    """The metadata field ``image_sizes`` as a tuple of pairs (checked by :func:`check_image_sizes`); None when
    absent."""
    if meta.get("image_sizes") is None:
        return None
    raw = metadata_json(meta, path, "image_sizes", "the JSON list of the images' sizes", _RESAVE)
    if not isinstance(raw, list) or not all(isinstance(size, list) for size in raw):
        shown = first_few(raw) if isinstance(raw, list) else type(raw).__name__
        raise ModelFileError(f"{path}: the metadata field 'image_sizes' must be a JSON list of [height, width] pairs, "
                             f"got {shown}. {_RESAVE}")
    return tuple(tuple(size) for size in raw)
