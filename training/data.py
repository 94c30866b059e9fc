"""Identity datasets for the face trainers: layout, up-front validation, a face cache, and batch sampling.

Layout (one folder per identity)::

    <dataset>/<identity>/*.jpg|.jpeg|.png|.webp|.bmp
    <dataset>/<identity>/metadata.jsonl   optional: {"file_name": "img1.jpg", "caption": "..."} per line
    <dataset>/<identity>/class_noun.txt   optional: the class noun ("woman", "man", ...); default "person"

Every image is checked once before training: unreadable files, images without a face, and identities left
with no usable image are skipped, counted and reported, never a crash mid-run; so are broken or looping symbolic
links, unusable metadata.jsonl lines (that caption is left out) and an unreadable class_noun.txt ("person" is
used). Detections (box, 5 landmarks) and ArcFace embeddings are cached in ``<cache_dir>/faces.safetensors``
keyed by file path, size and mtime, so later runs (and resumes) skip detection; a cache that cannot be read is
reported and rebuilt, and one made by another ArcFace recognizer (or not saying which) is rebuilt.

Over 450 lines: most of it is the per-file checks above, each with the message a user gets; they share the scan.
"""

from __future__ import annotations

import errno
import functools
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..nodes.arch.files import same_weights
from ..nodes.errors import DatasetError, PackError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
CACHE_FORMAT = "face_cache/1"


@dataclass
class FaceImage:
    path: str
    caption: str
    box: torch.Tensor  # [4] pixels of the original image
    landmarks: torch.Tensor  # [5, 2]
    embedding: torch.Tensor  # [512] unit ArcFace vector


@dataclass
class Identity:
    name: str
    class_noun: str
    images: list[FaceImage]


@dataclass
class DatasetReport:
    identities: int = 0
    images: int = 0
    masks: int = 0  # face-mask files (scan_dataset's mask_suffix), which are not photos
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def summary(self) -> str:
        lines = [f"dataset: {self.identities} identities, {self.images} usable images"]
        if self.masks:
            lines.append(f"  {self.masks} face mask file(s) beside them (not photos)")
        for reason, paths in sorted(self.skipped.items()):
            shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
            lines.append(f"  skipped {len(paths)} ({reason}): {shown}")
        return "\n".join(lines)


METADATA_NOT_UTF8 = "metadata.jsonl line that is not UTF-8 text (caption left out)"
METADATA_NOT_JSON = "metadata.jsonl line that is not JSON (caption left out)"
METADATA_NOT_ENTRY = 'metadata.jsonl line that is not {"file_name": "...", "caption": "..."} (caption left out)'


def _broken_link_reason(path: str) -> str | None:
    """Why ``path`` cannot be followed (a dangling symbolic link or a loop of links), or None when it can."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if os.path.islink(path):
            return "broken symbolic link (its target does not exist)"
        return f"unreadable ({type(exc).__name__}: {exc.strerror})"
    return None


def _captions(folder: str, skip=lambda reason, item: None, where: str = "") -> dict[str, str]:
    """Captions by file name from ``metadata.jsonl``. A line that cannot be used (not UTF-8, not JSON, not an object
    with a string file_name) is left out and passed to ``skip(reason, "<where>/metadata.jsonl line N")``."""
    path = os.path.join(folder, "metadata.jsonl")
    shown = os.path.join(where, "metadata.jsonl")
    captions = {}
    if not os.path.lexists(path):
        return captions
    problem = _broken_link_reason(path) or (None if os.path.isfile(path) else "not a file")
    if problem is None:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            problem = f"unreadable ({type(exc).__name__})"
    if problem is not None:
        skip(f"metadata.jsonl {problem} (captions left out)", shown)
        return captions
    for number, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            skip(METADATA_NOT_UTF8, f"{shown} line {number}")
            continue
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except ValueError:
            skip(METADATA_NOT_JSON, f"{shown} line {number}")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            skip(METADATA_NOT_ENTRY, f"{shown} line {number}")
            continue
        captions[entry["file_name"]] = str(entry.get("caption", ""))
    return captions


def _class_noun(folder: str, skip=lambda reason, item: None, where: str = "") -> str:
    """The class noun from ``class_noun.txt``, or "person" (an unusable file is passed to ``skip``)."""
    path = os.path.join(folder, "class_noun.txt")
    if not os.path.lexists(path):
        return "person"
    problem = _broken_link_reason(path) or (None if os.path.isfile(path) else "not a file")
    if problem is None:
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8-sig").strip() or "person"
        except UnicodeDecodeError:
            problem = "not UTF-8 text"
        except OSError as exc:
            problem = f"unreadable ({type(exc).__name__})"
    skip(f'class_noun.txt {problem} ("person" used)', os.path.join(where, "class_noun.txt"))
    return "person"


def load_rgb(path: str) -> np.ndarray:
    """[H, W, 3] uint8 RGB; raises OSError/ValueError for unreadable files."""
    from PIL import Image

    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def load_rgb_tensor(path: str) -> torch.Tensor:
    """[3, H, W] float 0..1 RGB, as ComfyUI's Load Image gives the same file."""
    return torch.from_numpy(load_rgb(path)).permute(2, 0, 1).float() / 255


