"""FFHQ-style alignment from insightface's 5 landmarks."""

import math

import torch

from comfyui_idadapter.nodes.arch.ffhq_align import align_ffhq, ffhq_quad

# a frontal face: eyes 20 px apart, mouth 20 px below them (eye_to_eye = eye_to_mouth = 20)
FRONTAL = torch.tensor([[90.0, 100.0], [110.0, 100.0], [100.0, 110.0], [92.0, 120.0], [108.0, 120.0]])


def blobs(points: torch.Tensor, height: int = 200, width: int = 220, sigma: float = 2.5) -> torch.Tensor:
    """An image [3, H, W] with a smooth bright blob at each point (red at the left eye, green elsewhere)."""
    y, x = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    image = torch.zeros(3, height, width)
    for i, (px, py) in enumerate(points.tolist()):
        blob = torch.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * sigma**2))
        image[0 if i == 0 else 1] += blob
    return image


def peak(channel: torch.Tensor) -> tuple[float, float]:
    """The intensity-weighted centre (x, y) of a channel, in output pixels (centres at k + 0.5)."""
    h, w = channel.shape
    y, x = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    mass = channel.clamp(min=0) ** 4
    return float((x * mass).sum() / mass.sum()), float((y * mass).sum() / mass.sum())


def test_quad_is_ffhqs_square_for_a_frontal_face():
    quad = ffhq_quad(FRONTAL)
    # x = (e + m, 0) normalised, times max(2 e, 1.8 m) = 40 -> a 80 px square centred 2 px below the eyes' midpoint
    expected = torch.tensor([[60.0, 62.0], [60.0, 142.0], [140.0, 142.0], [140.0, 62.0]], dtype=torch.float64)
    torch.testing.assert_close(quad, expected)


def test_the_left_eye_lands_where_ffhqs_square_puts_it():
    aligned = align_ffhq(blobs(FRONTAL), FRONTAL, size=256)
    assert aligned.shape == (3, 256, 256)
    x, y = peak(aligned[0])
    # the left eye is 30 px into the 80 px square from the left, 38 px from the top
    assert abs(x - 256 * 30 / 80) < 1.0 and abs(y - 256 * 38 / 80) < 1.0, (x, y)


def test_a_turned_face_gives_the_same_crop():
    angle = math.radians(25)
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = torch.tensor([100.0, 110.0])
    turned = (FRONTAL - centre) @ rotation.T + centre
    upright = align_ffhq(blobs(FRONTAL), FRONTAL, size=128)
    rotated = align_ffhq(blobs(turned), turned, size=128)
    assert (upright - rotated).abs().mean() < 0.01
    assert abs(peak(rotated[0])[0] - peak(upright[0])[0]) < 0.5


def test_a_large_face_is_shrunk_first_and_still_centred():
    big = FRONTAL * 8  # a 160 px eye distance: the square is 640 px, 2.5x the output
    aligned = align_ffhq(blobs(big, height=1600, width=1760, sigma=20), big, size=256)
    x, y = peak(aligned[0])
    assert abs(x - 96) < 1.5 and abs(y - 121.6) < 1.5, (x, y)
