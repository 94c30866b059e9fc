"""Which ArcFace recognizer made the identity vectors is recorded (FACE_EMBEDS, idadapter/1 files, the trainer's face
cache) and checked (Face Embeds Combine, IDAdapter MFF Embed, the trainer's --arcface): vectors of two recognizers
lie in different 512-d spaces."""

import hashlib
import json
import logging
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_idadapter.nodes.arch import idadapter as ida
from comfyui_idadapter.nodes.arch.face_embeds import FaceEmbeds, combine, load_face_embeds, save_face_embeds
from comfyui_idadapter.nodes.arch.files import file_fingerprint, same_weights
from comfyui_idadapter.nodes.errors import ConfigError, ModelFileError
from comfyui_idadapter.nodes.face import insightface_backend as backend
from idadapter_helpers import tiny_adapter
from tiny_face_models import face_image, make_pack, make_recognizer, random_iresnet

GLINT = "glintr100.onnx:0123456789abcdef"
GLINT_RENAMED = "my_arcface.onnx:0123456789abcdef"  # the same bytes under another name
BUFFALO = "w600k_r50.onnx:fedcba9876543210"


def test_fingerprint_is_the_file_name_and_its_content_hash(tmp_path):
    path = tmp_path / "rec.onnx"
    path.write_bytes(b"weights one")
    first = file_fingerprint(str(path))
    assert first == "rec.onnx:" + hashlib.sha256(b"weights one").hexdigest()[:16]
    assert file_fingerprint(str(path)) == first
    copy = tmp_path / "renamed.onnx"
    shutil.copyfile(path, copy)
    renamed = file_fingerprint(str(copy))
    assert renamed.startswith("renamed.onnx:") and same_weights(renamed, first)
    path.write_bytes(b"weights two!")  # same size: the new mtime makes it hashed again
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(copy).st_mtime_ns + 10**9))
    second = file_fingerprint(str(path))
    assert second == "rec.onnx:" + hashlib.sha256(b"weights two!").hexdigest()[:16]
    assert not same_weights(first, second)


def test_face_embed_records_the_analyzers_recognizer(analyzer, insightface_root):
    embeds, _ = backend.embed_faces(analyzer, face_image([(1, 2)]))
    expected = file_fingerprint(os.path.join(insightface_root, "models", "tinypack", "rec.onnx"))
    assert re.fullmatch(r"rec\.onnx:[0-9a-f]{16}", expected)
    assert embeds.recognizer == expected
    empty, _ = backend.embed_faces(analyzer, face_image([]), on_no_face="skip")
    assert len(empty) == 0 and empty.recognizer == expected


def _faces(vector, recognizer):
    return FaceEmbeds(torch.nn.functional.normalize(torch.tensor([vector]), dim=-1), recognizer=recognizer)


def test_combine_keeps_the_common_recognizer_and_refuses_two():
    one, two = _faces([1.0, 0.0], GLINT), _faces([0.0, 1.0], GLINT)
    assert combine([one, two], "norm-mean").recognizer == GLINT
    assert combine([one, None, two], "concat").recognizer == GLINT
    assert combine([one, _faces([0.0, 1.0], GLINT_RENAMED)], "mean").recognizer == GLINT
    assert combine([one, _faces([0.0, 1.0], "")], "mean").recognizer == ""  # a vector of unknown origin: unknown
    with pytest.raises(ModelFileError, match=re.escape(f"made by two ArcFace recognizers, {GLINT} and {BUFFALO}")):
        combine([one, two, _faces([1.0, 1.0], BUFFALO)], "concat")


def test_saved_recognizer_loads_back_and_older_files_are_unknown(tmp_path):
    path = str(tmp_path / "me.safetensors")
    save_face_embeds(_faces([1.0, 2.0], GLINT), path)
    assert load_face_embeds(path).recognizer == GLINT
    older = str(tmp_path / "older.safetensors")
    save_file({"embeds": torch.ones(1, 512)}, older, metadata={"format": "face_embeds/1"})
    assert load_face_embeds(older).recognizer == ""


@pytest.mark.parametrize("value,shown", [("x" * 1000, r"'x{40}'\.\.\. \(1000 characters\)"),
                                         ("rec.onnx:\n0123", r"'rec.onnx:\\n0123'")])
