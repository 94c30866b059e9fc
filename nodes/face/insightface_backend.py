"""Face detection, alignment and ArcFace embedding through insightface + onnxruntime.

insightface and onnxruntime are imported lazily so the pack loads without them; the face functions then
raise an error that names the install command. Nothing here downloads anything: a model pack is a folder
the user placed under ``models/insightface/models/<pack>/``, checked here before insightface sees it.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..arch import face_embeds as fe
from ..arch.face_embeds import FACE_SELECTIONS, FaceEmbeds
from ..arch.files import check_regular_file, file_fingerprint
from ..arch.onnx_files import graph_input_shape, load_onnx_graph
from ..errors import (ConfigError, ImageInputError, MissingDependencyError, ModelFileError, ModelFolderError,
                      NoFaceError, PackError)
from .images import bgr_uint8_to_image, to_bgr_uint8

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install insightface onnxruntime   (NVIDIA GPU: pip install onnxruntime-gpu instead of onnxruntime; "
    "never both)"
)
# UI name -> onnxruntime execution provider; "auto" takes the first available in this order.
PROVIDERS = {
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "DirectML": "DmlExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "CPU": "CPUExecutionProvider",
}
PROVIDER_CHOICES = ("auto", *PROVIDERS)
NO_FACE_POLICIES = ("error", "skip")
CROP_SIZE = 112
_PACK_FILE_FIX = "Download the pack again, or move what is not a model file out of the pack folder"


def import_insightface():
    try:
        import onnxruntime  # noqa: F401
        from insightface.app import FaceAnalysis
        from insightface.utils import face_align
    except ImportError as exc:
        raise MissingDependencyError(
            f"the face nodes need insightface and onnxruntime ({exc.name or exc} is missing): {INSTALL_HINT}"
        ) from exc
    # insightface's alignment calls scikit-image's SimilarityTransform.estimate, deprecated since scikit-image 0.26:
    # one FutureWarning per face that no user can act on
    warnings.filterwarnings("ignore", message="`estimate` is deprecated", category=FutureWarning, module=r"insightface\.")
    return FaceAnalysis, face_align


def resolve_providers(choice: str) -> list[str]:
    """The provider list for a UI choice; errors when onnxruntime lacks the one asked for."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if choice == "auto":
        wanted = next((p for p in PROVIDERS.values() if p in available), None)
        if wanted is None:
            raise MissingDependencyError(f"onnxruntime offers no provider this pack knows (it has {available})")
    elif choice in PROVIDERS:
        wanted = PROVIDERS[choice]
        if wanted not in available:
            hint = {
                "CUDA": "pip uninstall -y onnxruntime && pip install onnxruntime-gpu",
                "ROCm": "install the onnxruntime-rocm build in place of onnxruntime",
                "DirectML": "pip uninstall -y onnxruntime && pip install onnxruntime-directml",
                "CoreML": "use the standard onnxruntime wheel on macOS",
            }.get(choice, "")
            raise MissingDependencyError(
                f"provider {choice} ({wanted}) is not in this onnxruntime build (available: {available}). "
                f"To use it: {hint}; or pick 'auto' or 'CPU'."
            )
    else:
        raise ConfigError(f"provider must be one of {PROVIDER_CHOICES}, got {choice!r}")
    return [wanted] if wanted == PROVIDERS["CPU"] else [wanted, PROVIDERS["CPU"]]


def _onnx_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.onnx")))


def list_packs(insightface_roots: list[str]) -> list[str]:
    """Pack names under ``<root>/models/``, as shown in the Load InsightFace dropdown."""
    names = set()
    for root in insightface_roots:
        models = os.path.join(root, "models")
        if os.path.isdir(models):
            names.update(d for d in os.listdir(models) if os.path.isdir(os.path.join(models, d)))
    return sorted(names)


