"""What the IDAdapter and W+ patches share: ComfyUI's attention kernel for one block call (:func:`comfy_attention`),
the CFG chunks of a batch, a block's token grid, the Apply nodes' region masks (:func:`check_attn_mask`,
:class:`BlockMask`, cropped per tile for tiled sampling) and the base of both patches (:class:`IdentitiesPatch`: a
tuple of identities, joined by later Apply nodes into a new patch, never changed once attached).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from ..errors import ImageInputError, PackError
from .memory import PerDeviceMemo, StepSigma


def comfy_attention(extra_options: dict):
    """ComfyUI's current attention kernel for one block call, in the (q, k, v, heads) form the arch modules take.

    It gets the block's ``attn_precision`` (SD2.x asks for float32: its fp16 attention logits overflow) and the
    call's transformer options, as the block's own attention does, so an ``optimized_attention_override`` that a
    node put in the MODEL's transformer options (an attention-backend switch) runs for the adapter's attention too.
    """
    from comfy.ldm.modules.attention import optimized_attention

    precision = extra_options.get("attn_precision")

    def attention(q, k, v, heads):
        return optimized_attention(q, k, v, heads, attn_precision=precision, transformer_options=extra_options)

    return attention


def images_per_chunk(extra_options: dict, batch: int) -> int:
    """How many latent images each CFG chunk of a ``batch``-row call holds (ComfyUI stacks one copy of the latent
    batch per entry of ``cond_or_uncond``)."""
    return batch // len(extra_options.get("cond_or_uncond") or [0])


def conditional_rows(cond_or_uncond, batch: int) -> list[int] | None:
    """Row indices of the conditional CFG chunks, or None when every row is conditional."""
    if not cond_or_uncond or all(c == 0 for c in cond_or_uncond):
        return None
    per_chunk = batch // len(cond_or_uncond)
    return [i * per_chunk + j for i, c in enumerate(cond_or_uncond) if c == 0 for j in range(per_chunk)]


def token_grid(extra_options: dict, tokens: int) -> tuple[int, int]:
    """(h, w) of a block's token grid: the ``activations_shape`` [B, C, H, W] its SpatialTransformer sets, or
    where that is missing or does not fit, the downscale of the latent in ``original_shape`` that holds ``tokens``."""
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[-2] * shape[-1] == tokens:
        return int(shape[-2]), int(shape[-1])
    original = extra_options.get("original_shape")
    if original is None:
        raise PackError(f"cannot place {tokens} tokens: the block gave neither activations_shape nor original_shape")
    height, width = original[-2:]
    for level in range(8):
        f = 2**level
        h, w = math.ceil(height / f), math.ceil(width / f)
        if h * w == tokens:
            return h, w
    raise PackError(f"cannot place {tokens} tokens on the {height}x{width} latent grid")


def check_attn_mask(mask) -> torch.Tensor | None:
    """An Apply node's ``attn_mask`` as float [B, H, W] in [0, 1] (values outside are clamped), or None.

    A mask that is not [H, W] or [B, H, W], is empty, or holds NaN or infinite values is an error here, at apply.
    Whether B fits the latent batch (one mask for every image, or one per image) is known only at sampling
    (:meth:`BlockMask.for_rows`).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or 0 in mask.shape:
        got = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ImageInputError(f"attn_mask must be a MASK [batch, height, width] with at least one pixel, got {got}: "
                              "connect a mask node's output (e.g. Load Image's MASK, Solid Mask, Mask Composite)")
    mask = mask.detach().float()
    if not torch.isfinite(mask).all():
        raise ImageInputError("attn_mask contains NaN or infinite values: check the node that produced it (a mask "
                              "holds 0 to 1, white where the identity goes)")
    return mask.reshape(-1, *mask.shape[-2:]).clamp(0, 1)