class FaceCache:
    """Detections and embeddings per image file, persisted as safetensors + JSON metadata. ``recognizer`` is the
    fingerprint of the ArcFace that makes the embeddings: a cache made by another one holds vectors of another
    space, and is not used."""

    def __init__(self, path: str, recognizer: str):
        self.path = path
        self.recognizer = recognizer
        self.entries: dict[str, dict] = {}
        self.problem = None  # why an existing cache file was discarded (it is rebuilt on save)
        self.dirty = False
        if os.path.lexists(path):
            try:
                self.entries = self._read(path, recognizer)
            except Exception as exc:  # truncated, not safetensors, broken index: detect again
                self.entries = {}
                self.problem = f"corrupt face cache, rebuilt ({type(exc).__name__})"
                self.dirty = True

    @staticmethod
    def _read(path: str, recognizer: str) -> dict[str, dict]:
        from safetensors import safe_open

        entries = {}
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT:
                return entries  # another version's cache: detect again
            index = json.loads(meta["index"])
            tensors = {k: f.get_tensor(k) for k in ("boxes", "landmarks", "embeddings")}
        rows = tensors["boxes"].shape[0]
        if (not isinstance(index, dict) or tensors["boxes"].shape != (rows, 4)
                or tensors["landmarks"].shape != (rows, 5, 2) or tensors["embeddings"].ndim != 2
                or tensors["embeddings"].shape[0] != rows
                or not all(torch.isfinite(t).all() for t in tensors.values())):
            raise ValueError("index or tensors of the wrong shape")
        for key, entry in index.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("stamp"), str):
                raise ValueError(f"bad index entry for {key!r}")
            if "row" in entry:
                row = entry["row"]
                if not isinstance(row, int) or not 0 <= row < rows:
                    raise ValueError(f"bad row for {key!r}")
                entry = dict(entry, box=tensors["boxes"][row], landmarks=tensors["landmarks"][row],
                             embedding=tensors["embeddings"][row])
            elif not isinstance(entry.get("skip"), str):
                raise ValueError(f"bad index entry for {key!r}")
            entries[key] = entry
        if not same_weights(meta.get("recognizer", ""), recognizer):
            return {}  # another recognizer's vectors: embed again
        return entries

    @staticmethod
    def stamp(path: str) -> str:
        st = os.stat(path)
        return f"{st.st_size}-{st.st_mtime_ns}"

    def get(self, key: str, stamp: str):
        entry = self.entries.get(key)
        return entry if entry is not None and entry["stamp"] == stamp else None

    def put(self, key: str, entry: dict):
        self.entries[key] = entry
        self.dirty = True

    def save(self):
        if not self.dirty:
            return
        from ..nodes.arch.files import write_safetensors

        index, boxes, landmarks, embeddings = {}, [], [], []
        for key, entry in self.entries.items():
            if "embedding" in entry:
                index[key] = {"stamp": entry["stamp"], "row": len(boxes)}
                boxes.append(entry["box"])
                landmarks.append(entry["landmarks"])
                embeddings.append(entry["embedding"])
            else:
                index[key] = {"stamp": entry["stamp"], "skip": entry["skip"]}
        tensors = {
            "boxes": torch.stack(boxes) if boxes else torch.zeros(0, 4),
            "landmarks": torch.stack(landmarks) if landmarks else torch.zeros(0, 5, 2),
            "embeddings": torch.stack(embeddings) if embeddings else torch.zeros(0, 512),
        }
        write_safetensors(tensors, self.path, {"format": CACHE_FORMAT, "index": json.dumps(index),
                                               "recognizer": self.recognizer})
        self.dirty = False


def detect_face(path: str, analyzer) -> dict:
    """The largest face of an image file: {"box", "landmarks", "embedding"}, or {"skip": why} when the file cannot be
    read, is unusable for detection or shows no face."""
    from ..nodes.face.insightface_backend import embed_faces

    try:
        rgb = load_rgb(path)
    except Exception as exc:  # PIL raises many types for broken files
        return {"skip": f"unreadable image ({type(exc).__name__})"}
    image = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]
    try:
        faces, _ = embed_faces(analyzer, image, "largest", on_no_face="skip")
    except PackError as exc:  # e.g. an image too small to search
        return {"skip": f"unusable image ({exc})"}
    if len(faces) == 0:
        return {"skip": "no face detected"}
    return {"box": faces.boxes[0], "landmarks": faces.landmarks[0], "embedding": faces.embeds[0]}


