"""AdaFace's composition-distillation losses (AdaFace paper, §2.3 and §2.4), in pure torch.

Composition distillation runs the UNet on four prompts from the same initial noise: subject-single ("a photo of
[subject]"), subject-compos ("a photo of [subject] in the forest"), class-single ("a photo of a woman") and
class-compos ("a photo of a woman in the forest"). The compositional delta loss (Eq. 3-4) asks the subject's
feature change under a compositional prompt to point the way the class's does; the elastic face-preserving loss
(Eq. 7-8) keeps the face features of the subject-compos image close to those of the subject-single one after a
soft, attention-based warp, so that spatial misalignment between the two images does not leak non-face deltas
into the face.

Every tensor's dim 0 is the batch; one batch row holds one sampled compositional prompt, so the batch mean is the
paper's expectation over compos ~ U(C). The losses compute in float32 at least (float64 stays float64): the
norms and softmaxes below over-/underflow in the UNet's float16/bfloat16.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

# |feat(s)| at or below this counts as a zero feature map: it has no direction to project onto.
ZERO_NORM = 1e-12


def _loss_precision(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def orthogonal_delta(feat_compos: torch.Tensor, feat_single: torch.Tensor) -> torch.Tensor:
    """feat_compos minus its projection onto feat_single, per sample (Eq. 5), in feat_compos's shape.

    Each sample's remaining dims are flattened into one vector. Eq. 6 writes the projection as <a, b> b, which is
    the projection only for a unit b; this is the true projection (<a, b> / <b, b>) b, computed as <a, b^> b^ with
    b^ = b / max(|b|, ZERO_NORM), so that the delta is orthogonal to feat_single whatever its norm (the paper's
    stated property, and what makes the delta invariant to the scale of the subject-specific part), and a zero
    feat_single projects to zero (delta = feat_compos) instead of 0/0.
    """
    if feat_compos.shape != feat_single.shape or feat_compos.dim() < 2:
        raise ValueError(f"orthogonal_delta wants two tensors of one shape [B, ...], got {tuple(feat_compos.shape)} "
                         f"and {tuple(feat_single.shape)}")
    compos = feat_compos.flatten(1)
    direction = F.normalize(feat_single.flatten(1), dim=1, eps=ZERO_NORM)
    projection = (compos * direction).sum(dim=1, keepdim=True) * direction
    return (compos - projection).view_as(feat_compos)


def compositional_delta_loss(subject_single: torch.Tensor, subject_compos: torch.Tensor,
                             class_single: torch.Tensor, class_compos: torch.Tensor,
                             detach_class: bool = True) -> torch.Tensor:
    """Eq. 4 for one feature type: mean over the batch of 1 - cos(Δ_subject, Δ_class), a scalar in [0, 2].

    The four tensors share one shape [B, ...]: a cross-attention layer's output [B, N, C], its attention map
    [B, heads, N, T] or the prompt embeddings [B, T, C]. Δ_subject = orthogonal_delta(subject_compos,
    subject_single), Δ_class likewise; the cosine is over each sample's whole flattened delta.

    The class prompts are the teacher: the frozen model's own change of a class's features under a compositional
    prompt is what the subject's change should imitate. So by default the class branch is detached and the loss
    only moves the subject branch; detach_class=False lets it pull the class deltas as well.
    """
    shapes = {tuple(t.shape) for t in (subject_single, subject_compos, class_single, class_compos)}
    if len(shapes) != 1:
        raise ValueError(f"compositional_delta_loss wants four tensors of one shape [B, ...], got {sorted(shapes)}")
    if detach_class:
        class_single, class_compos = class_single.detach(), class_compos.detach()
    subject_delta = orthogonal_delta(_loss_precision(subject_compos), _loss_precision(subject_single))
    class_delta = orthogonal_delta(_loss_precision(class_compos), _loss_precision(class_single))
    return (1 - F.cosine_similarity(subject_delta.flatten(1), class_delta.flatten(1), dim=1)).mean()


def delta_loss_over(features: Mapping[str, Sequence[torch.Tensor]],
                    detach_class: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 4's Σ_i over feature types: (total loss, {name: that name's detached loss, for logging}).

    ``features`` maps a name "<type>/<layer>" (or just "<type>" for a type with one tensor, such as the prompt
    embeddings) to its (subject_single, subject_compos, class_single, class_compos) tensors. The layers of one type
    are averaged and the types summed: the paper sums over the three feature types, and averaging within a type
    keeps cross-attention outputs and maps, which come from every cross-attention layer, from outweighing the one
    prompt embedding by the layer count.
    """
    if not features:
        raise ValueError("delta_loss_over got no features to distill")
    by_type: dict[str, list[torch.Tensor]] = {}
    logs: dict[str, torch.Tensor] = {}
    for name, four in features.items():
        if len(four) != 4:
            raise ValueError(f"delta_loss_over: {name!r} wants (subject_single, subject_compos, class_single, "
                             f"class_compos), got {len(four)} tensors")
        loss = compositional_delta_loss(*four, detach_class=detach_class)
        logs[name] = loss.detach()
        by_type.setdefault(name.split("/", 1)[0], []).append(loss)
    total = sum(torch.stack(losses).mean() for losses in by_type.values())
    return total, logs


