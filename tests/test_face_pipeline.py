"""The insightface path end to end, through insightface's own SCRFD decoding, NMS, alignment and ArcFace."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comfyui_idadapter.nodes.arch import face_embeds as fe
from comfyui_idadapter.nodes.arch.iresnet import ARCFACE_TEMPLATE_112, load_arcface, to_arcface_input
from comfyui_idadapter.nodes.errors import ConfigError, ImageInputError, NoFaceError
from comfyui_idadapter.nodes.face import insightface_backend as backend
from tiny_face_models import expected_box, expected_landmarks, face_image


def test_single_face_box_landmarks_embedding_and_crop(analyzer, insightface_root):
    image = face_image([(1, 2)])
    embeds, crops = backend.embed_faces(analyzer, image)
    assert len(embeds) == 1
    np.testing.assert_allclose(embeds.boxes[0].numpy(), expected_box((1, 2)), atol=0.5)
    np.testing.assert_allclose(embeds.landmarks[0].numpy(), expected_landmarks((1, 2)), atol=0.5)
    assert embeds.scores[0] > 0.9 and embeds.image_index.tolist() == [0]
    assert torch.allclose(embeds.embeds.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert crops.shape == (1, 112, 112, 3) and crops.dtype == torch.float32
    # the landmarks are the template scaled into the face cell, so the aligned crop is that cell enlarged
    cell = image[:, 32:64, 64:96].permute(0, 3, 1, 2)
    enlarged = F.interpolate(cell, size=112, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    assert (crops[:, 8:-8, 8:-8] - enlarged[:, 8:-8, 8:-8]).abs().mean() < 0.03
    assert (crops - face_image([(1, 2)], seed=9)[:, :112, :112]).abs().mean() > 0.05  # not just any bright crop
    # our torch ArcFace on the aligned crop gives the embedding insightface computed with onnxruntime
    net = load_arcface(os.path.join(insightface_root, "models", "tinypack", "rec.onnx"))
    with torch.no_grad():
        ours = F.normalize(net(to_arcface_input(crops.permute(0, 3, 1, 2))), dim=-1)
    assert F.cosine_similarity(ours, embeds.embeds).item() > 0.9999


def test_boxes_are_in_source_pixels_for_other_sizes(analyzer):
    embeds, _ = backend.embed_faces(analyzer, face_image([(2, 1)], size=256))
    np.testing.assert_allclose(embeds.boxes[0].numpy(), expected_box((2, 1), 256), atol=1.0)
    np.testing.assert_allclose(embeds.landmarks[0].numpy(), expected_landmarks((2, 1), 256), atol=1.0)


def test_multi_face_policies(analyzer):
    cells = [(3, 3), (0, 0), (1, 2)]  # left to right: (0,0), (1,2), (3,3)
    image = face_image(cells)
    everything, crops = backend.embed_faces(analyzer, image, "all")
    assert len(everything) == 3 and crops.shape[0] == 3
    np.testing.assert_allclose(everything.boxes[:, 0].numpy(), [0, 64, 96], atol=0.5)
    # different faces, different identities
    sims = everything.embeds @ everything.embeds.T
    assert (sims - torch.eye(3)).abs().max() < 0.999
    second, _ = backend.embed_faces(analyzer, image, "index", index=1)
    torch.testing.assert_close(second.embeds, everything.embeds[1:2])
    np.testing.assert_allclose(second.boxes[0].numpy(), expected_box((1, 2)), atol=0.5)


class _FixedFaces:
    """An analyzer stand-in returning faces of chosen sizes (the tiny detector only finds one size)."""

    models = {}

    def __init__(self, boxes):
        self.boxes = boxes

    def get(self, bgr):
        faces = []
        for i, (x1, y1, x2, y2) in enumerate(self.boxes):
            kps = np.array(ARCFACE_TEMPLATE_112, np.float32) * ((x2 - x1) / 112) + [x1, y1]
            emb = np.zeros(512, np.float32)
            emb[i] = 1
            faces.append(SimpleNamespace(bbox=np.array([x1, y1, x2, y2], np.float32), kps=kps, det_score=0.9,
                                         normed_embedding=emb))
        return faces


def test_largest_and_index_selection_order():
    analyzer = _FixedFaces([(100, 0, 140, 40), (0, 50, 60, 110), (60, 60, 80, 80)])
    largest, _ = backend.embed_faces(analyzer, torch.zeros(1, 128, 160, 3), "largest")
    assert largest.boxes.tolist() == [[0, 50, 60, 110]] and largest.embeds[0, 1] == 1
    assert largest.recognizer == ""  # no recognizer file to say which ArcFace made the vectors: unknown
    for index, x1 in enumerate((0, 60, 100)):  # left to right
        picked, _ = backend.embed_faces(analyzer, torch.zeros(1, 128, 160, 3), "index", index=index)
        assert picked.boxes[0, 0] == x1


def test_selection_under_a_mask():
    """"in mask": the face with the largest share of its box under the mask, at least half of it; the mask is
    resized to each image (here given at half size), one for all images or one per image."""
    analyzer = _FixedFaces([(100, 0, 140, 40), (0, 50, 60, 110), (60, 60, 80, 80)])
    images = torch.zeros(2, 128, 160, 3)
    right = torch.zeros(1, 64, 80)
    right[..., 40:] = 1  # the image's right half (x >= 80)
    picked, _ = backend.embed_faces(analyzer, images, "in mask", mask=right)
    assert picked.boxes.tolist() == [[100, 0, 140, 40]] * 2 and picked.image_index.tolist() == [0, 1]
    per_image = torch.cat([right, 1 - right])
    picked, _ = backend.embed_faces(analyzer, images, "in mask", mask=per_image)
    assert picked.boxes[:, 0].tolist() == [100, 0]  # the left mask: the large face wholly under it wins
    sliver = torch.zeros(1, 128, 160)
    sliver[:, :, 70:80] = 1  # half of the small face's box (60..80), none of the others'
    picked, _ = backend.embed_faces(analyzer, images[:1], "in mask", mask=sliver)
    assert picked.boxes.tolist() == [[60, 60, 80, 80]]
    sliver[:, :, 70:71] = 0  # now under half
    with pytest.raises(NoFaceError, match="3 face\\(s\\), none under the mask"):
        backend.embed_faces(analyzer, images[:1], "in mask", mask=sliver)
    with pytest.raises(ConfigError, match="needs a mask: connect face_mask"):
        backend.embed_faces(analyzer, images, "in mask")
    with pytest.raises(ImageInputError, match="3 masks for 2 images"):
        backend.embed_faces(analyzer, images, "in mask", mask=torch.ones(3, 8, 8))


def test_every_encode_node_takes_the_largest_of_the_faces_it_is_given():
    """W+ Encode and MFF Embed use largest_face_of_each_image: the largest of each image's faces, or the one face
    per image that Face Embed's rule kept."""
    everything, _ = backend.embed_faces(_FixedFaces([(100, 0, 140, 40), (0, 50, 60, 110)]), torch.zeros(2, 128, 160, 3),
                                        "all")
    assert fe.largest_face_of_each_image(everything, 2, "x") == [0, 2]  # left to right: (0, 50..) comes first
    kept, _ = backend.embed_faces(_FixedFaces([(100, 0, 140, 40), (0, 50, 60, 110)]), torch.zeros(1, 128, 160, 3),
                                  "index", index=1)
    assert kept.boxes[fe.largest_face_of_each_image(kept, 1, "x")].tolist() == [[100, 0, 140, 40]]
    with pytest.raises(NoFaceError, match="image 1 has no face in face_embeds, and W"):
        fe.largest_face_of_each_image(kept, 2, "W+ Encode aligns it")
    averaged = fe.FaceEmbeds(torch.ones(1, 512))
    with pytest.raises(NoFaceError, match="no face boxes"):
        fe.largest_face_of_each_image(averaged, 1, "x")