def check_pack_folder(folder: str) -> str:
    """``folder`` itself when it holds a pack's .onnx files, or an error that says what is wrong with it."""
    if not os.path.isdir(folder):
        raise ModelFolderError(f"{folder} is not a folder; expected a folder holding the pack's .onnx files "
                               "(e.g. models/insightface/models/antelopev2)")
    if _onnx_files(folder):
        return folder
    nested = [d for d in sorted(glob.glob(os.path.join(folder, "*"))) if os.path.isdir(d) and _onnx_files(d)]
    if nested:
        raise ModelFolderError(
            f"the .onnx files are one folder too deep (the zip was extracted into a folder of its own): "
            f"found them in {nested[0]}; move them up into {folder}"
        )
    raise ModelFolderError(
        f"{folder} has no .onnx files; put the pack's detector and recognizer there "
        f"(antelopev2: scrfd_10g_bnkps.onnx and glintr100.onnx; buffalo_l: det_10g.onnx and w600k_r50.onnx)"
    )


def find_pack_dir(insightface_roots: list[str], pack: str) -> str:
    """``<root>/models/<pack>`` holding the .onnx files, or an error that says exactly where they must go."""
    if not pack or os.sep in pack or (os.altsep and os.altsep in pack) or pack in (".", ".."):
        raise ModelFolderError(f"invalid insightface pack name {pack!r}: use a folder name such as antelopev2")
    for root in insightface_roots:
        expected = os.path.join(root, "models", pack)
        if os.path.isdir(expected):
            return check_pack_folder(expected)
        misplaced = os.path.join(root, pack)
        if os.path.isdir(misplaced) and _onnx_files(misplaced):
            raise ModelFolderError(f"found the pack at {misplaced}; it must be at {expected} (note the models/ level)")
    expected = [os.path.join(r, "models", pack) for r in insightface_roots]
    raise ModelFolderError(
        f"insightface pack {pack!r} not found; expected its .onnx files in {' or '.join(expected) or '(no folder)'}"
    )


RECOGNIZER_INPUT = "[batch, 3, 112, 112]"
DETECTOR_INPUT = "[batch, 3, height, width] (height and width free, or fixed multiples of 32)"
DETECTOR_STRIDE = 32  # SCRFD's coarsest feature stride: a fixed input size must be a multiple of it


def check_pack_files(files: list[str]) -> dict[str, list | None]:
    """Reads each .onnx file's graph (never any other file) and returns its input shape by path. ModelFileError
    naming the file when it is unreadable or keeps tensor data in separate files (which could lie anywhere)."""
    shapes = {}
    for path in files:
        shapes[path] = graph_input_shape(load_onnx_graph(path, "face model"))
    return shapes


def _dim_text(dim) -> str:
    if isinstance(dim, int) and dim > 0:
        return str(dim)
    return dim if isinstance(dim, str) and dim else "?"


def _shape_text(shape) -> str:
    return "(unknown)" if shape is None else "[" + ", ".join(_dim_text(d) for d in shape) + "]"


def _describe_shapes(shapes: dict) -> str:
    return ", ".join(f"{os.path.basename(f)} {_shape_text(s)}" for f, s in shapes.items()) or "no files"


def _fixed(dim) -> bool:
    return isinstance(dim, int) and dim > 0


def _session_input_shape(model):
    session = getattr(model, "session", None)
    if session is not None:
        return list(session.get_inputs()[0].shape)
    return list(getattr(model, "input_shape", None) or [])