def face_preserving_loss(query_single: torch.Tensor, query_compos: torch.Tensor,
                         feat_single: torch.Tensor, feat_compos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7-8 on one UNet cross-attention layer: the elastic face-preserving loss, a scalar in [0, 2].

    query_single [B, N, Cq] and query_compos [B, M, Cq] are the layer's queries in the subject-single and
    subject-compos instances; feat_single [B, N, C] and feat_compos [B, M, C] its features there (C may differ
    from Cq); mask [B, N] in [0, 1] is the face region of the subject-single image on the layer's token grid (see
    mask_to_token_grid).

    The matching field CA = softmax(query_single @ query_composᵀ) over the compos pixels is deliberately left
    unscaled (no 1/sqrt(Cq), the paper's footnote 2): large inner products make each face pixel's match sharp.
    CA @ feat_compos soft-warps the compos features onto the single image's pixels, so a face that moved between
    the two images is still compared with itself. The loss per pixel is 1 - cos over channels; it is averaged
    over each sample's pixels weighted by the mask, then over the samples with any mask. A sample with an empty
    mask contributes nothing, and a batch without any face gives a zero that is still part of the graph, so
    backward runs and yields zero gradients.

    The subject-single features are the reference to preserve, so feat_single is detached: the loss pulls the
    compos features towards them, never the other way. The queries stay attached, the matching field being part
    of the model's own computation.
    """
    shapes_fit = (mask.dim() == 2 and all(t.dim() == 3 for t in (query_single, query_compos, feat_single, feat_compos))
                  and query_single.shape[:2] == feat_single.shape[:2] == mask.shape
                  and query_compos.shape[:2] == feat_compos.shape[:2] and query_compos.shape[0] == mask.shape[0]
                  and query_single.shape[2] == query_compos.shape[2] and feat_single.shape[2] == feat_compos.shape[2])
    if not shapes_fit:
        raise ValueError("face_preserving_loss wants query_single [B, N, Cq], query_compos [B, M, Cq], feat_single "
                         f"[B, N, C], feat_compos [B, M, C] and mask [B, N], got {tuple(query_single.shape)}, "
                         f"{tuple(query_compos.shape)}, {tuple(feat_single.shape)}, {tuple(feat_compos.shape)} "
                         f"and {tuple(mask.shape)}")
    matching = torch.softmax(_loss_precision(query_single) @ _loss_precision(query_compos).transpose(1, 2), dim=-1)
    warped = matching @ _loss_precision(feat_compos)
    pixel_loss = 1 - F.cosine_similarity(warped, _loss_precision(feat_single.detach()), dim=-1)
    weights = mask.to(pixel_loss.dtype)
    face_area = weights.sum(dim=1)
    has_face = face_area > 0
    # An empty mask's numerator is an exact 0, so dividing it by 1 keeps the sample at 0 without a 0/0.
    sample_loss = (weights * pixel_loss).sum(dim=1) / torch.where(has_face, face_area, torch.ones_like(face_area))
    return (sample_loss * has_face).sum() / has_face.sum().clamp_min(1)


def token_grid_shape(tokens: int, aspect: float | tuple[int, int]) -> tuple[int, int]:
    """The (h, w) token grid of a UNet layer with ``tokens`` = h * w tokens for a latent of this aspect.

    ``aspect`` is the latent's height / width, or its (height, width). The UNet's stride-2 convolutions round odd
    sizes up (ceil(size / 2)), so a deep layer's h / w only approximates the latent's: a grid fits when some
    scale of the latent rounds up to exactly h x w, and among fitting grids the one nearest the aspect wins.
    Passing the latent's (height, width) makes this exact for every layer.
    """
    ratio = aspect[0] / aspect[1] if isinstance(aspect, tuple) else float(aspect)
    if not (isinstance(tokens, int) and tokens > 0) or not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"token_grid_shape wants a positive token count and aspect, got {tokens!r} and {aspect!r}")
    fits = []
    for h in range(1, tokens + 1):
        if tokens % h:
            continue
        w = tokens // h
        # A latent scaled to width x (so height ratio * x) rounds up to h x w when w - 1 < x <= w and
        # h - 1 < ratio * x <= h: the two ranges of x overlap.
        if max(w - 1, (h - 1) / ratio) < min(w, h / ratio):
            fits.append((h, w))
    if not fits:
        raise ValueError(f"no h x w token grid with h * w == {tokens} has the latent's aspect {ratio:.4g} "
                         "(height / width), even with odd sizes rounded up; is the token count from another "
                         "latent, or the aspect width / height?")
    return min(fits, key=lambda hw: abs(math.log(hw[0] / hw[1] / ratio)))


def mask_to_token_grid(mask: torch.Tensor, tokens: int, aspect: float | tuple[int, int]) -> torch.Tensor:
    """A face mask [B, H, W] in [0, 1] resized to a UNet layer's token grid and flattened to [B, tokens].

    The grid is token_grid_shape(tokens, aspect); tokens come row by row, the order of the layer's flattened
    [B, C, h, w] hidden states. Shrinking averages each token's area (a token's value is the face fraction it
    covers); enlarging either side interpolates bilinearly. Both keep the values in [0, 1].
    """
    if mask.dim() != 3:
        raise ValueError(f"mask_to_token_grid wants a mask [B, H, W], got {tuple(mask.shape)}")
    h, w = token_grid_shape(tokens, aspect)
    image = (mask if mask.is_floating_point() else mask.float()).unsqueeze(1)
    if h <= mask.shape[1] and w <= mask.shape[2]:
        grid = F.interpolate(image, size=(h, w), mode="area")
    else:
        grid = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return grid.reshape(mask.shape[0], tokens)