def scan_dataset(root: str, analyzer, cache_dir: str, log=print,
                 mask_suffix: str = "") -> tuple[list[Identity], DatasetReport]:
    """Validates every image once (readable, one face found) and returns the usable identities. With
    ``mask_suffix``, files whose name ends with it are face masks (``mask_path``), counted and never photos."""
    from ..nodes.face.insightface_backend import recognizer_fingerprint

    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder {root!r} does not exist")
    report = DatasetReport()

    def skip(reason: str, item: str):
        report.skipped[reason].append(item)

    try:
        entries = sorted(os.listdir(root))
    except OSError as exc:
        raise DatasetError(f"cannot list the dataset folder {root!r} ({type(exc).__name__}: {exc.strerror})") from exc
    folders = []
    for name in entries:
        problem = _broken_link_reason(os.path.join(root, name))
        if problem is not None:  # a dangling link or a loop of links where an identity folder may have been meant
            skip(problem, name)
        elif os.path.isdir(os.path.join(root, name)):
            folders.append(name)
    if not folders:
        raise DatasetError(f"dataset folder {root!r} has no identity sub-folders (expected <dataset>/<identity>/*.jpg)"
                           + (f":\n{report.summary()}" if report.skipped else ""))
    cache = FaceCache(os.path.join(cache_dir, "faces.safetensors"), recognizer_fingerprint(analyzer))
    if cache.problem:
        skip(cache.problem, cache.path)
    identities = []
    for name in folders:
        folder = os.path.join(root, name)
        try:
            files = sorted(os.listdir(folder))
        except OSError as exc:
            skip(f"unreadable identity folder ({type(exc).__name__})", name)
            continue
        captions = _captions(folder, skip, name)
        noun = _class_noun(folder, skip, name)
        usable = []
        for file in files:
            if os.path.splitext(file)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            if mask_suffix and file.lower().endswith(mask_suffix.lower()):
                report.masks += 1
                continue
            path = os.path.join(folder, file)
            key = os.path.relpath(path, root)
            problem = _broken_link_reason(path)
            if problem is not None:
                skip(problem, key)
                continue
            stamp = FaceCache.stamp(path)
            entry = cache.get(key, stamp)
            if entry is None:
                entry = {"stamp": stamp, **detect_face(path, analyzer)}
                cache.put(key, entry)
            if "skip" in entry:
                report.skipped[entry["skip"]].append(key)
                continue
            caption = captions.get(file) or f"a photo of a {noun}"
            usable.append(FaceImage(path, caption, entry["box"], entry["landmarks"], entry["embedding"]))
        if usable:
            identities.append(Identity(name, noun, usable))
            report.images += len(usable)
        else:
            report.skipped["identity with no usable image"].append(name)
    cache.save()
    report.identities = len(identities)
    log(report.summary())
    if not identities:
        raise DatasetError(f"no usable identity in {root!r}:\n{report.summary()}")
    return identities, report


@functools.lru_cache(maxsize=4096)
def _square_uint8(path: str, size: int) -> tuple[torch.Tensor, float, int, int]:
    """The decoded, centre-cropped and resized image as uint8 [3, size, size], and the crop's scale and offset.
    Cached: every step re-reads the same images, and decoding dominated a step's CPU time."""
    rgb = load_rgb(path)
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = torch.from_numpy(np.ascontiguousarray(rgb[top:top + side, left:left + side])).permute(2, 0, 1).float() / 255
    image = torch.nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)[0].clamp(0, 1)
    return (image * 255).round().to(torch.uint8), size / side, left, top


def _into_square(points: torch.Tensor, scale: float, left: int, top: int) -> torch.Tensor:
    """Points [..., 2] in pixels of the original image moved into its centre square's crop, resized."""
    return (points - torch.tensor([left, top], dtype=points.dtype)) * scale


