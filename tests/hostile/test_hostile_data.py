"""Hostile and careless inputs (issue 10, items 3, 9 and 10), table-driven: each row is a setup, what must come of
it (an error class, or an entry in the dataset report) and a fragment of the message or report."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from torch import nn

from comfyui_idadapter.nodes.arch import iresnet
from comfyui_idadapter.nodes.arch.onnx_files import model_tensors
from comfyui_idadapter.nodes.errors import ImageInputError, ModelFileError
from comfyui_idadapter.nodes.face import insightface_backend as backend
from comfyui_idadapter.training import data, tiny
from tiny_face_models import face_image, make_detector, make_recognizer

onnx = pytest.importorskip("onnx")


# ---------------------------------------------------------------------------------------------------------
# item 3: ONNX external data is never read, by the torch importer or by insightface/onnxruntime


def _with_external_data(model_path: str, location: str | None = None, symlink_to: str | None = None) -> None:
    """Re-saves ``model_path`` with every tensor in ``weights.bin`` beside it, then points the tensors' ``location``
    at ``location`` (the data moved there, so a reader would find it), or makes weights.bin a link to
    ``symlink_to`` (the data moved there)."""
    folder = os.path.dirname(model_path)
    onnx.save_model(onnx.load(model_path), model_path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0, convert_attribute=True)
    data_file = os.path.join(folder, "weights.bin")
    if symlink_to is not None:
        os.makedirs(os.path.dirname(symlink_to), exist_ok=True)
        os.replace(data_file, symlink_to)
        os.symlink(symlink_to, data_file)
    if location is not None:
        if not os.path.isabs(location):
            target = os.path.normpath(os.path.join(folder, location))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(data_file, target)
        model = onnx.load(model_path, load_external_data=False)
        for tensor in model_tensors(model):  # initializers and Constant nodes' tensors
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        with open(model_path, "wb") as f:
            f.write(model.SerializeToString())


ONNX_ROWS = [
    # (id, file given external data, how, message fragment)
    ("location ../secret", "rec.onnx", dict(location="../secret/weights.bin"), "'../secret/weights.bin'"),
    ("absolute location", "rec.onnx", dict(location="/etc/passwd"), "'/etc/passwd'"),
    ("symlinked data file", "rec.onnx", dict(symlink_to="OUTSIDE/weights.bin"), "'weights.bin'"),
    ("data file inside the folder", "rec.onnx", dict(), "'weights.bin'"),
    ("detector with external data", "det.onnx", dict(location="../../det-data.bin"), "'../../det-data.bin'"),
]


@pytest.mark.parametrize("file,how,fragment", [r[1:] for r in ONNX_ROWS], ids=[r[0] for r in ONNX_ROWS])
def test_onnx_external_data_is_refused_by_both_routes(tmp_path, file, how, fragment):
    pack = os.path.join(tmp_path, "models", "pack")
    make_detector(os.path.join(pack, "det.onnx"))
    make_recognizer(os.path.join(pack, "rec.onnx"))
    if "symlink_to" in how:
        how = dict(symlink_to=str(tmp_path / "outside" / "weights.bin"))
    path = os.path.join(pack, file)
    _with_external_data(path, **how)
    message = re.escape(path) + " keeps tensor data in separate files .*" + re.escape(fragment)
    with pytest.raises(ModelFileError, match=message + ".*antelopev2, buffalo_l"):
        iresnet.load_arcface(path)  # the torch importer (onnx.load + numpy_helper)
    with pytest.raises(ModelFileError, match=message):
        backend.load_analyzer(pack, "CPU")  # before insightface/onnxruntime open the file


# ---------------------------------------------------------------------------------------------------------
# item 10: face models whose inputs insightface cannot feed, and image geometry


class _Recognizer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, 512)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def _recognizer(channels=3, size=112, batch=1, dynamic_batch=True):
    def setup(pack):
        example = torch.zeros(batch, channels, size, size)
        tiny.export_onnx(_Recognizer(channels), os.path.join(pack, "rec.onnx"), example,
                         dynamic_batch=dynamic_batch)
        make_detector(os.path.join(pack, "det.onnx"))
    return setup


def _detector(channels=3, size=128):
    def setup(pack):
        tiny.export_onnx(tiny.TinySCRFD(), os.path.join(pack, "det.onnx"), torch.zeros(1, channels, size, size))
        make_recognizer(os.path.join(pack, "rec.onnx"))
    return setup


FACE_MODEL_ROWS = [
    # (id, setup, expected error class or None (loads and finds the face), message fragment)
    ("recognizer with 1 channel", _recognizer(channels=1), ModelFileError,
     r"rec.onnx: this ArcFace recognizer takes input \[batch, 1, 112, 112\]: 1 channel\(s\) instead of 3 .*; "
     r"expected \[batch, 3, 112, 112\]"),
    ("recognizer 3x96x96", _recognizer(size=96), ModelFileError,
     r"no ArcFace recognizer in .*a recognizer takes input \[batch, 3, 112, 112\].*"
     r"\(rec[.]onnx \[batch, 3, 96, 96\]\)"),
    ("recognizer with a fixed batch of 4", _recognizer(batch=4, dynamic_batch=False), ModelFileError,
     r"rec.onnx: this ArcFace recognizer takes input \[4, 3, 112, 112\]: a fixed batch of 4"),
    ("detector with 1 channel", _detector(channels=1), ModelFileError,
     r"det.onnx: this face detector takes input \[1, 1, 128, 128\]: 1 channel\(s\) instead of 3 .*; "
     r"expected \[batch, 3, height, width\]"),
    ("detector fixed at 100x100", _detector(size=100), ModelFileError,
     r"det.onnx: this face detector takes input \[1, 3, 100, 100\]: a fixed size that is not a multiple of 32"),
    ("detector fixed at 320x320, det_size 640", _detector(size=320), None, ""),  # insightface runs it at 320
]


@pytest.mark.parametrize("setup,error,fragment", [r[1:] for r in FACE_MODEL_ROWS], ids=[r[0] for r in FACE_MODEL_ROWS])
def test_face_model_input_shapes_are_checked_when_loading(tmp_path, setup, error, fragment):
    pack = os.path.join(tmp_path, "models", "pack")
    os.makedirs(pack)
    setup(pack)
    if error is None:
        analyzer = backend.load_analyzer(pack, "CPU", 640)
        embeds, _ = backend.embed_faces(analyzer, face_image([(1, 1)]))
        assert len(embeds) == 1
        return
    with pytest.raises(error, match=fragment.replace("rec.onnx", re.escape(os.path.join(pack, "rec.onnx")))
                       .replace("det.onnx", re.escape(os.path.join(pack, "det.onnx")))):
        backend.load_analyzer(pack, "CPU", 640)


IMAGE_ROWS = [
    # (id, IMAGE, expected error class, message fragment)
    ("10000x20", torch.zeros(1, 20, 10000, 3), ImageInputError, "10000x20 px; face detection needs at least 32x32"),
    ("5x4000", torch.zeros(1, 4000, 5, 3), ImageInputError, "5x4000 px; face detection needs at least 32x32"),
    ("10000x40", torch.zeros(1, 40, 10000, 3), ImageInputError,
     "10000x40 px, an aspect ratio of 250:1; face detection accepts at most 16:1"),
    ("40x4000", torch.zeros(1, 4000, 40, 3), ImageInputError, "40x4000 px, an aspect ratio of 100:1"),
    ("9000x9000 (81 megapixels)", torch.zeros(1, 1, 1, 3).expand(1, 9000, 9000, 3), ImageInputError,
     "9000x9000 px \\(81 megapixels\\); face detection accepts at most 67 megapixels"),
]


@pytest.mark.parametrize("image,error,fragment", [r[1:] for r in IMAGE_ROWS], ids=[r[0] for r in IMAGE_ROWS])
def test_image_geometry_is_checked_before_detection(analyzer, image, error, fragment):
    with pytest.raises(error, match=fragment):
        backend.embed_faces(analyzer, image)


def test_a_wide_but_acceptable_image_is_searched(analyzer):
    image = torch.zeros(1, 128, 128 * 16, 3)
    image[:, :, :128] = face_image([(1, 1)])
    embeds, _ = backend.embed_faces(analyzer, image, on_no_face="skip")
    assert len(embeds) <= 1  # searched (at 16:1 the tiny detector may or may not still see the face), no error


# ---------------------------------------------------------------------------------------------------------
# item 9: dataset scan — skipped and listed in the report, the cache rebuilt, never a traceback


def _symlink(target, *link):
    def setup(root, cache, analyzer):
        os.symlink(target, os.path.join(root, *link))
    return setup


def _metadata_line(line: bytes, identity="id000"):
    def setup(root, cache, analyzer):
        with open(os.path.join(root, identity, "metadata.jsonl"), "ab") as f:
            f.write(line + b"\n")
    return setup


def _class_noun(content: bytes):
    def setup(root, cache, analyzer):
        with open(os.path.join(root, "id000", "class_noun.txt"), "wb") as f:
            f.write(content)
    return setup


def _cache(damage):
    def setup(root, cache, analyzer):
        data.scan_dataset(root, analyzer, cache, log=lambda *a: None)  # a good cache first
        damage(os.path.join(cache, "faces.safetensors"))
    return setup


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _write(content: bytes):
    def damage(path):
        with open(path, "wb") as f:
            f.write(content)
    return damage


def _index(index: str):
    def damage(path):
        from safetensors.torch import save_file

        save_file({"boxes": torch.zeros(1, 4), "landmarks": torch.zeros(1, 5, 2), "embeddings": torch.zeros(1, 512)},
                  path, metadata={"format": data.CACHE_FORMAT, "index": index})
    return damage


CACHE = "<cache>"
line3 = os.path.join("id000", "metadata.jsonl") + " line 3"

DATASET_ROWS = [
    # (id, setup, expected report reason, item listed under it)
    ("dangling image symlink", _symlink("nowhere.png", "id000", "ghost.png"),
     "broken symbolic link (its target does not exist)", os.path.join("id000", "ghost.png")),
    ("image symlink loop", _symlink("loop.png", "id000", "loop.png"), "symbolic link loop",
     os.path.join("id000", "loop.png")),
    ("dangling identity folder", _symlink("/nonexistent/identity", "gone"),
     "broken symbolic link (its target does not exist)", "gone"),
    ("identity folder symlink loop", _symlink("selfloop", "selfloop"), "symbolic link loop", "selfloop"),
    ("metadata line [1,2]", _metadata_line(b"[1, 2]"), data.METADATA_NOT_ENTRY, line3),
    ('metadata line "x"', _metadata_line(b'"x"'), data.METADATA_NOT_ENTRY, line3),
    ("metadata line without file_name", _metadata_line(b'{"caption": "a"}'), data.METADATA_NOT_ENTRY, line3),
    ("metadata line not JSON", _metadata_line(b"{file_name: img00.png"), data.METADATA_NOT_JSON, line3),
    ("metadata line not UTF-8", _metadata_line(b'{"file_name": "img01.png", "caption": "caf\xe9"}'),
     data.METADATA_NOT_UTF8, line3),
    ("class_noun.txt not UTF-8", _class_noun(b"femme \xe0 lunettes\n"), 'class_noun.txt not UTF-8 text ("person" used)',
     os.path.join("id000", "class_noun.txt")),
    ("face cache truncated", _cache(_truncate), "corrupt face cache, rebuilt (SafetensorError)", CACHE),
    ("face cache not safetensors", _cache(_write(b"PK\x03\x04 a zip, not a cache")),
     "corrupt face cache, rebuilt (SafetensorError)", CACHE),
    ("face cache index not JSON", _cache(_index("{broken")), "corrupt face cache, rebuilt (JSONDecodeError)", CACHE),
    ("face cache index a list", _cache(_index("[1, 2]")), "corrupt face cache, rebuilt (ValueError)", CACHE),
    ("face cache row out of range",
     _cache(_index(json.dumps({os.path.join("id000", "img00.png"): {"stamp": "1-1", "row": 7}}))),
     "corrupt face cache, rebuilt (ValueError)", CACHE),
]


@pytest.mark.parametrize("setup,reason,item", [r[1:] for r in DATASET_ROWS], ids=[r[0] for r in DATASET_ROWS])
def test_dataset_scan_skips_and_reports(tmp_path, analyzer, setup, reason, item):
    root = tiny.make_synthetic_dataset(str(tmp_path / "ds"), 2, 2, size=64, seed=3)
    cache = str(tmp_path / "cache")
    setup(root, cache, analyzer)
    logged = []
    identities, report = data.scan_dataset(root, analyzer, cache, log=logged.append)
    item = os.path.join(cache, "faces.safetensors") if item == CACHE else item
    assert report.skipped[reason] == [item], report.summary()
    assert f"({reason}): {item}" in logged[0]
    # everything else still usable: both identities, all four images, the good captions kept
    assert [i.name for i in identities] == ["id000", "id001"] and report.images == 4
    assert all(image.caption in tiny.CAPTIONS for identity in identities for image in identity.images)
    # and the cache written by this scan is sound: a second scan reads it without detecting or reporting it
    def no_detection(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    original, backend.embed_faces = backend.embed_faces, no_detection
    try:
        _, again = data.scan_dataset(root, analyzer, cache, log=lambda *a: None)
    finally:
        backend.embed_faces = original
    assert not any("face cache" in r for r in again.skipped)
