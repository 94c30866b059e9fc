"""Bad images, face embeds of other images, model folders and installs: each a clear error, never a crash."""

import contextlib
import dataclasses
import os
import shutil
import stat
import sys
import threading

import pytest
import torch

from comfyui_idadapter.nodes.arch import e4e
from comfyui_idadapter.nodes.arch import face_embeds as fe
from comfyui_idadapter.nodes.arch import idadapter as ida
from comfyui_idadapter.nodes.errors import (ConfigError, ImageInputError, MissingDependencyError, ModelFileError,
                                            ModelFolderError, PackError)
from comfyui_idadapter.nodes.face import insightface_backend as backend
from comfyui_idadapter.nodes.face.images import rgb_images, to_bgr_uint8
from comfyui_idadapter.nodes.patches import shared
from tiny_face_models import expected_box, expected_landmarks, face_image, make_pack

IMAGE_ROWS = [
    # (id, IMAGE, message fragment): refused alike by Face Embed (to_bgr_uint8) and by MFF Embed and W+ Encode
    # given face_embeds (rgb_images)
    ("empty batch", torch.zeros(0, 64, 64, 3), "the IMAGE batch is empty"),
    ("empty float16 batch", torch.zeros(0, 64, 64, 3, dtype=torch.float16), "the IMAGE batch is empty"),
    ("2 channels", torch.zeros(1, 64, 64, 2), "IMAGE has 2 channels; expected 1 \\(grey\\), 3 \\(RGB\\) or 4"),
    ("5 channels, bfloat16", torch.zeros(1, 64, 64, 5, dtype=torch.bfloat16), "IMAGE has 5 channels"),
    ("no batch or channel axis", torch.zeros(64, 64), r"\[batch, height, width, channels\]"),
    ("NaN", torch.full((1, 64, 64, 3), float("nan")), "NaN"),
    ("infinite float16", torch.full((1, 64, 64, 3), float("inf"), dtype=torch.float16), "NaN or infinite"),
    ("not a tensor", "not an image", "expected an IMAGE tensor"),
]


@pytest.mark.parametrize("convert", [to_bgr_uint8, rgb_images], ids=["face detection", "encode nodes"])
@pytest.mark.parametrize("image,message", [r[1:] for r in IMAGE_ROWS], ids=[r[0] for r in IMAGE_ROWS])
def test_bad_images(convert, image, message):
    with pytest.raises(ImageInputError, match=message):
        convert(image)


def test_images_too_small_for_detection():
    with pytest.raises(ImageInputError, match="200x8 px; face detection needs at least 32x32"):
        to_bgr_uint8(torch.zeros(1, 8, 200, 3))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 1e-3), (torch.bfloat16, 6e-3)])
def test_half_precision_images_give_the_float32_result(dtype, tolerance):
    """What MFF Embed shows CLIP (the face crop, or the whole photo's centre) and what W+ Encode aligns, from a
    float16 or bfloat16 IMAGE: the float32 IMAGE's result, up to the precision the pixels were stored in."""
    image = face_image([(1, 2)], size=256)
    stored, exact = rgb_images(image.to(dtype)), rgb_images(image)
    assert stored.dtype == torch.float32
    stored, exact = stored[0].movedim(-1, 0), exact[0].movedim(-1, 0)
    box = torch.from_numpy(expected_box((1, 2), 256))
    for crop_box, margin in ((box, 0.5), (None, None)):
        torch.testing.assert_close(ida.reference_crop(stored, crop_box, margin, 224),
                                   ida.reference_crop(exact, crop_box, margin, 224), atol=tolerance, rtol=0)
    landmarks = torch.from_numpy(expected_landmarks((1, 2), 256))
    torch.testing.assert_close(e4e.align_for_e4e(stored, landmarks), e4e.align_for_e4e(exact, landmarks),
                               atol=tolerance, rtol=0)


def _made_from(analyzer, *images, unknown_sizes=False):
    """Face Embed's output for a batch of ``images`` (several: concatenated, as ImageBatch would hand them over);
    ``unknown_sizes``: as loaded from a file saved before image sizes were recorded."""
    faces, _ = backend.embed_faces(analyzer, torch.cat(images), "largest")
    return dataclasses.replace(faces, image_sizes=None) if unknown_sizes else faces


