"""W+ adapter stage II (in-the-wild training) losses, face masks, W+ augmentations and drop-out, in pure torch.

Stage II (W+ adapter paper, §3.3; official ``train_wild.py``) trains only the residual cross-attention processors
on in-the-wild images, with the mapping network frozen. Beside the reconstruction loss it has two terms:

- the disentanglement loss (Eq. 6): outside the face, the noise prediction with the true W+ and with an augmented
  (shuffled, perturbed or edited) W+ must agree, so that W+ edits only change the face;
- the regularisation ("preserve") loss (Eq. 7): the W+ branch's effect on the prediction is kept small, measured
  against the same UNet with the branch off (α = 0), so that the text prompt keeps control of the image.

The official script weights them λ_disen = 2.0 and λ_preserve = 1.0 (``train_wild.sh``; the paper says 1.5 and 1.0),
total = rec + λ_disen · L_disen + λ_preserve · L_preserve; the weighting is the trainer's job, not this module's.

Masks here are *face* masks: 1 on the face, 0 elsewhere, soft in between (the official mask files store the face as
255). The losses weight each latent pixel by 1 − mask, the paper's M (0 face, 1 non-face). Predictions are
[B, C, h, w] latents; the losses compute in float32 at least (float64 stays float64), the UNet's float16/bfloat16
being too coarse for squared differences of nearly equal predictions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The paper (§4, "Training Data"): the face region mask "is eroded and blurred with kernel sizes of 32 and 7".
PAPER_ERODE = 32
PAPER_BLUR = 7
# train_wild.py: each strategy's strength is uniform in ±60 for directions (get_w_direction(..., 60, ...)) and
# ±8 (randint(-80, 80) / 10) for the Gaussian perturbation, in units of the batch's W+ std.
OFFICIAL_DIRECTION_STRENGTH = (-60.0, 60.0)
OFFICIAL_GAUSSIAN_STRENGTH = (-8.0, 8.0)
# train_wild.py's MyDataset: three exclusive drop-out cases, 0.05 each.
OFFICIAL_DROP_RATE = 0.05


def _loss_precision(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """n float32 draws of U[0, 1) from ``generator`` (on its own device), moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, device=gen_device).to(device)


# --- face masks ---

def _erode(mask: torch.Tensor, size: int) -> torch.Tensor:
    """cv2.erode(mask, np.ones((size, size))) on [B, 1, H, W]: the minimum over a size x size window.

    The window is anchored like OpenCV's (its centre at size // 2, so an even size reaches one pixel further up and
    left than down and right), and the border counts as the maximum, as in cv2.erode's default border: a face cut
    by the image edge is not eaten from the edge.
    """
    if size <= 1:
        return mask
    before, after = size // 2, size - 1 - size // 2
    padded = F.pad(mask, (before, after, before, after), value=float(mask.max().clamp_min(1)))
    return -F.max_pool2d(-padded, kernel_size=size, stride=1)


def _gaussian_blur(mask: torch.Tensor, ksize: int) -> torch.Tensor:
    """cv2.GaussianBlur(mask, (ksize, ksize), 0) on [B, 1, H, W], separably.

    sigma = 0 makes OpenCV derive it from the kernel size, sigma = 0.3 ((ksize - 1) / 2 - 1) + 0.8, done here too.
    An even ksize is bumped to the next odd one, as train_wild.py does before calling OpenCV. The border reflects
    without repeating the edge pixel (OpenCV's default BORDER_REFLECT_101, torch's "reflect"); an image smaller
    than the kernel's half width falls back to repeating the edge.
    """
    if ksize <= 1:
        return mask
    ksize = ksize + 1 if ksize % 2 == 0 else ksize
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    half = ksize // 2
    x = torch.arange(ksize, dtype=mask.dtype, device=mask.device) - half
    kernel = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    mode = "reflect" if half < min(mask.shape[-2:]) else "replicate"
    out = F.pad(mask, (half, half, 0, 0), mode=mode)
    out = F.conv2d(out, kernel.view(1, 1, 1, ksize))
    out = F.pad(out, (0, 0, half, half), mode=mode)
    return F.conv2d(out, kernel.view(1, 1, ksize, 1))