def test_batch_images_keep_their_index(analyzer):
    batch = torch.cat([face_image([(0, 1)]), face_image([(2, 2)], seed=4)])
    embeds, _ = backend.embed_faces(analyzer, batch, "largest")
    assert embeds.image_index.tolist() == [0, 1]
    np.testing.assert_allclose(embeds.boxes.numpy(), np.stack([expected_box((0, 1)), expected_box((2, 2))]), atol=0.5)


def test_no_face_error_names_the_image_and_the_fix(analyzer):
    batch = torch.cat([face_image([(1, 1)]), face_image([])])
    with pytest.raises(NoFaceError, match=r"image 1 of the batch: no face.*on_no_face to 'skip'"):
        backend.embed_faces(analyzer, batch, "largest", on_no_face="error")


def test_no_face_skip_leaves_images_out(analyzer):
    batch = torch.cat([face_image([]), face_image([(1, 1)]), face_image([])])
    embeds, crops = backend.embed_faces(analyzer, batch, "largest", on_no_face="skip")
    assert len(embeds) == 1 and embeds.image_index.tolist() == [1] and crops.shape[0] == 1
    assert embeds.image_sizes == ((128, 128),) * 3  # every image of the batch, the skipped ones too
    none, crops = backend.embed_faces(analyzer, face_image([]), "largest", on_no_face="skip")
    assert len(none) == 0 and none.dim == 512 and crops.shape == (1, 112, 112, 3)
    assert none.image_sizes == ((128, 128),)


def test_index_past_the_faces_follows_the_no_face_policy(analyzer):
    with pytest.raises(NoFaceError, match="1 face\\(s\\), none at index 2"):
        backend.embed_faces(analyzer, face_image([(1, 1)]), "index", index=2)
    embeds, _ = backend.embed_faces(analyzer, face_image([(1, 1)]), "index", index=2, on_no_face="skip")
    assert len(embeds) == 0


def test_analyzer_is_cached_and_reports_provider(insightface_root):
    pack = os.path.join(insightface_root, "models", "tinypack")
    first = backend.load_analyzer(pack, "auto", 640)
    assert backend.load_analyzer(pack, "auto", 640) is first
    assert first.provider_in_use == "CPUExecutionProvider"
    assert "running on CPUExecutionProvider" in first.report


def test_template_is_insightface_template():
    from insightface.utils.face_align import arcface_dst

    np.testing.assert_allclose(np.array(ARCFACE_TEMPLATE_112), arcface_dst, atol=1e-4)
