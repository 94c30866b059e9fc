"""Bad images, model folders and installs: each a clear error, never a crash."""

import contextlib
import os
import shutil
import stat
import sys
import threading

import pytest
import torch

from comfyui_idadapter.nodes.errors import (ConfigError, ImageInputError, MissingDependencyError, ModelFileError,
                                            ModelFolderError, PackError)
from comfyui_idadapter.nodes.face import insightface_backend as backend
from comfyui_idadapter.nodes.face.images import to_bgr_uint8
from tiny_face_models import face_image, make_pack


@pytest.mark.parametrize(
    "image,message",
    [
        (torch.zeros(0, 64, 64, 3), "batch is empty"),
        (torch.zeros(1, 64, 64, 2), "2 channels"),
        (torch.zeros(64, 64), r"\[batch, height, width, channels\]"),
        (torch.zeros(1, 8, 200, 3), "200x8 px; face detection needs at least 32x32"),
        (torch.full((1, 64, 64, 3), float("nan")), "NaN"),
        ("not an image", "expected an IMAGE tensor"),
    ],
)
def test_bad_images(image, message):
    with pytest.raises(ImageInputError, match=message):
        to_bgr_uint8(image)


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