def load_square(image: "FaceImage", size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset image as [3, size, size] float 0..1 (centre square, resized) and its landmarks moved along."""
    pixels, scale, left, top = _square_uint8(image.path, size)
    return pixels.float() / 255, _into_square(image.landmarks, scale, left, top)


def square_box(image: "FaceImage", size: int) -> torch.Tensor:
    """The image's face box [x1, y1, x2, y2] moved into load_square's crop."""
    _, scale, left, top = _square_uint8(image.path, size)
    return _into_square(image.box.reshape(2, 2), scale, left, top).flatten()


def mask_path(image_path: str, mask_suffix: str) -> str:
    """Where a photo's face mask is: ``<folder>/<stem><mask_suffix>`` (img01.jpg -> img01_mask.png)."""
    return os.path.splitext(image_path)[0] + mask_suffix


def _square_geometry(height: int, width: int, size: int) -> tuple[float, int, int, int]:
    """load_square's crop of an image of this size: (scale, left, top, side), the centre square resized to size."""
    side = min(height, width)
    return size / side, (width - side) // 2, (height - side) // 2, side


@functools.lru_cache(maxsize=4096)
def _square_mask_uint8(path: str, height: int, width: int, size: int) -> torch.Tensor:
    """The mask file as uint8 [size, size] through load_square's crop of a height x width photo; a mask of
    another size is first resized to the photo's (masks are often made at a segmenter's resolution)."""
    from PIL import Image

    with Image.open(path) as img:
        grey = np.array(img.convert("L"))
    mask = torch.from_numpy(grey).float()[None, None] / 255
    if mask.shape[-2:] != (height, width):
        mask = torch.nn.functional.interpolate(mask, size=(height, width), mode="bilinear", antialias=True,
                                               align_corners=False)
    _, left, top, side = _square_geometry(height, width, size)
    crop = mask[..., top:top + side, left:left + side]
    square = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                             align_corners=False)[0, 0].clamp(0, 1)
    return (square * 255).round().to(torch.uint8)


def box_mask(box: torch.Tensor, scale: float, left: int, top: int, size: int) -> torch.Tensor:
    """[size, size] float 0..1: the face box [x1, y1, x2, y2] (pixels of the original image) moved into load_square's
    crop (minus (left, top), times scale), each pixel valued by the share of its area inside the box."""
    x1, y1, x2, y2 = ((box.double() - torch.tensor([left, top, left, top], dtype=torch.float64)) * scale).tolist()
    edges = torch.arange(size, dtype=torch.float64)
    cover_x = (torch.minimum(edges + 1, torch.tensor(x2)) - torch.maximum(edges, torch.tensor(x1))).clamp(0, 1)
    cover_y = (torch.minimum(edges + 1, torch.tensor(y2)) - torch.maximum(edges, torch.tensor(y1))).clamp(0, 1)
    return torch.outer(cover_y, cover_x).float()


@functools.lru_cache(maxsize=65536)
def _image_size(path: str) -> tuple[int, int]:
    """(height, width) from the image file's header."""
    from PIL import Image

    with Image.open(path) as img:
        return img.size[1], img.size[0]


def load_square_mask(image: "FaceImage", size: int, mask_suffix: str) -> tuple[torch.Tensor, str]:
    """A photo's face mask [size, size] float 0..1 in load_square's crop, and where it came from: "file" (the
    ``mask_path`` file beside the photo, white = face), else "box" (the detected face box), or "box: <why>" when a
    mask file is there but cannot be read (the box is used: a broken mask never stops a run)."""
    height, width = _image_size(image.path)
    path = mask_path(image.path, mask_suffix) if mask_suffix else ""
    source = "box"
    if path and os.path.lexists(path):
        try:
            return _square_mask_uint8(path, height, width, size).float() / 255, "file"
        except Exception as exc:  # PIL raises many types for broken files
            source = f"box: unreadable mask {path} ({type(exc).__name__})"
    scale, left, top, _ = _square_geometry(height, width, size)
    return box_mask(image.box, scale, left, top, size), source


def sample_batch(identities: list[Identity], batch_size: int, num_images: int, step: int, seed: int,
                 rank: int = 0, processes: int = 1, include_target: bool = False) -> list[dict]:
    """Process ``rank``'s batch for ``step``: a pure function of (seed, step, rank, processes), so a resumed run sees
    the same data.

    The step's global batch (``batch_size * processes`` examples) is drawn once and each process takes its own
    slice, so the processes train on different examples (different identities while the global batch is no larger
    than the identity count). With one process this is the whole batch.

    Per example: an identity, a target image (with caption) and up to N references of that identity drawn from its
    *other* photos, so the adapter never sees the image it denoises and cannot learn to copy its pose and
    expression (the paper's point of mixing references); fewer than N are filled up later by augmentation. An
    identity with a single photo has no other: that photo is its reference. ``include_target`` restores the target
    as one of the N (the first N of the shuffled photos), for comparison.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    picks = torch.randperm(len(identities), generator=gen)
    examples = []
    for i in range(batch_size * processes):
        identity = identities[int(picks[i % len(picks)])]
        order = torch.randperm(len(identity.images), generator=gen).tolist()
        others = order if include_target or len(order) == 1 else order[1:]
        examples.append({
            "identity": identity,
            "target": identity.images[order[0]],
            "references": [identity.images[j] for j in others[:num_images]],
            "augment_seed": int(torch.randint(2**31 - 1, (1,), generator=gen)),
        })
    return examples[rank * batch_size:(rank + 1) * batch_size]