SMALL, LARGE = face_image([(1, 1)]), face_image([(1, 1)], size=256)  # 128x128 and 256x256 px
MISMATCH_ROWS = [
    # (id, face_embeds made from, images given to the encode node, message fragment or None: accepted)
    ("the same images", lambda a: _made_from(a, SMALL, SMALL), torch.cat([SMALL, SMALL]), None),
    ("one image more", lambda a: _made_from(a, SMALL, SMALL), torch.cat([SMALL] * 3),
     "face_embeds were made from 2 images of 128x128 px, but W+ Encode was given 3 images of 128x128 px"),
    ("one image fewer", lambda a: _made_from(a, SMALL, SMALL), SMALL,
     "made from 2 images of 128x128 px, but W+ Encode was given 1 image of 128x128 px"),
    ("another size", lambda a: _made_from(a, SMALL), LARGE,
     "made from 1 image of 128x128 px, but W+ Encode was given 1 image of 256x256 px: their face boxes and "
     "landmarks would fall on the wrong pixels. Run Face Embed on the same images that go into W+ Encode"),
    ("two batches joined by Combine", lambda a: fe.combine([_made_from(a, SMALL), _made_from(a, LARGE)], "concat"),
     torch.cat([SMALL, SMALL]), "made from 2 images (1 of 128x128 px, 1 of 256x256 px), but W+ Encode was given 2 "
     "images of 128x128 px"),
    ("averaged vectors", lambda a: fe.combine([_made_from(a, SMALL)], "norm-mean"), LARGE, None),
    ("old file, images in the batch", lambda a: _made_from(a, SMALL, SMALL, unknown_sizes=True),
     torch.cat([LARGE] * 3), None),
    ("old file, a face of an image not given", lambda a: _made_from(a, SMALL, SMALL, unknown_sizes=True), LARGE,
     "face_embeds hold a face of image 1 (counting from 0; they do not record their images' sizes), but W+ Encode "
     "was given 1 image of 256x256 px"),
]


@pytest.mark.parametrize("faces,images,fragment", [r[1:] for r in MISMATCH_ROWS], ids=[r[0] for r in MISMATCH_ROWS])
def test_face_embeds_of_other_images_are_refused(analyzer, faces, images, fragment):
    """MFF Embed and W+ Encode check face_embeds against their IMAGE (check_made_from) before using the boxes."""
    faces = faces(analyzer)
    if fragment is None:
        fe.check_made_from(faces, rgb_images(images), "W+ Encode")
        return
    with pytest.raises(ImageInputError) as caught:
        fe.check_made_from(faces, rgb_images(images), "W+ Encode")
    assert fragment in str(caught.value)
    assert "connect insightface to W+ Encode in place of face_embeds" in str(caught.value)


@pytest.mark.parametrize(
    "mask,message",
    [
        (torch.full((1, 64, 64), float("nan")), "NaN or infinite"),
        (torch.full((64, 64), float("inf")), "NaN or infinite"),
        (torch.zeros(0, 64, 64), r"at least one pixel, got shape \(0, 64, 64\)"),
        (torch.zeros(1, 64, 0), "at least one pixel"),
        (torch.zeros(64), r"\[batch, height, width\].*got shape \(64,\)"),
        (torch.zeros(1, 64, 64, 3), r"got shape \(1, 64, 64, 3\)"),  # an IMAGE wired in
        ("not a mask", "got str"),
    ],
)
def test_bad_attn_masks(mask, message):
    """Apply IDAdapter's and Apply W+ Adapter's attn_mask, checked when the node runs (the batch count is checked
    at sampling: test_idadapter_patch.py, test_wplus_patch.py)."""
    with pytest.raises(ImageInputError, match=message):
        shared.check_attn_mask(mask)


def test_rgba_and_grey_images_convert(analyzer):
    rgb = face_image([(1, 1)])
    rgba = torch.cat([rgb, torch.rand(1, 128, 128, 1)], dim=-1)
    grey = rgb.mean(dim=-1, keepdim=True)
    ref, _ = backend.embed_faces(analyzer, rgb)
    with_alpha, _ = backend.embed_faces(analyzer, rgba)
    torch.testing.assert_close(with_alpha.embeds, ref.embeds)
    from_grey, _ = backend.embed_faces(analyzer, grey)
    torch.testing.assert_close(from_grey.boxes, ref.boxes)
    bgr = to_bgr_uint8(torch.tensor([[[[1.0, 0.5, 0.0]] * 32] * 32]))[0]
    assert bgr[0, 0].tolist() == [0, 128, 255]  # channel order reversed for OpenCV


def test_missing_pack_folder_names_the_exact_path(tmp_path):
    root = str(tmp_path)
    with pytest.raises(ModelFolderError, match=f"expected its .onnx files in {os.path.join(root, 'models', 'antelopev2')}"):
        backend.find_pack_dir([root], "antelopev2")


def test_double_nested_pack_says_where_to_move_files(tmp_path):
    root = str(tmp_path)
    nested = make_pack(os.path.join(root, "models", "antelopev2"), "antelopev2")  # .../models/antelopev2/models/antelopev2
    inner = os.path.join(root, "models", "antelopev2", "antelopev2")
    shutil.move(nested, inner)
    with pytest.raises(ModelFolderError, match=f"found them in {inner}; move them up into {os.path.join(root, 'models', 'antelopev2')}"):
        backend.find_pack_dir([root], "antelopev2")


