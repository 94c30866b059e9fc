"""FFHQ-style face alignment from the 5 landmarks insightface detects (the crop e4e was trained on).

FFHQ's recipe (NVlabs' ffhq-dataset, which e4e's ``align_face`` follows) builds an oriented square from the eye
centres and the mouth corners of dlib's 68 landmarks: centred a tenth of the eye-to-mouth vector below the eyes'
midpoint, turned so the eyes are level, sized by the larger of 2x the eye distance and 1.8x the eye-to-mouth
distance. Here the same square comes from insightface's 5 points: its eye points are the pupils where dlib's eye
centres are the mean of 6 eyelid points (a pixel or two apart on a frontal face), and its mouth corners are dlib's
points 48 and 54. FFHQ then resamples with PIL's QUAD transform after a reflect-padded, blurred border; this
samples the square bilinearly (antialiased by first shrinking large images) with reflected borders, no blur.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# insightface's 5 points, in order: left eye, right eye, nose, left mouth corner, right mouth corner (image left/right)
LEFT_EYE, RIGHT_EYE, LEFT_MOUTH, RIGHT_MOUTH = 0, 1, 3, 4


def ffhq_quad(landmarks: torch.Tensor) -> torch.Tensor:
    """5 landmarks [5, 2] (x, y pixels) -> the FFHQ crop square's corners [4, 2]: top-left, bottom-left,
    bottom-right, top-right (PIL's QUAD order)."""
    points = landmarks.double()
    eye_left, eye_right = points[LEFT_EYE], points[RIGHT_EYE]
    eye_avg = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    mouth_avg = (points[LEFT_MOUTH] + points[RIGHT_MOUTH]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - eye_to_mouth.flip(0) * torch.tensor([-1.0, 1.0], dtype=points.dtype)
    x = x / x.norm()
    x = x * max(eye_to_eye.norm() * 2.0, eye_to_mouth.norm() * 1.8)
    y = x.flip(0) * torch.tensor([-1.0, 1.0], dtype=points.dtype)
    c = eye_avg + eye_to_mouth * 0.1
    return torch.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def align_ffhq(image: torch.Tensor, landmarks: torch.Tensor, size: int = 256) -> torch.Tensor:
    """An image [3, H, W] (0..1) and its face's 5 landmarks -> the FFHQ-aligned face [3, size, size]."""
    quad = ffhq_quad(landmarks)
    side = float((quad[3] - quad[0]).norm())
    shrink = int(side / size / 2)  # as FFHQ shrinks first: bilinear sampling of a much larger square would alias
    if shrink > 1:
        image = F.avg_pool2d(image[None], shrink, ceil_mode=True)[0]
        quad = quad / shrink
    height, width = image.shape[-2:]
    steps = (torch.arange(size, dtype=torch.float64) + 0.5) / size  # output pixel centres, 0..1 across the square
    v, u = torch.meshgrid(steps, steps, indexing="ij")
    across, down = quad[3] - quad[0], quad[1] - quad[0]
    source = quad[0] + u[..., None] * across + v[..., None] * down  # [size, size, 2] continuous (x, y) pixels
    grid = torch.stack([source[..., 0] * 2 / width - 1, source[..., 1] * 2 / height - 1], dim=-1)
    return F.grid_sample(image[None].float(), grid[None].float().to(image.device), mode="bilinear",
                         padding_mode="reflection", align_corners=False)[0]
