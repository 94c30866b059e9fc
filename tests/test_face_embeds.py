import json

import pytest
import torch
from safetensors.torch import save_file

from comfyui_idadapter.nodes.arch.face_embeds import (FaceEmbeds, check_made_from, combine, load_face_embeds,
                                                      save_face_embeds)
from comfyui_idadapter.nodes.errors import ConfigError, ImageInputError, ModelFileError, NoFaceError


def _embeds(vectors, with_geometry=True, first_image=0, image_sizes=None):
    e = torch.nn.functional.normalize(torch.tensor(vectors, dtype=torch.float32), dim=-1)
    if not with_geometry:
        return FaceEmbeds(e)
    n = e.shape[0]
    return FaceEmbeds(e, torch.arange(n * 4.0).reshape(n, 4), torch.ones(n, 5, 2), torch.full((n,), 0.9),
                      torch.arange(first_image, first_image + n), image_sizes=image_sizes)


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
    assert both.image_index.tolist() == [0, 1, 2]  # b's image follows a's two, as if the batches were joined
    assert both.image_sizes is None  # a and b do not record their images' sizes
    assert not combine([a, _embeds([[1.0, 1.0, 0.0]], with_geometry=False)], "concat").has_geometry


def test_concat_joins_the_image_sizes():
    """concat describes the joined image batches: indexes past the previous inputs' images (faceless ones counted)
    and their sizes in order, so the encode nodes can check them; averaging describes no image."""
    a = _embeds([[1.0, 0.0, 0.0]], first_image=1, image_sizes=((64, 48), (64, 48), (64, 48)))  # images 0, 2: no face
    b = _embeds([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], image_sizes=((32, 32), (32, 32)))
    both = combine([a, b], "concat")
    assert both.image_index.tolist() == [1, 3, 4]
    assert both.image_sizes == ((64, 48),) * 3 + ((32, 32),) * 2
    with pytest.raises(ImageInputError, match=r"made from 5 images \(3 of 48x64 px, 2 of 32x32 px\), but W\+ "
                       r"Encode was given 5 images of 48x64 px"):
        check_made_from(both, torch.zeros(5, 64, 48, 3), "W+ Encode")
    assert combine([a, _embeds([[0.0, 1.0, 0.0]])], "concat").image_sizes is None  # one input's are unknown
    assert combine([a, b], "norm-mean").image_sizes is None


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
    assert loaded.image_sizes is None
    sized = _embeds([[1.0, 2.0, 3.0]], first_image=1, image_sizes=((512, 384), (600, 800)))
    save_face_embeds(sized, path)
    assert load_face_embeds(path).image_sizes == ((512, 384), (600, 800))
    averaged = combine([original], "norm-mean")
    save_face_embeds(averaged, path)
    again = load_face_embeds(path)
    torch.testing.assert_close(again.embeds, averaged.embeds)
    assert not again.has_geometry
    assert not list(tmp_path.glob("sub/*.tmp"))  # written atomically


def test_file_saved_before_image_sizes_were_recorded_loads(tmp_path):
    """Exactly what Save Face Embeds wrote before the image sizes: the faces load with their sizes unknown, and the
    encode nodes still refuse a face of an image they were not given."""
    embeds = torch.nn.functional.normalize(torch.rand(2, 512), dim=-1)
    tensors = {"embeds": embeds, "boxes": torch.tensor([[10.0, 10, 50, 50], [5, 5, 40, 40]]),
               "landmarks": torch.rand(2, 5, 2) * 40, "scores": torch.tensor([0.9, 0.8]),
               "image_index": torch.tensor([0, 1])}
    path = str(tmp_path / "old.safetensors")
    save_file(tensors, path, metadata={"format": "face_embeds/1", "faces": "2", "dim": "512", "geometry": "true",
                                       "recognizer": "glintr100.onnx:0123456789abcdef"})
    old = load_face_embeds(path)
    assert old.image_sizes is None and old.image_index.tolist() == [0, 1]
    torch.testing.assert_close(old.boxes, tensors["boxes"])
    check_made_from(old, torch.zeros(2, 64, 64, 3), "MFF Embed")
    with pytest.raises(ImageInputError, match="a face of image 1 .*but MFF Embed was given 1 image of 64x64 px"):
        check_made_from(old, torch.zeros(1, 64, 64, 3), "MFF Embed")


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