def test_pack_without_models_level(tmp_path):
    root = str(tmp_path)
    shutil.move(make_pack(root, "buffalo_l"), os.path.join(root, "buffalo_l"))
    with pytest.raises(ModelFolderError, match="must be at .*models.buffalo_l"):
        backend.find_pack_dir([root], "buffalo_l")


def test_empty_pack_folder_and_bad_names(tmp_path):
    os.makedirs(tmp_path / "models" / "antelopev2")
    with pytest.raises(ModelFolderError, match="has no .onnx files.*glintr100.onnx"):
        backend.find_pack_dir([str(tmp_path)], "antelopev2")
    with pytest.raises(ModelFolderError, match="invalid insightface pack name"):
        backend.find_pack_dir([str(tmp_path)], "../x")


def test_missing_detector_or_recognizer(tmp_path):
    no_det = make_pack(str(tmp_path), "nodet", detector=False)
    with pytest.raises(ModelFolderError, match=r"no face detector in .*nodet.*\['rec.onnx'\]"):
        backend.load_analyzer(no_det, "CPU")
    no_rec = make_pack(str(tmp_path), "norec", recognizer=False)
    with pytest.raises(ModelFolderError, match=r"no ArcFace recognizer in .*norec.*\['det.onnx'\]"):
        backend.load_analyzer(no_rec, "CPU")


def test_corrupt_onnx_in_pack(tmp_path):
    pack = make_pack(str(tmp_path), "broken")
    with open(os.path.join(pack, "rec.onnx"), "r+b") as f:
        f.truncate(300)
    with pytest.raises(ModelFileError, match="corrupt or incompletely downloaded"):
        backend.load_analyzer(pack, "CPU")


@contextlib.contextmanager
def released_if_opened(fifo, seconds=20.0):
    """Opening ``fifo`` for reading blocks until a writer comes: if the code under test does that, a writer comes
    after ``seconds`` and the list this yields records it, so the test fails instead of hanging."""
    released = []

    def release():
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.lstat(fifo).st_mode):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # fails (ENXIO) unless a reader waits
                released.append(fifo)

    timer = threading.Timer(seconds, release)
    timer.start()
    try:
        yield released
    finally:
        timer.cancel()


NOT_A_REGULAR_FILE = [
    # (id, what makes the path, what the message says it is)
    ("symlink-to-dev-zero", lambda path: os.symlink("/dev/zero", path),
     "is not a regular file: it is a symbolic link to '/dev/zero', which is a character device (never opened"),
    ("fifo", os.mkfifo, "is not a regular file: it is a named pipe (FIFO) (never opened"),
    ("folder", os.mkdir, "is not a regular file: it is a folder;"),
    ("dangling-symlink", lambda path: os.symlink(path + ".gone", path),
     "is a dangling symbolic link: it points to '{path}.gone', which does not exist"),
]


@pytest.mark.skipif(os.name != "posix", reason="FIFOs, /dev/zero and symbolic links as POSIX has them")
@pytest.mark.parametrize("make,what", [c[1:] for c in NOT_A_REGULAR_FILE], ids=[c[0] for c in NOT_A_REGULAR_FILE])
def test_pack_file_that_is_not_a_regular_file_is_named_and_never_opened(tmp_path, make, what):
    pack = make_pack(str(tmp_path), "odd")
    rec = os.path.join(pack, "rec.onnx")
    os.remove(rec)
    make(rec)
    with released_if_opened(rec) as released, pytest.raises(ModelFileError) as caught:
        backend.load_analyzer(pack, "CPU")
    assert not released, "rec.onnx was opened for reading"
    message = str(caught.value)
    assert message.startswith(f"face model {rec} "), message
    assert what.format(path=rec) in message and "Download the pack again" in message, message


def test_list_packs(insightface_root, tmp_path):
    assert backend.list_packs([insightface_root, str(tmp_path / "absent")]) == ["tinypack"]


def test_unavailable_provider_names_the_install_command():
    with pytest.raises(MissingDependencyError, match="CUDA .*not in this onnxruntime build.*onnxruntime-gpu"):
        backend.resolve_providers("CUDA")
    assert backend.resolve_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="provider must be one of"):
        backend.resolve_providers("TPU")


def test_missing_insightface_names_the_install_command(monkeypatch, insightface_root):
    monkeypatch.setitem(sys.modules, "insightface", None)
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(MissingDependencyError, match="pip install insightface onnxruntime"):
        backend.load_analyzer(os.path.join(insightface_root, "models", "tinypack"))


def test_face_embed_refuses_what_is_not_an_insightface_model():
    with pytest.raises(PackError, match="expected an INSIGHTFACE model from Load InsightFace, got str"):
        backend.embed_faces("not a model", torch.rand(1, 64, 64, 3))