def check_input_shapes(app, det_size: int) -> None:
    """After insightface has routed the files: the detector and recognizer must take inputs insightface can feed
    them (3-channel images, one at a time), or the first image would fail deep inside onnxruntime."""
    for task, expected in (("detection", DETECTOR_INPUT), ("recognition", RECOGNIZER_INPUT)):
        model = app.models[task]
        shape = _session_input_shape(model)
        problems = []
        if len(shape) != 4:
            problems.append(f"{len(shape)} dimensions instead of 4")
        else:
            batch, channels, height, width = shape
            if _fixed(batch) and batch != 1:
                problems.append(f"a fixed batch of {batch} (insightface runs one image at a time)")
            if _fixed(channels) and channels != 3:
                problems.append(f"{channels} channel(s) instead of 3 (insightface feeds RGB/BGR images)")
            if task == "detection":
                bad = [d for d in (height, width) if _fixed(d) and (d < DETECTOR_STRIDE or d % DETECTOR_STRIDE)]
                if bad:
                    problems.append(f"a fixed size that is not a multiple of {DETECTOR_STRIDE} (SCRFD's strides)")
        if problems:
            role = "face detector" if task == "detection" else "ArcFace recognizer"
            raise ModelFileError(
                f"{getattr(model, 'model_file', '?')}: this {role} takes input {_shape_text(shape)}: "
                f"{'; '.join(problems)}; expected {expected}. Use the pack's own file (antelopev2: "
                "scrfd_10g_bnkps.onnx and glintr100.onnx; buffalo_l: det_10g.onnx and w600k_r50.onnx)"
            )
    height, width = _session_input_shape(app.models["detection"])[2:4]
    if _fixed(height) and _fixed(width) and (height, width) != (det_size, det_size):
        log.info("%s has a fixed input of %dx%d: detection runs at that size, not at det_size %d",
                 os.path.basename(getattr(app.models["detection"], "model_file", "detector")), width, height, det_size)


@dataclass
class FaceAnalyzer:
    """A loaded insightface detector + recognizer, and the execution provider really in use."""

    app: object
    pack_dir: str
    providers_requested: list[str]
    provider_in_use: str

    @property
    def report(self) -> str:
        text = f"insightface pack {os.path.basename(self.pack_dir)}: running on {self.provider_in_use}"
        if self.provider_in_use != self.providers_requested[0]:
            text += (
                f" (asked for {self.providers_requested[0]}, which failed to start; onnxruntime-gpu usually "
                "needs the CUDA/cuDNN versions it was built for - see the README)"
            )
        return text

    def get(self, bgr: np.ndarray) -> list:
        """insightface's own call, so analyzers from other packs' loaders and ours are interchangeable."""
        return self.app.get(bgr)


_cache: dict = {}
_cache_lock = threading.Lock()


def load_analyzer(pack_dir: str, provider: str = "auto", det_size: int = 640) -> FaceAnalyzer:
    """Loads (or reuses) the detector and recognizer of a pack folder."""
    FaceAnalysis, _ = import_insightface()
    providers = resolve_providers(provider)
    files = _onnx_files(pack_dir)
    for path in files:  # before anything opens them (a FIFO or a device would block or read without end)
        check_regular_file(path, "face model", _PACK_FILE_FIX)
    key = (pack_dir, tuple((f, os.path.getmtime(f), os.path.getsize(f)) for f in files), tuple(providers), det_size)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    # before insightface/onnxruntime open them: readable, self-contained (no external data), and their input shapes
    shapes = check_pack_files(files)
    try:
        app = FaceAnalysis(name=pack_dir, providers=providers, allowed_modules=["detection", "recognition"])
    except AssertionError as exc:  # insightface's own check: no detector among the files
        raise ModelFolderError(
            f"no face detector in {pack_dir} (files: {[os.path.basename(f) for f in files]}); the pack needs an "
            "SCRFD/RetinaFace detector such as scrfd_10g_bnkps.onnx or det_10g.onnx next to the recognizer"
        ) from exc
    except Exception as exc:
        raise ModelFileError(
            f"could not load the models in {pack_dir} ({type(exc).__name__}: {exc}; input shapes: "
            f"{_describe_shapes(shapes)}). A file may be corrupt or incompletely downloaded, or not an insightface "
            "model: download the pack again"
        ) from exc
    if "recognition" not in app.models:
        detector = getattr(app.models["detection"], "model_file", None)
        others = {f: shape for f, shape in shapes.items() if f != detector}
        if others:
            raise ModelFileError(
                f"no ArcFace recognizer in {pack_dir}: a recognizer takes input {RECOGNIZER_INPUT} (RGB faces, "
                f"square, at least 112 px and a multiple of 16), and no file but the detector does "
                f"({_describe_shapes(others)}); the pack needs one such as glintr100.onnx (antelopev2) or "
                "w600k_r50.onnx (buffalo_l)"
            )
        raise ModelFolderError(
            f"no ArcFace recognizer in {pack_dir} (files: {[os.path.basename(f) for f in files]}); the pack needs "
            "one such as glintr100.onnx (antelopev2) or w600k_r50.onnx (buffalo_l)"
        )
    check_input_shapes(app, det_size)
    on_cpu = providers[0] == PROVIDERS["CPU"]
    app.prepare(ctx_id=-1 if on_cpu else 0, det_size=(det_size, det_size))
    in_use = app.models["detection"].session.get_providers()[0]
    analyzer = FaceAnalyzer(app, pack_dir, providers, in_use)
    if in_use != providers[0]:
        log.warning(analyzer.report)
    with _cache_lock:
        _cache[key] = analyzer
    return analyzer


