import json

import pytest
import torch
from safetensors.torch import save_file

from comfyui_idadapter.nodes.arch.face_embeds import FaceEmbeds, combine, load_face_embeds, save_face_embeds
from comfyui_idadapter.nodes.errors import ConfigError, ModelFileError, NoFaceError


def _embeds(vectors, with_geometry=True, first_image=0):
    e = torch.nn.functional.normalize(torch.tensor(vectors, dtype=torch.float32), dim=-1)
    if not with_geometry:
        return FaceEmbeds(e)
    n = e.shape[0]
    return FaceEmbeds(e, torch.arange(n * 4.0).reshape(n, 4), torch.ones(n, 5, 2), torch.full((n,), 0.9),
                      torch.arange(first_image, first_image + n))


def test_mean_norm_mean_and_concat():
    a = _embeds([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b = _embeds([[0.0, 0.0, 1.0]])
    mean = combine([a, b], "mean")
    torch.testing.assert_close(mean.embeds, torch.full((1, 3), 1 / 3))
    assert not mean.has_geometry
    norm_mean = combine([a, b], "norm-mean")
    torch.testing.assert_close(norm_mean.embeds, torch.full((1, 3), 3 ** -0.5))
    both = combine([a, None, b], "concat")
    assert len(both) == 3 and both.has_geometry
    torch.testing.assert_close(both.embeds[2], torch.tensor([0.0, 0.0, 1.0]))
    assert both.image_index.tolist() == [0, 1, 0]
    assert not combine([a, _embeds([[1.0, 1.0, 0.0]], with_geometry=False)], "concat").has_geometry


def test_combine_errors():
    a = _embeds([[1.0, 0.0]])
    with pytest.raises(ModelFileError, match="different sizes"):
        combine([a, _embeds([[1.0, 0.0, 0.0]])], "mean")
    with pytest.raises(NoFaceError, match="every FACE_EMBEDS input is empty"):
        combine([FaceEmbeds(torch.zeros(0, 512))], "mean")
    with pytest.raises(ConfigError, match="combine mode"):
        combine([a], "median")


def test_save_load_round_trip(tmp_path):
    original = _embeds([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    path = str(tmp_path / "sub" / "me.safetensors")
    save_face_embeds(original, path)
    loaded = load_face_embeds(path)
    for name in ("embeds", "boxes", "landmarks", "scores", "image_index"):
        torch.testing.assert_close(getattr(loaded, name), getattr(original, name))
    averaged = combine([original], "norm-mean")
    save_face_embeds(averaged, path)
    again = load_face_embeds(path)
    torch.testing.assert_close(again.embeds, averaged.embeds)
    assert not again.has_geometry
    assert not list(tmp_path.glob("sub/*.tmp"))  # written atomically


def _write(path, tensors, fmt="face_embeds/1"):
    save_file(tensors, str(path), metadata={"format": fmt} if fmt else None)
    return str(path)


@pytest.mark.parametrize(
    "tensors,fmt,message",
    [
        ({"embeds": torch.zeros(2, 512)}, "idadapter/1", "format 'idadapter/1', expected 'face_embeds/1'"),
        ({"embeds": torch.zeros(2, 512)}, None, "format None"),
        ({"embeds": torch.zeros(512)}, "face_embeds/1", r"\[faces, dim\] tensor, got \(512,\)"),
        ({"vectors": torch.zeros(1, 512)}, "face_embeds/1", "no 'embeds' tensor"),
        ({"embeds": torch.zeros(2, 512), "boxes": torch.zeros(3, 4), "landmarks": torch.zeros(2, 5, 2),
          "scores": torch.zeros(2), "image_index": torch.zeros(2)}, "face_embeds/1", r"boxes has shape \(3, 4\)"),
        ({"embeds": torch.zeros(2, 512), "boxes": torch.zeros(2, 4)}, "face_embeds/1", "geometry is partial"),
        ({"embeds": torch.full((1, 512), float("nan"))}, "face_embeds/1", "NaN"),
        ({"embeds": torch.zeros(1, 512), "extra": torch.zeros(1)}, "face_embeds/1", r"unexpected tensors \['extra'\]"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, tensors, fmt, message):
    path = _write(tmp_path / "bad.safetensors", tensors, fmt)
    with pytest.raises(ModelFileError, match=message):
        load_face_embeds(path)


def test_corrupt_and_pickle_files_are_rejected(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(json.dumps({"embeds": 1}).encode() * 3)
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_face_embeds(str(corrupt))
    pickled = tmp_path / "old.safetensors"
    torch.save({"embeds": torch.zeros(1, 512)}, pickled)
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_face_embeds(str(pickled))
    with pytest.raises(ModelFileError, match="not found"):
        load_face_embeds(str(tmp_path / "absent.safetensors"))