def test_an_implausible_recognizer_is_refused(tmp_path, value, shown):
    path = str(tmp_path / "bad.safetensors")
    save_file({"embeds": torch.ones(1, 512)}, path, metadata={"format": "face_embeds/1", "recognizer": value})
    with pytest.raises(ModelFileError, match=f"recognizer must be a file fingerprint .*got {shown}"):
        load_face_embeds(path)
    weights = tiny_adapter()
    adapter_path = str(tmp_path / "ida.safetensors")
    ida.save_idadapter(ida.IDAdapterWeights(weights.adapter, weights.kv_deltas, value), adapter_path)
    with pytest.raises(ModelFileError, match=f"recognizer must be a file fingerprint .*got {shown}.*export it again"):
        ida.load_idadapter(adapter_path)


def test_idadapter_file_records_the_recognizer_and_older_files_load_as_unknown(tmp_path):
    weights = tiny_adapter()
    path = str(tmp_path / "ida.safetensors")
    ida.save_idadapter(ida.IDAdapterWeights(weights.adapter, weights.kv_deltas, GLINT), path)
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["recognizer"] == GLINT and "recognizer" not in json.loads(meta["config"])
    assert ida.load_idadapter(path).recognizer == GLINT
    older = str(tmp_path / "older.safetensors")
    save_file(tensors, older, metadata={k: v for k, v in meta.items() if k != "recognizer"})
    assert ida.load_idadapter(older).recognizer == ""


def test_mff_embed_check_refuses_another_recognizer_and_warns_when_one_is_unknown(caplog):
    with caplog.at_level(logging.WARNING, logger=ida.__name__):
        ida.check_same_recognizer(GLINT, GLINT)
        ida.check_same_recognizer(GLINT, GLINT_RENAMED)
        assert not caplog.records
        with pytest.raises(ModelFileError, match=re.escape(
                f"trained on ArcFace vectors from {GLINT}; the face embeds come from {BUFFALO}, another recognizer")
                + r".*pick the antelopev2 pack \(its recognizer is glintr100\.onnx\) and run Face Embed again"):
            ida.check_same_recognizer(GLINT, BUFFALO)
        with pytest.raises(ModelFileError, match=r"pick the insightface pack whose recognizer is rec\.onnx and"):
            ida.check_same_recognizer("rec.onnx:1111111111111111", BUFFALO)
        assert not caplog.records
        ida.check_same_recognizer("", BUFFALO)
        ida.check_same_recognizer(GLINT, "")
        ida.check_same_recognizer("", "")
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 3
    messages = [r.getMessage() for r in caplog.records]
    assert "the IDAdapter file does not record it" in messages[0]
    assert "the face_embeds input does not record it" in messages[1]
    assert "the IDAdapter file and the face_embeds input do not record it" in messages[2]


def test_face_cache_made_by_another_recognizer_is_not_used(tmp_path):
    from comfyui_idadapter.training import data, tiny

    dataset = tiny.make_synthetic_dataset(str(tmp_path / "data"), 2, 2, size=64, seed=5)
    first_pack = make_pack(str(tmp_path / "first"), "pack")
    other_pack = make_pack(str(tmp_path / "other"), "pack", recognizer=False)
    make_recognizer(os.path.join(other_pack, "rec.onnx"), seed=1)

    def vectors(pack, cache):
        identities, _ = data.scan_dataset(dataset, backend.load_analyzer(pack, "CPU"), str(tmp_path / cache),
                                          log=lambda *a: None)
        return torch.stack([image.embedding for identity in identities for image in identity.images])

    first = vectors(first_pack, "cache")
    assert torch.equal(vectors(first_pack, "cache"), first)  # read back from the cache
    other = vectors(other_pack, "cache")
    torch.testing.assert_close(other, vectors(other_pack, "fresh_cache"))
    assert (other - first).abs().max() > 0.1  # embedded again, not the first recognizer's cached vectors


def test_trainer_refuses_an_arcface_with_other_weights_than_the_packs(tmp_path):
    pytest.importorskip("diffusers")
    from comfyui_idadapter.training.idadapter_models import load_face_models

    pack = make_pack(str(tmp_path / "insightface"), "antelopev2")  # rec.onnx holds random_iresnet(0)
    same_weights_pth = str(tmp_path / "backbone.pth")
    torch.save(random_iresnet(0).state_dict(), same_weights_pth)
    _, arcface = load_face_models(pack, same_weights_pth, provider="CPU")
    assert not arcface.fused  # the .pth asked for (BatchNorm unfused), not the pack's .onnx
    _, default = load_face_models(pack, provider="CPU")
    assert default.fused
    other = make_recognizer(str(tmp_path / "other.onnx"), seed=1)
    with pytest.raises(ConfigError, match=re.escape(f"--arcface {other} holds other weights than the insightface "
                                                    f"pack's recognizer {os.path.join(pack, 'rec.onnx')}")):
        load_face_models(pack, other, provider="CPU")
