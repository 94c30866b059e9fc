"""What the identity loss decodes of x0_hat (--id_decode): the whole latent ("full", the paper's way) or, per row,
the latent window around the region the aligned 112x112 ArcFace crop reads ("window"), grown by a margin for the
decoder's receptive field. The decoder is most of a training step's work (bench/README.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nodes.arch.iresnet import align_faces, aligned_crop_source_box
from .diffusion import vae_downscale

DECODES = ("full", "window")
# Latent pixels added around the crop's source region. No margin makes the window exact short of the whole latent
# (GroupNorm statistics and the mid-block attention span the decoded area; SD's decoder convolutions reach 17
# latent pixels); 8 is the measured compromise in docs/idadapter.md ("Training"), held by tests/test_id_decode.py.
WINDOW_MARGIN = 8


def latent_windows(pixel_boxes: torch.Tensor, latent_size: tuple[int, int], downscale: int,
                   margin: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Each row's window origin [B, 2] (x, y) and the batch's one window size (height, width), in latent pixels.

    A row needs the latent pixels under its image-pixel box [x1, y1, x2, y2) grown by ``margin``, within the latent;
    the window is the largest row's need (one decoder call for the batch), centred on each row's need and moved
    inside the latent, so it always covers it."""
    limit = torch.tensor([latent_size[1], latent_size[0]])
    low = (torch.div(pixel_boxes[:, :2], downscale, rounding_mode="floor").long() - margin).clamp(min=0)
    high = torch.minimum(-torch.div(-pixel_boxes[:, 2:], downscale, rounding_mode="floor").long() + margin, limit)
    need = (high - low).clamp(min=0)
    size = need.amax(0).clamp(min=1)
    origin = torch.minimum((low - (size - need) // 2).clamp(min=0), limit - size)
    return origin, (int(size[1]), int(size[0]))


def decode_faces(vae, latents: torch.Tensor, landmarks: torch.Tensor, mode: str,
                 margin: int = WINDOW_MARGIN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0_hat as the identity loss sees it, from latents [B, C, h, w] and the full image's landmarks [B, 5, 2] (CPU):
    the aligned faces [B, 3, 112, 112] (float32), the decoded images [B, 3, H, W] and each one's top-left corner
    [B, 2] (x, y; CPU) in the full image's pixels. "full" decodes every latent (corners at 0), "window" each row's
    window of ``latent_windows`` around the pixels the crop reads."""
    if mode == "full":
        decoded, corners = vae.decode(latents).sample, torch.zeros(len(latents), 2)
    else:
        downscale = vae_downscale(vae)
        origins, (height, width) = latent_windows(aligned_crop_source_box(landmarks), latents.shape[-2:], downscale,
                                                  margin)
        windows = torch.stack([latents[row, :, y:y + height, x:x + width]
                               for row, (x, y) in enumerate(origins.tolist())])
        decoded, corners = vae.decode(windows).sample, (origins * downscale).float()
    faces = align_faces(decoded.float(), landmarks.float() - corners[:, None])
    return faces, decoded, corners


def window_fidelity(vae, arcface, latents: torch.Tensor, landmarks: torch.Tensor, f_a: torch.Tensor,
                    margin: int = WINDOW_MARGIN) -> dict[str, float]:
    """How far "window" is from "full" on these latents: the aligned faces' largest pixel difference as a share of the
    full faces' pixel range, the identity loss (mean 1 - cos(ArcFace(face), f_a)) of each, and the cosine between
    the two losses' gradients with respect to the latents."""
    faces, losses, grads = {}, {}, {}
    for mode in DECODES:
        x0 = latents.detach().clone().requires_grad_(True)
        faces[mode] = decode_faces(vae, x0, landmarks, mode, margin)[0]
        loss = (1 - F.cosine_similarity(arcface(faces[mode]).float(), f_a, dim=-1)).mean()
        grads[mode] = torch.autograd.grad(loss, x0)[0].flatten().float()
        losses[mode] = loss.item()
    full = faces["full"].detach()
    return {"face_max_diff": float((faces["window"].detach() - full).abs().max() / (full.max() - full.min())),
            "loss_full": losses["full"], "loss_window": losses["window"],
            "grad_cosine": float(F.cosine_similarity(grads["window"], grads["full"], dim=0))}


@torch.no_grad()
def in_frame(decoded: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """Decoded windows [B, 3, h, w] put back at their corners [B, 2] on black size x size frames (no gradient): the
    face detector then sees the face where, and at the scale, a full decode shows it."""
    if decoded.shape[-2:] == (size, size):
        return decoded.detach()
    frames = decoded.new_full((len(decoded), decoded.shape[1], size, size), -1.0)
    height, width = decoded.shape[-2:]
    for row, (x, y) in enumerate(corners.long().tolist()):
        frames[row, :, y:y + height, x:x + width] = decoded[row]
    return frames
