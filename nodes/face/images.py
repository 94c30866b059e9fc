"""ComfyUI IMAGE tensors: the checks every node applies to them, their float32 RGB form, and the BGR uint8 arrays
insightface works on."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ImageInputError

MIN_SIDE = 32  # below this no face detector finds anything; say so instead of "no face"
# The detector scales the long side to its input size (e.g. 640): past this ratio the short side shrinks towards
# 0 px and OpenCV's resize fails; well before that, faces are too small to find.
MAX_ASPECT = 16
MAX_PIXELS = 8192 * 8192  # larger images cost gigabytes as float tensors and OpenCV buffers, for no better detection


def image_batch(images) -> torch.Tensor:
    """An IMAGE as [B, H, W, C] (a single [H, W, C] image gets a batch of one), refused unless it is a non-empty
    batch of 1 (grey), 3 (RGB) or 4 (RGBA) channels: the one definition of an IMAGE every node of the pack
    accepts. Shape checks only, so nothing is allocated for an input that is refused."""
    if not isinstance(images, torch.Tensor):
        raise ImageInputError(f"expected an IMAGE tensor, got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ImageInputError(f"IMAGE must be [batch, height, width, channels], got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ImageInputError("the IMAGE batch is empty: connect a node that outputs at least one image")
    if images.shape[-1] not in (1, 3, 4):
        raise ImageInputError(
            f"IMAGE has {images.shape[-1]} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA) in the last dimension"
        )
    return images


def rgb_images(images) -> torch.Tensor:
    """An IMAGE (checked by :func:`image_batch`) as float32 RGB [B, H, W, 3] in 0..1 on its device: greyscale is
    replicated to three channels, alpha dropped. float16 and bfloat16 IMAGEs become float32 here, because the
    resizing and alignment that follow have no half-precision kernels on the CPU."""
    images = image_batch(images)
    images = images.detach()[..., :3].float()
    if not torch.isfinite(images).all():
        raise ImageInputError("IMAGE contains NaN or infinite values (check the node that produced it)")
    return images.expand(-1, -1, -1, 3) if images.shape[-1] == 1 else images


def to_bgr_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[B, H, W, C] floats in 0..1 (C = 1, 3 or 4) -> B arrays [H, W, 3] uint8 in BGR order, for face detection.

    Greyscale is replicated to three channels, alpha is dropped (:func:`rgb_images`); sizes no detector can search
    are refused first.
    """
    _, height, width, _ = image_batch(images).shape
    if min(height, width) < MIN_SIDE:
        raise ImageInputError(
            f"image is {width}x{height} px; face detection needs at least {MIN_SIDE}x{MIN_SIDE} "
            "(upscale it, or use a larger crop around the face)"
        )
    long_side, short_side = max(height, width), min(height, width)
    if long_side > MAX_ASPECT * short_side:
        raise ImageInputError(
            f"image is {width}x{height} px, an aspect ratio of {long_side / short_side:.0f}:1; face detection "
            f"accepts at most {MAX_ASPECT}:1 (crop the image around the face)"
        )
    if height * width > MAX_PIXELS:
        raise ImageInputError(
            f"image is {width}x{height} px ({height * width / 1e6:.0f} megapixels); face detection accepts at most "
            f"{MAX_PIXELS / 1e6:.0f} megapixels, e.g. 8192x8192 (downscale it: the detector works at 640 px anyway)"
        )
    rgb = (rgb_images(images).cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return [np.ascontiguousarray(img[..., ::-1]) for img in rgb]


def bgr_uint8_to_image(crops: list[np.ndarray]) -> torch.Tensor:
    """B arrays [H, W, 3] BGR uint8 -> IMAGE [B, H, W, 3] RGB float 0..1."""
    stacked = np.stack([c[..., ::-1] for c in crops]).astype(np.float32) / 255.0
    return torch.from_numpy(stacked)