class BlockMask:
    """A MASK [H, W] or [B, H, W] resized to each block's token grid, once per device, grid and row count.

    The batch rule: one mask for every image of the latent batch, or exactly one per image (mask i on image i
    in every CFG chunk); any other count is an error when the latent batch is known, at sampling.
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.detach().float().reshape(-1, *mask.shape[-2:])
        self._resized = PerDeviceMemo()

    def for_rows(self, extra_options: dict, images: int, rows: int, tokens: int, like: torch.Tensor) -> torch.Tensor:
        """[1 or rows, tokens, 1] for ``rows`` batch rows, ``images`` latent images per CFG chunk: the one mask,
        or each image's mask on its row of each of the ``rows // images`` chunks."""
        masks = self.mask.shape[0]
        if masks not in (1, images):
            raise ImageInputError(
                f"attn_mask is a batch of {masks} masks and the latent batch has {images} image{'s' * (images != 1)}: "
                f"give one mask for all images, or one per image (a batch of {images} mask{'s' * (images != 1)}, "
                f"or a latent batch of {masks})")
        h, w = token_grid(extra_options, tokens)

        def resized():
            mask = F.interpolate(self.mask.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)
            mask = mask.reshape(masks, h * w, 1).to(like.device, like.dtype)
            return mask if masks == 1 else mask.repeat(rows // images, 1, 1)

        return self._resized.get((like.device, like.dtype, h, w, rows), resized)

    def cropped(self, regions, source_width: int, source_height: int, target_width: int,
                target_height: int) -> BlockMask:
        """The mask of each tile of tiled sampling: for each (left, top, right, bottom) region in pixels of the
        ``source_width`` x ``source_height`` image, that part of the mask (0 outside the image), resized to
        ``target_width`` x ``target_height``; tile i of the batch gets region i's mask. A batch of masks (one per
        image) cannot follow the tiles of one image and is refused."""
        if self.mask.shape[0] != 1:
            raise ImageInputError(f"attn_mask is a batch of {self.mask.shape[0]} masks and the sampler tiles the image: "
                                  "tiled sampling takes one mask for the whole image (or sample without tiles)")
        sizes = (source_width, source_height, target_width, target_height)
        if not all(isinstance(n, int) and n > 0 for n in sizes) or not regions or not all(
                len(r) == 4 and all(isinstance(n, int) for n in r) and r[0] < r[2] and r[1] < r[3] for r in regions):
            raise PackError(f"tiled sampling gave regions {list(regions)[:4]} of a {source_width}x{source_height} image "
                            f"for {target_width}x{target_height} tiles: expected (left, top, right, bottom) pixel "
                            "rectangles and positive sizes")
        image = F.interpolate(self.mask.unsqueeze(1), size=(source_height, source_width), mode="bilinear",
                              align_corners=False)[0, 0]
        tiles = []
        for left, top, right, bottom in regions:
            inside = image[max(top, 0):min(bottom, source_height), max(left, 0):min(right, source_width)]
            tile = F.pad(inside, (max(-left, 0), max(right - source_width, 0), max(-top, 0),
                                  max(bottom - source_height, 0)))
            tiles.append(F.interpolate(tile[None, None], size=(target_height, target_width), mode="bilinear",
                                       align_corners=False)[0, 0])
        return BlockMask(torch.stack(tiles))

    def release_accelerator_values(self) -> None:
        self._resized.release_accelerator_values()


class MaskedIdentity:
    """What an identity of either patch keeps besides its own values: the adapter's ``patcher``, its sigma window,
    its mask and its tokens per device."""

    def __init__(self, patcher, sigma_start: float, sigma_end: float, mask: torch.Tensor | None):
        self.patcher = patcher
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self.mask = None if mask is None else BlockMask(mask)
        self._tokens = PerDeviceMemo()

    def in_window(self, sigma: float | None) -> bool:
        return sigma is None or self.sigma_end <= sigma <= self.sigma_start

    def with_mask(self, mask: BlockMask):
        """This identity with another mask (this one stays as it is)."""
        identity = copy.copy(self)
        identity.mask, identity._tokens = mask, PerDeviceMemo()
        return identity

    def release_accelerator_values(self) -> None:
        self._tokens.release_accelerator_values()
        if self.mask is not None:
            self.mask.release_accelerator_values()


class IdentitiesPatch:
    """What the IDAdapter and W+ patches share: a tuple of identities (:class:`MaskedIdentity`), joined by later
    apply nodes into a new patch, never changed once attached."""

    identities: tuple

    def joined(self, other):
        """A new patch with this patch's identities and then ``other``'s (both stay as they are)."""
        return self._replace(identities=self.identities + other.identities)

    def _replace(self, **changes):
        """A copy of this patch with ``changes`` (attribute: value); this one stays as it is."""
        patch = copy.copy(self)
        patch.__dict__.update(changes)
        patch._sigma = StepSigma()
        return patch

    def spatial_crop_inputs(self, *, regions, source_width: int, source_height: int, target_width: int,
                            target_height: int, **kwargs):
        """ComfyUI's protocol for tiled sampling: a patch for tiles cut out of the image. ``regions`` are the tiles'
        (left, top, right, bottom) rectangles in pixels of the ``source_width`` x ``source_height`` image, tile i
        being image i of the tiled batch, each resized to ``target_width`` x ``target_height``. Each identity's mask
        becomes each tile's part of it (:meth:`BlockMask.cropped`); without masks the patch is the same for every
        tile and comes back as it is. This patch stays as it is."""
        crop = (regions, source_width, source_height, target_width, target_height)
        if all(identity.mask is None for identity in self.identities):
            return self
        return self._replace(identities=tuple(identity.with_mask(identity.mask.cropped(*crop))
                                              if identity.mask is not None else identity
                                              for identity in self.identities))

    def __deepcopy__(self, memo):
        return self  # immutable once attached: clones share it (and its patchers)

    def _patchers(self) -> list:
        """Each adapter file's patcher once, for ComfyUI's ``load_models_gpu``."""
        return list({id(i.patcher): i.patcher for i in self.identities}.values())

    def _release_if_cpu(self, device_or_dtype) -> None:
        """On a move to the CPU, lets go of the identities' copies on accelerators."""
        if isinstance(device_or_dtype, (str, torch.device)) and torch.device(device_or_dtype).type == "cpu":
            for identity in self.identities:
                identity.release_accelerator_values()