def recognizer_file(analyzer) -> str | None:
    """The path of the analyzer's ArcFace .onnx, None when it has none (a stand-in, another pack's object)."""
    model = _as_analyzer(analyzer).app.models.get("recognition")
    return getattr(model, "model_file", None)


def recognizer_fingerprint(analyzer) -> str:
    """Which ArcFace made the analyzer's vectors (``files.file_fingerprint`` of its file); "" when unknown."""
    path = recognizer_file(analyzer)
    return file_fingerprint(path) if path and os.path.isfile(path) else ""


def _as_analyzer(obj) -> FaceAnalyzer:
    if isinstance(obj, FaceAnalyzer):
        return obj
    if hasattr(obj, "get") and hasattr(obj, "models"):  # a FaceAnalysis from another pack's loader
        return FaceAnalyzer(obj, getattr(obj, "model_dir", "?"), ["?"], "?")
    raise PackError(f"expected an INSIGHTFACE model from Load InsightFace, got {type(obj).__name__}")


def _masks_for(mask: torch.Tensor, count: int, size: tuple[int, int]) -> torch.Tensor:
    """A MASK as [count, H, W] at the images' size (one mask for every image, or one per image)."""
    mask = torch.as_tensor(mask).float()
    mask = mask.reshape(-1, *mask.shape[-2:])
    if mask.shape[0] not in (1, count):
        raise ImageInputError(f"face_mask has {mask.shape[0]} masks for {count} images: give one mask, or one per "
                              "image")
    resized = torch.nn.functional.interpolate(mask[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return resized.expand(count, -1, -1)


def _select(faces: list, selection: str, index: int, mask: torch.Tensor | None) -> list:
    chosen = fe.select_faces(torch.tensor(np.stack([f.bbox[:4] for f in faces]), dtype=torch.float32), selection,
                             index, mask)
    return [faces[i] for i in chosen]


def embed_faces(
    analyzer,
    images: torch.Tensor,
    selection: str = "largest",
    index: int = 0,
    on_no_face: str = "error",
    progress=None,
    mask: torch.Tensor | None = None,
) -> tuple[FaceEmbeds, torch.Tensor]:
    """Detects, selects (:func:`face_embeds.select_faces`), aligns and embeds faces in an IMAGE batch.

    Returns the FACE_EMBEDS (faces in image order; left to right within an image for "all"/"index"; the size of
    every image of the batch, with or without a face, so that encode nodes can tell other images apart) and the
    aligned 112x112 crops as an IMAGE. With ``on_no_face="skip"`` images without a (selected) face are left
    out; if no image has one the embeds are empty and the crops are one black image. ``mask`` (MASK [H, W] or
    [1 or B, H, W], any size: it is resized to each image) is what selection "in mask" looks under.
    """
    if on_no_face not in NO_FACE_POLICIES:
        raise ConfigError(f"on_no_face must be one of {NO_FACE_POLICIES}, got {on_no_face!r}")
    if selection not in FACE_SELECTIONS:
        raise ConfigError(f"face selection must be one of {FACE_SELECTIONS}, got {selection!r}")
    analyzer = _as_analyzer(analyzer)
    _, face_align = import_insightface()
    recognizer = recognizer_fingerprint(analyzer)
    bgr_images = to_bgr_uint8(images)
    image_sizes = tuple(bgr.shape[:2] for bgr in bgr_images)
    masks = None if mask is None else _masks_for(mask, len(bgr_images), bgr_images[0].shape[:2])
    embeds, boxes, landmarks, scores, image_index, crops = [], [], [], [], [], []
    for i, bgr in enumerate(bgr_images):
        faces = analyzer.get(bgr)
        chosen = _select(faces, selection, index, None if masks is None else masks[i]) if faces else []
        if not chosen:
            found = (f"{len(faces)} face(s), none {'under the mask' if selection == 'in mask' else f'at index {index}'}"
                     if faces else "no face")
            if on_no_face == "error":
                raise NoFaceError(
                    f"image {i} of the batch: {found}. Use a clearer, larger or less tightly cropped photo, "
                    "or set on_no_face to 'skip'"
                )
            log.info("Face Embed: skipping image %d (%s)", i, found)
        for face in chosen:
            if face.kps is None or face.normed_embedding is None:
                raise ModelFileError("the detector gives no landmarks, so faces cannot be aligned for ArcFace")
            embeds.append(np.asarray(face.normed_embedding, dtype=np.float32))
            boxes.append(np.asarray(face.bbox[:4], dtype=np.float32))
            landmarks.append(np.asarray(face.kps, dtype=np.float32))
            scores.append(float(face.det_score))
            image_index.append(i)
            crops.append(face_align.norm_crop(bgr, landmark=face.kps, image_size=CROP_SIZE))
        if progress is not None:
            progress(i + 1, len(bgr_images))
    if not embeds:
        dim = _embedding_dim(analyzer)
        empty = FaceEmbeds(
            torch.zeros(0, dim),
            torch.zeros(0, 4),
            torch.zeros(0, 5, 2),
            torch.zeros(0),
            torch.zeros(0, dtype=torch.long),
            recognizer=recognizer,
            image_sizes=image_sizes,
        )
        return empty, torch.zeros(1, CROP_SIZE, CROP_SIZE, 3)
    result = FaceEmbeds(
        torch.from_numpy(np.stack(embeds)),
        torch.from_numpy(np.stack(boxes)),
        torch.from_numpy(np.stack(landmarks)),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(image_index, dtype=torch.long),
        recognizer=recognizer,
        image_sizes=image_sizes,
    )
    return result, bgr_uint8_to_image(crops)


def detect_boxes(analyzer, images: torch.Tensor) -> list[torch.Tensor]:
    """The face boxes [n, 4] (x1, y1, x2, y2 in pixels) the pack's detector finds in each image of an IMAGE batch,
    at its own score threshold. Detection only: no alignment, no embedding."""
    detector = _as_analyzer(analyzer).app.models["detection"]
    return [torch.from_numpy(np.ascontiguousarray(detector.detect(bgr, max_num=0)[0][:, :4], dtype=np.float32))
            for bgr in to_bgr_uint8(images)]


def _embedding_dim(analyzer: FaceAnalyzer) -> int:
    shape = getattr(analyzer.app.models.get("recognition"), "output_shape", None)
    return int(shape[-1]) if shape and isinstance(shape[-1], int) else 512
