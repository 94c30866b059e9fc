"""The IDAdapter paper's evaluation metrics (§4.1) as pure math over detected faces: identity preservation (ID-Sim)
and pose diversity (Pose-Div yaw and pitch) of generated images against the reference photos.

Head pose comes from the detector's five landmarks (left eye, right eye, nose tip, left and right mouth corner, in
image pixels) by a geometric approximation, not a 3D fit. In a frame whose x axis is the eye line (so in-plane
rotation, position and size drop out), with IOD the inter-ocular distance:

- yaw: the nose tip's horizontal offset from the face's midline (the line through the eyes' midpoint and the mouth
  corners' midpoint, taken at the nose's height), over IOD. A nose standing ``NOSE_DEPTH`` IODs in front of the
  plane of the eyes and mouth moves by depth x sin(yaw) while IOD shrinks by cos(yaw):
  yaw = arctan(offset / IOD / NOSE_DEPTH).
- pitch: the nose's height between the eye line and the mouth line (0 at the eyes, 1 at the mouth), against the
  frontal face's (the ArcFace alignment template's). Turning the head up by pitch lifts the nose by depth x sin(pitch)
  and shortens the eye-to-mouth height by cos(pitch): pitch = arctan((frontal - measured) x H / NOSE_DEPTH), H the
  frontal eye-to-mouth height in IODs.

Both are exact for a face of these proportions turned about one axis and seen without perspective. For turns about
both axes, for perspective and for faces of other proportions they are approximations, off by a few degrees at
moderate angles (a face turned 30 degrees aside, then 15 up, reads yaw 30, pitch 17). Positive yaw: the nose towards
the image's right; positive pitch: the face turned up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .face_embeds import FaceEmbeds, mean_identity_vector
from .iresnet import ARCFACE_TEMPLATE_112

# how far the nose tip stands in front of the plane of the eyes and mouth corners, in inter-ocular distances: a
# mean-face proportion (about 28 mm for eyes 63 mm apart), the only depth the pose estimate assumes
NOSE_DEPTH = 0.45


def face_frame(landmarks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Five landmarks [..., 5, 2] -> (the nose's offset from the midline / IOD, the nose's height between the eye
    line (0) and the mouth line (1), the eye-to-mouth height / IOD), measured along and across the eye line."""
    left_eye, right_eye, nose, left_mouth, right_mouth = landmarks.double().unbind(-2)
    eyes = (left_eye + right_eye) / 2
    across = right_eye - left_eye
    iod = across.norm(dim=-1)
    along = across / iod[..., None]
    down = torch.stack([-along[..., 1], along[..., 0]], dim=-1)  # image y points down
    nose, mouth = nose - eyes, (left_mouth + right_mouth) / 2 - eyes
    nose_x, nose_y = (nose * along).sum(-1), (nose * down).sum(-1)
    mouth_x, mouth_y = (mouth * along).sum(-1), (mouth * down).sum(-1)
    midline_x = mouth_x * nose_y / mouth_y
    return (nose_x - midline_x) / iod, nose_y / mouth_y, mouth_y / iod


_, FRONTAL_NOSE_HEIGHT, FRONTAL_EYE_TO_MOUTH = (float(v) for v in face_frame(torch.tensor(ARCFACE_TEMPLATE_112)))


def head_pose(landmarks: torch.Tensor) -> torch.Tensor:
    """Five landmarks [..., 5, 2] -> (yaw, pitch) [..., 2] in degrees (the module's approximation)."""
    offset, nose_height, _ = face_frame(landmarks)
    yaw = torch.atan(offset / NOSE_DEPTH)
    pitch = torch.atan((FRONTAL_NOSE_HEIGHT - nose_height) * FRONTAL_EYE_TO_MOUTH / NOSE_DEPTH)
    return torch.rad2deg(torch.stack([yaw, pitch], dim=-1)).float()


def identity_similarity(embeddings: torch.Tensor, reference_embeddings: torch.Tensor) -> torch.Tensor:
    """ArcFace cosine [G] of each face [G, d] with the references' [R, d] unit-length mean vector (MFF's f_a)."""
    return F.cosine_similarity(embeddings.float(), mean_identity_vector(reference_embeddings)[None], dim=-1)


def pose_deviation(poses: torch.Tensor, reference_poses: torch.Tensor) -> torch.Tensor:
    """Mean absolute (yaw, pitch) difference [2] between generated faces [G, 2] and reference faces [R, 2], over
    every (generated, reference) pair: with one reference photo, the paper's deviation from the input image."""
    return (poses[:, None] - reference_poses[None]).abs().mean(dim=(0, 1))


def paper_metrics(generated: FaceEmbeds, images: int, reference_embeddings: torch.Tensor,
                  reference_landmarks: torch.Tensor) -> dict:
    """ID-Sim and Pose-Div of ``images`` generated images, given the faces found in them (at most one per image, e.g.
    Face Embed's largest) and the reference photos' faces (ArcFace vectors [R, d], landmarks [R, 5, 2]).

    Images without a face are counted (``face_detection_rate``) and left out of ``id_sim`` and the Pose-Div means;
    ``id_sim_all_images`` counts them as similarity 0. Metrics over no face are None. ``per_image`` holds each image's
    (id_sim, yaw, pitch), None where no face was found."""
    if images < 1:
        raise ValueError("paper_metrics needs at least one generated image")
    index = generated.image_index.tolist()
    if len(set(index)) != len(index) or not all(0 <= i < images for i in index):
        raise ValueError(f"expected at most one face per image in 0..{images - 1}, got faces of images {index}")
    reference_poses = head_pose(reference_landmarks)
    per_image: list = [None] * images
    metrics = {"images": images, "faces": len(index), "face_detection_rate": len(index) / images,
               "id_sim": None, "id_sim_all_images": 0.0, "pose_div_yaw": None, "pose_div_pitch": None,
               "reference_poses": reference_poses.tolist(), "per_image": per_image}
    if not index:
        return metrics
    similarity = identity_similarity(generated.embeds, reference_embeddings)
    poses = head_pose(generated.landmarks)
    for row, image in enumerate(index):
        per_image[image] = (float(similarity[row]), *poses[row].tolist())
    yaw, pitch = pose_deviation(poses, reference_poses).tolist()
    metrics.update(id_sim=float(similarity.mean()), id_sim_all_images=float(similarity.sum()) / images,
                   pose_div_yaw=yaw, pose_div_pitch=pitch)
    return metrics