def prepare_mask(mask: torch.Tensor, erode: int = PAPER_ERODE, blur: int = PAPER_BLUR) -> torch.Tensor:
    """A dataset's face mask [B, H, W] (1 = face; bool or floats in [0, 1]) eroded, then blurred: [B, H, W] in [0, 1].

    The paper's recipe (§4): erode with a square kernel of side ``erode`` px, then Gaussian-blur with a kernel of
    side ``blur`` px (32 and 7 in the paper, as the defaults). Eroding the *face* shrinks it, so the
    disentanglement loss's outside region (1 − mask) reaches a little into the face's rim; the blur makes that rim a
    ramp, not a step, so the loss does not pin a hard edge around the face. These are the official code's
    operations exactly (cv2.erode with np.ones((e, e)), then cv2.GaussianBlur((k, k), 0)); the official code picks
    e and k at random by face area (e from 10-30 for small faces up to 150-180 for big ones, k from 10-20 up to
    60-80) at its 512-px crops, while this takes them fixed: scale them with the image size and face size.
    """
    if mask.dim() != 3:
        raise ValueError(f"prepare_mask wants a mask [B, H, W], got {tuple(mask.shape)}")
    if not (isinstance(erode, int) and isinstance(blur, int) and erode >= 0 and blur >= 0):
        raise ValueError(f"prepare_mask wants non-negative integer kernel sizes, got erode={erode!r}, blur={blur!r}")
    image = (mask if mask.is_floating_point() else mask.float()).unsqueeze(1)
    image = _gaussian_blur(_erode(image, erode), blur)
    return image.squeeze(1).clamp(0, 1)


def face_region_mask(boxes: torch.Tensor, size: tuple[int, int], erode: int = PAPER_ERODE,
                     blur: int = PAPER_BLUR) -> torch.Tensor:
    """Face masks [B, H, W] in [0, 1] from face boxes [B, 4] = (x0, y0, x1, y1) in pixels, for datasets without masks.

    The box (a detector's, or the bounding box of the landmarks' FFHQ alignment quad, which is how the paper gets
    its masks) is rasterised as the pixels whose centres lie inside it, then eroded and blurred like a dataset's
    mask (prepare_mask). A box partly outside the image is clipped; an empty one gives an all-zero mask (no face:
    the losses then count the whole image as outside).
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"face_region_mask wants boxes [B, 4] (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"face_region_mask wants a positive (H, W), got {size!r}")
    boxes = boxes.to(torch.float32)
    ys = torch.arange(height, dtype=torch.float32, device=boxes.device) + 0.5
    xs = torch.arange(width, dtype=torch.float32, device=boxes.device) + 0.5
    inside_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] < boxes[:, 3:4])  # [B, H]
    inside_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] < boxes[:, 2:3])  # [B, W]
    raster = (inside_y[:, :, None] & inside_x[:, None, :]).float()
    return prepare_mask(raster, erode, blur)


def mask_to_latent(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A face mask [B, H, W] resized to the latent grid (h, w): [B, h, w] in [0, 1].

    Shrinking averages each latent pixel's area (its value is the face fraction it covers, so a latent pixel half
    on the face weighs half in the losses); enlarging interpolates bilinearly. The official code resizes
    bilinearly to 64² (at 512 px), which samples rather than averages and so drops thin rims of the blur ramp.
    """
    if mask.dim() != 3:
        raise ValueError(f"mask_to_latent wants a mask [B, H, W], got {tuple(mask.shape)}")
    h, w = int(latent_hw[0]), int(latent_hw[1])
    image = (mask if mask.is_floating_point() else mask.float()).unsqueeze(1)
    if h <= mask.shape[1] and w <= mask.shape[2]:
        out = F.interpolate(image, size=(h, w), mode="area")
    else:
        out = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)
    return out.squeeze(1).clamp(0, 1)


# --- losses ---

