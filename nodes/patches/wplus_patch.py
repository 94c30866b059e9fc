"""The W+ adapter patch: :class:`WPlusAttn2Replace`, an attn2 replace patch per transformer block that adds the
residual cross-attention of every W+ code to the block's text attention (on top of the replace patch that was
there before), and :func:`add_wplus`, which installs it.
"""

from __future__ import annotations

import torch

from ..errors import PackError
from .memory import StepSigma
from .shared import IdentitiesPatch, MaskedIdentity, comfy_attention, images_per_chunk
from .unet_layout import block_key


def previous_attn2_replace(model, key: tuple[str, int, int]):
    """The attn2 replace patch ComfyUI would run at ``key`` now (its 3-part key first, else the 2-part one)."""
    replaces = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return replaces.get(key, replaces.get(key[:2]))


class WPlusIdentity(MaskedIdentity):
    """One Apply W+ Adapter's code: the adapter (through the patcher), the code's tokens and the zero code's, the
    scale for this block, the sigma window and the mask, and the residual it adds to one block's text attention."""

    def __init__(self, patcher, tokens: torch.Tensor, uncond_tokens: torch.Tensor, scale: float, sigma_start: float,
                 sigma_end: float, mask: torch.Tensor | None):
        super().__init__(patcher, sigma_start, sigma_end, mask)
        self.tokens, self.uncond_tokens = tokens.detach(), uncond_tokens.detach()
        self.scale = float(scale)

    def active_at(self, sigma: float | None) -> bool:
        return self.scale != 0 and self.in_window(sigma)

    def residual(self, block: str, h: torch.Tensor, extra_options: dict, attention, heads: int) -> torch.Tensor:
        chunks = extra_options.get("cond_or_uncond") or [0]
        per_chunk = images_per_chunk(extra_options, h.shape[0])
        tokens = self._tokens.get((h.device, h.dtype, tuple(chunks), per_chunk),
                                  lambda: self._batch_tokens(chunks, per_chunk, h))
        out = self.scale * self.patcher.model.layers[block].residual(h, tokens, attention, heads)
        if self.mask is not None:
            out = out * self.mask.for_rows(extra_options, per_chunk, h.shape[0], h.shape[1], h)
        return out

    def _batch_tokens(self, chunks, per_chunk: int, like: torch.Tensor) -> torch.Tensor:
        """The tokens of every batch row: per CFG chunk the W+ codes' (one per image, or one for all) or a zero
        W+'s."""
        def rows(tokens):
            if tokens.shape[0] not in (1, per_chunk):
                raise PackError(f"{tokens.shape[0]} W+ codes for a batch of {per_chunk} latents: give one code, or "
                                "one per latent (a batch of W+ codes needs an Empty Latent Image of that batch size)")
            return tokens.expand(per_chunk, -1, -1)

        return torch.cat([rows(self.uncond_tokens if c == 1 else self.tokens) for c in chunks]).to(like.device,
                                                                                                  like.dtype)


class WPlusAttn2Replace(IdentitiesPatch):
    """An attn2 replace patch adding the W+ adapter's residual cross-attention to one block's text attention.

    ``h`` (before to_out) comes from the replace patch that was installed at this block before (so this stacks on
    IPAdapter-style packs) or, without one, ComfyUI's attention kernel; inside the sigma window the result is
    ``h + scale * Attn(to_q_wplus(h), to_k_wplus(w), to_v_wplus(w))`` (times the mask, if any), the conditional
    CFG chunks with the W+ code's tokens and the unconditional ones with a zero W+'s, as the official pipeline.
    Several Apply W+ Adapter nodes (one code and mask each) share one patch per block (:meth:`joined`): every
    code's residual is computed from the same ``h`` and the residuals are summed.
    ``patcher`` owns the adapter's modules (memory manager); they are read through ``patcher.model`` per call.
    ``attention`` replaces ComfyUI's kernel (:func:`comfy_attention`), for tests outside ComfyUI.
    """

    def __init__(self, patcher, block: str, tokens: torch.Tensor, uncond_tokens: torch.Tensor, scale: float,
                 sigma_start: float = float("inf"), sigma_end: float = 0.0, mask: torch.Tensor | None = None,
                 previous=None, attention=None):
        self.block = block
        self.identities = (WPlusIdentity(patcher, tokens, uncond_tokens, scale, sigma_start, sigma_end, mask),)
        self.previous = previous
        self.attention = attention
        self._sigma = StepSigma()

    def models(self) -> list:
        earlier = self.previous.models() if hasattr(self.previous, "models") else []
        return [*self._patchers(), *earlier]

    def to(self, device_or_dtype, **kwargs):
        """As :meth:`.idadapter_patch.IDAdapterMiddlePatch.to`, and the patch it wraps is moved too. This patch is
        never changed (every clone and every multi-GPU thread shares it): where the wrapped patch's ``to`` gives
        another object, the result is a copy of this patch around that one."""
        self._release_if_cpu(device_or_dtype)
        previous = self.previous.to(device_or_dtype, **kwargs) if hasattr(self.previous, "to") else self.previous
        return self if previous is self.previous else self._replace(previous=previous)

    def spatial_crop_inputs(self, **crop):
        """As :meth:`IdentitiesPatch.spatial_crop_inputs`, and the wrapped patch is cropped too where it can be."""
        patch = super().spatial_crop_inputs(**crop)
        if hasattr(self.previous, "spatial_crop_inputs"):
            previous = self.previous.spatial_crop_inputs(**crop)
            if previous is not self.previous:
                patch = patch._replace(previous=previous)
        return patch

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict,
                 **kwargs) -> torch.Tensor:
        heads = extra_options["n_heads"]
        attention = self.attention or comfy_attention(extra_options)
        h = self.previous(q, k, v, extra_options) if self.previous is not None else attention(q, k, v, heads)
        sigmas = extra_options.get("sigmas")
        sigma = None if sigmas is None else self._sigma.get(sigmas)
        active = [identity for identity in self.identities if identity.active_at(sigma)]
        if not active:
            return h
        total = None
        for identity in active:
            out = identity.residual(self.block, h, extra_options, attention, heads)
            total = out if total is None else total + out
        return h + total


def add_wplus(model, patch: WPlusAttn2Replace) -> None:
    """Installs ``patch`` at its block of ``model`` (a clone): joined to the W+ patch already there, if any, else on
    top of whatever patch was there before (``patch.previous``)."""
    key = block_key(patch.block)
    earlier = previous_attn2_replace(model, key)
    if isinstance(earlier, WPlusAttn2Replace):
        patch = earlier.joined(patch)
    else:
        patch.previous = earlier
    model.set_model_attn2_replace(patch, *key)