def _outside_mse(a: torch.Tensor, b: torch.Tensor, face_mask_latent: torch.Tensor | None, name: str) -> torch.Tensor:
    """Σ (1 − m) (a − b)² / (C Σ (1 − m)) per sample, averaged over the batch; see disentanglement_loss."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"{name} wants two predictions of one shape [B, C, h, w], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    batch, channels, h, w = a.shape
    if face_mask_latent is None:
        outside = torch.ones(batch, 1, h, w, dtype=torch.float32, device=a.device)
    else:
        mask = face_mask_latent.unsqueeze(1) if face_mask_latent.dim() == 3 else face_mask_latent
        if mask.dim() != 4 or mask.shape[0] != batch or mask.shape[1] != 1 or mask.shape[2:] != (h, w):
            raise ValueError(f"{name} wants a face mask [B, h, w] or [B, 1, h, w] on the predictions' latent grid "
                             f"{(batch, h, w)}, got {tuple(face_mask_latent.shape)} (see mask_to_latent)")
        outside = 1 - (mask if mask.is_floating_point() else mask.float())
    diff = _loss_precision(a) - _loss_precision(b)
    outside = outside.to(diff.dtype)
    per_sample = (outside * diff.square()).sum(dim=(1, 2, 3))
    area = outside.sum(dim=(1, 2, 3)) * channels
    has_outside = area > 0
    # With no outside area the numerator is an exact 0 (every weight is 0); dividing it by 1 keeps it there.
    return (per_sample / torch.where(has_outside, area, torch.ones_like(area))).mean()


def disentanglement_loss(pred_true: torch.Tensor, pred_augmented: torch.Tensor,
                         face_mask_latent: torch.Tensor) -> torch.Tensor:
    """Eq. 6: outside the face, the prediction with the true W+ and with an augmented W+ agree. A scalar ≥ 0.

    pred_true and pred_augmented are the UNet's noise predictions [B, C, h, w] from the same noisy latents, timestep
    and text, with the true W+ and with augment_wplus's W+; face_mask_latent [B, h, w] (or [B, 1, h, w]) is the
    face mask on the latent grid (mask_to_latent). Each latent pixel counts with weight 1 − mask, so the face
    itself is free to change with W+ while the rest may not.

    Normalisation: per sample, the weighted squared error summed over channels and pixels divided by C times the
    outside area Σ (1 − mask), i.e. the mean squared error over the outside only; then the mean over the batch,
    where a sample without outside area (a face filling the frame) contributes 0. The official code instead takes
    F.mse_loss over every element, masked ones included as zeros, which makes the loss shrink as the face grows;
    the per-area mean keeps one weight meaning the same thing for close-ups and full-body shots.

    Gradient: as in train_wild.py, the augmented prediction is a target computed under no_grad, so it is detached
    here: only the true-W+ branch (the one that also gets the reconstruction loss) is pulled towards agreement.
    """
    return _outside_mse(pred_true, pred_augmented.detach(), face_mask_latent, "disentanglement_loss")


def regularisation_loss(pred_with_wplus: torch.Tensor, pred_without_wplus: torch.Tensor,
                        face_mask_latent: torch.Tensor | None) -> torch.Tensor:
    """Eq. 7: the W+ branch's effect outside the face kept small. A scalar ≥ 0.

    pred_with_wplus is the prediction [B, C, h, w] with the W+ branch on (α = 1), pred_without_wplus the same UNet
    call with it off (α = 0, the plain SD prediction for this text); same weighting and normalisation as
    disentanglement_loss, so changes inside the face cost nothing.

    pred_without_wplus is detached: it is the base model's own answer, the anchor the W+ branch must not drag the
    background away from. With α = 0 the trainable processors only pass the frozen text attention through, so it
    carries no useful gradient anyway, and detaching it (the official code computes it under no_grad) guarantees
    the loss never moves the anchor towards the W+ prediction, whatever else is trained.

    face_mask_latent=None gives the official code's loss: train_wild.py's loss_preserve is unmasked (its masked
    version is commented out), i.e. the plain MSE over every element.
    """
    return _outside_mse(pred_with_wplus, pred_without_wplus.detach(), face_mask_latent, "regularisation_loss")


# --- W+ augmentation and drop-out ---

def _derangement(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """A random permutation of range(n) without fixed points (n > 1): one random n-cycle.

    randperm orders the indices, and each one takes the next one's sample in that order (the last takes the
    first's): every index moves, and every n-cycle is equally likely. Not uniform over all derangements (those with
    several cycles never occur), which a shuffle for a background-agreement target does not need.
    """
    order = torch.randperm(n, generator=generator, device=generator.device if generator is not None else "cpu")
    perm = torch.empty_like(order)
    perm[order] = order.roll(-1)
    return perm


def augment_wplus(w: torch.Tensor, mode: str, generator: torch.Generator | None = None, *,
                  std: float | None = None, direction: torch.Tensor | None = None,
                  strength_range: tuple[float, float] = OFFICIAL_DIRECTION_STRENGTH) -> torch.Tensor:
    """An augmented copy of W+ codes w [B, 18, 512] for the disentanglement loss; w itself is never changed.

    mode:
    - "shuffle": another sample's W+ (the paper's strategy 1): w[perm] with perm a derangement (a random B-cycle)
      when B > 1, so every sample really gets someone else's code. train_wild.py uses random.shuffle, which can
      leave samples in place, and those then get a zero loss for that step. At B = 1 there is nobody to swap
      with and the code comes back unchanged (a copy): the disentanglement loss is then 0; use "gaussian" or
      "direction" for batches of one.
    - "gaussian": w + noise (strategy 2). With ``std`` given, noise = std · N(0, 1) per element. With std=None,
      train_wild.py's draw: noise = s · N(mean(w), std(w)) with the batch's overall mean and std and one strength
      s ~ U(−8, 8) per call (the official code draws s from randint(−80, 80) / 10 and adds the noise to the
      shuffled codes; strategy 3, "shuffle + Gaussian", is augment_wplus(augment_wplus(w, "shuffle"), "gaussian")).
    - "direction": w + s · direction with one s ~ U(strength_range) per sample, as get_w_direction does
      (±60 there, which suits its pre-scaled offline directions; unit-norm InterFaceGAN directions want a few units).
      direction is [18, 512] (one for the batch) or [B, 18, 512]; rows of direction that are zero (layers an edit
      leaves alone) stay exactly as they were.

    Draws come from ``generator`` (on its own device), so a seeded generator repeats the augmentation exactly.
    """
    if w.dim() != 3:
        raise ValueError(f"augment_wplus wants W+ codes [B, layers, 512], got {tuple(w.shape)}")
    batch = w.shape[0]
    if mode == "shuffle":
        if batch < 2:
            return w.clone()
        return w[_derangement(batch, generator).to(w.device)]
    if mode == "gaussian":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(w.shape, generator=generator, device=gen_device, dtype=torch.float32).to(w.device)
        if std is None:
            lo, hi = OFFICIAL_GAUSSIAN_STRENGTH
            strength = lo + (hi - lo) * _uniform(1, generator, w.device)
            w32 = w.detach().float()
            noise = strength * (w32.mean() + w32.std() * noise)
        else:
            if not (math.isfinite(std) and std >= 0):
                raise ValueError(f"augment_wplus wants a finite std >= 0, got {std!r}")
            noise = std * noise
        return w + noise.to(w.dtype)
    if mode == "direction":
        if direction is None:
            raise ValueError("augment_wplus(mode='direction') needs a direction [layers, 512] or [B, layers, 512]")
        if direction.shape not in (w.shape[1:], w.shape):
            raise ValueError(f"augment_wplus wants a direction {tuple(w.shape[1:])} or {tuple(w.shape)}, got "
                             f"{tuple(direction.shape)}")
        lo, hi = float(strength_range[0]), float(strength_range[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError("augment_wplus wants a finite strength_range (lo, hi) with lo <= hi, "
                             f"got {strength_range!r}")
        dtype = torch.promote_types(w.dtype, torch.float32)
        strength = (lo + (hi - lo) * _uniform(batch, generator, w.device)).to(dtype)
        return w + (strength.view(batch, 1, 1) * direction.to(w.device, dtype)).to(w.dtype)
    raise ValueError(f"augment_wplus: mode must be 'shuffle', 'gaussian' or 'direction', got {mode!r}")


def wplus_dropout(batch: int, p_wplus: float = OFFICIAL_DROP_RATE, p_text: float = OFFICIAL_DROP_RATE,
                  p_both: float = OFFICIAL_DROP_RATE,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples drop their W+ and which their text, for classifier-free guidance: (drop_wplus [B], drop_text [B]).

    As train_wild.py's MyDataset: one draw u ~ U[0, 1) per sample picks one of three exclusive cases, W+ only
    (u < p_wplus), text only (next p_text), both (next p_both), else neither. So W+ is dropped with probability
    p_wplus + p_both and the text with p_text + p_both (0.10 each at the official 0.05s), both together with
    p_both. A dropped W+ is replaced by the zero code (torch.zeros_like, the official unconditional W+), for the
    augmented code too; a dropped text is the empty prompt "".
    """
    rates = (p_wplus, p_text, p_both)
    if not all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in rates) or sum(rates) > 1:
        raise ValueError(f"wplus_dropout wants probabilities in [0, 1] summing to at most 1, got {rates!r}")
    u = _uniform(batch, generator, torch.device("cpu"))
    only_wplus = u < p_wplus
    only_text = (u >= p_wplus) & (u < p_wplus + p_text)
    both = (u >= p_wplus + p_text) & (u < p_wplus + p_text + p_both)
    return only_wplus | both, only_text | both


def apply_wplus_dropout(w: torch.Tensor, drop_wplus: torch.Tensor) -> torch.Tensor:
    """w [B, ...] with the dropped samples' codes replaced by zeros (the official unconditional W+)."""
    drop = drop_wplus.to(device=w.device, dtype=torch.bool).view(-1, *([1] * (w.dim() - 1)))
    return torch.where(drop, torch.zeros_like(w), w)


__all__ = [
    "PAPER_BLUR", "PAPER_ERODE", "apply_wplus_dropout", "augment_wplus", "disentanglement_loss",
    "face_region_mask", "mask_to_latent", "prepare_mask", "regularisation_loss", "wplus_dropout",
]
