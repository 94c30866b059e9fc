"""The IDAdapter patch: :class:`IDAdapterMiddlePatch`, a ``middle_patch`` ``(x, extra_options) -> x`` running the
gated self-attention of every identity between self- and cross-attention of every transformer block, and
:func:`add_idadapter`, which joins it to the MODEL's IDAdapter patch and adds the file's cross-attention K/V deltas
as weight patches (:func:`add_kv_patches`: they stack with LoRAs).
"""

from __future__ import annotations

import torch

from ..arch.idadapter import IDAdapter
from ..arch.unet_blocks import add_on_rows, block_name
from ..errors import PackError
from .memory import StepSigma, module_patcher
from .shared import IdentitiesPatch, MaskedIdentity, comfy_attention, conditional_rows, images_per_chunk
from .unet_layout import kv_weight_patches


def adapter_patcher(adapter: IDAdapter):
    """The model patcher of ``adapter``'s gated-attention modules (all the UNet patch runs)."""
    return module_patcher(adapter.adapters)


class IdentityResidual(MaskedIdentity):
    """One Apply IDAdapter's identity: its adapter (through the patcher), tokens E_r, weight beta, sigma window,
    mask and block weights, and the gated-attention residual it adds in a block."""

    def __init__(self, patcher, tokens: torch.Tensor, weight: float, sigma_start: float, sigma_end: float,
                 mask: torch.Tensor | None, block_weights: dict[str, float] | None):
        super().__init__(patcher, sigma_start, sigma_end, mask)
        self.tokens = tokens.detach()
        self.weight = float(weight)
        self.block_weights = dict(block_weights or {})

    def weight_at(self, name: str, sigma: float | None) -> float:
        """beta x the block's weight; 0 where the adapter has no such block or sigma is outside the window."""
        if name not in self.patcher.model or not self.in_window(sigma):
            return 0.0
        return self.weight * self.block_weights.get(name, 1.0)

    def residual(self, y: torch.Tensor, name: str, weight: float, extra_options: dict, like: torch.Tensor,
                 attention, images: int) -> torch.Tensor:
        """The residual on ``y``, the conditional rows of a call with ``images`` latent images per CFG chunk."""
        tokens = self._tokens.get((like.device, like.dtype), lambda: self.tokens.to(like.device, like.dtype))
        if tokens.shape[0] != y.shape[0]:
            tokens = tokens[:1].expand(y.shape[0], -1, -1)
        out = self.patcher.model[name].residual(y, tokens, attention=attention) * weight
        if self.mask is not None:
            out = out * self.mask.for_rows(extra_options, images, y.shape[0], y.shape[1], like)
        return out


class IDAdapterMiddlePatch(IdentitiesPatch):
    """``y + sum_i beta_i * tanh(gamma) * S_i([y, proj(E_r,i)])[:, :len(y)] * mask_i`` on conditional chunks.

    One patch per MODEL holds every identity its Apply IDAdapter nodes added (:meth:`joined`): each identity's
    residual is computed from the same ``y`` and the residuals are summed, so two identities with disjoint masks do
    not see each other's change (chained patches would feed the first's output to the second).
    The unconditional chunk runs the plain UNet: training drops the image condition by switching the adapter
    branch off, so this is the model's own unconditional prediction (and it halves the adapter's cost).
    ``patcher`` is the ComfyUI model patcher of the adapter's gated-attention modules (:func:`adapter_patcher`);
    the patch reads the modules through its ``.model`` at call time, wherever ComfyUI has put them.
    ``block_weights`` ({block name: weight}, missing = 1) multiply ``weight`` per block; a block where every
    identity is at 0 gets ``x`` back untouched. ``attention`` replaces ComfyUI's kernel (:func:`comfy_attention`),
    for tests outside ComfyUI.
    """

    def __init__(
        self,
        patcher,
        tokens: torch.Tensor,
        weight: float,
        sigma_start: float = float("inf"),
        sigma_end: float = 0.0,
        mask: torch.Tensor | None = None,
        attention=None,
        block_weights: dict[str, float] | None = None,
    ):
        self.identities = (IdentityResidual(patcher, tokens, weight, sigma_start, sigma_end, mask, block_weights),)
        self.attention = attention
        self._sigma = StepSigma()

    def models(self) -> list:
        """The patchers ComfyUI's ``load_models_gpu`` loads with the MODEL (each adapter file's once)."""
        return self._patchers()

    def to(self, device_or_dtype, **kwargs):
        """ComfyUI calls ``.to(load device)`` and ``.to(model dtype)`` before sampling (0.38: ``.to(device)`` in each
        multi-GPU thread too) and ``.to(offload device)`` when it detaches the MODEL. The weights move through
        :meth:`models` and the per-device tensors are made on first use, so only a move to the CPU has work: it
        lets go of the copies on accelerators. Returns the patch itself, so every thread shares one object."""
        self._release_if_cpu(device_or_dtype)
        return self

    def __call__(self, x: torch.Tensor, extra_options: dict, **kwargs) -> torch.Tensor:
        block = extra_options.get("block")
        if block is None:
            return x
        name = block_name((block[0], block[1], extra_options.get("block_index", 0)))
        sigmas = extra_options.get("sigmas")
        sigma = None if sigmas is None else self._sigma.get(sigmas)
        active = [(identity, w) for identity in self.identities if (w := identity.weight_at(name, sigma)) != 0]
        if not active:
            return x
        rows = conditional_rows(extra_options.get("cond_or_uncond"), x.shape[0])
        images = images_per_chunk(extra_options, x.shape[0])
        attention = self.attention or comfy_attention(extra_options)

        def residual(y, _rows):
            total = None
            for identity, weight in active:
                out = identity.residual(y, name, weight, extra_options, x, attention, images)
                total = out if total is None else total + out
            return total

        return add_on_rows(x, rows, residual)


def add_idadapter(model, patch: IDAdapterMiddlePatch, kv_deltas: dict[str, dict[str, torch.Tensor]], weight: float,
                  block_weights: dict[str, float] | None = None) -> None:
    """Adds an identity to ``model`` (a clone): joined to the IDAdapter patch the MODEL already has, if any (in its
    place among other packs' middle patches), else appended. The adapter file's K/V deltas are added only if no
    identity before this one added them: they belong to the file, not to an identity, so the first apply's weight
    sets them."""
    options = model.model_options.setdefault("transformer_options", {})
    middle = options.get("patches", {}).get("middle_patch", [])
    earlier = next((p for p in middle if isinstance(p, IDAdapterMiddlePatch)), None)
    (identity,) = patch.identities
    if earlier is None or all(i.patcher is not identity.patcher for i in earlier.identities):  # this file's first
        add_kv_patches(model, kv_deltas, weight, block_weights)
    if earlier is None:
        model.set_model_patch(patch, "middle_patch")
    else:
        options["patches"] = {**options["patches"], "middle_patch": [earlier.joined(patch) if p is earlier else p
                                                                    for p in middle]}


def add_kv_patches(model, kv_deltas: dict[str, dict[str, torch.Tensor]], weight: float,
                   block_weights: dict[str, float] | None = None) -> None:
    """Adds the K/V deltas to ``model`` (a clone) with strength ``weight`` x each block's weight (missing = 1);
    blocks at 0 get no patch, so their weights stay the base model's bit for bit."""
    block_weights = block_weights or {}
    by_strength: dict[float, dict] = {}
    for name, deltas in kv_deltas.items():
        strength = weight * block_weights.get(name, 1.0)
        if strength != 0:
            by_strength.setdefault(strength, {}).update(kv_weight_patches({name: deltas}))
    for strength, entries in by_strength.items():
        applied = model.add_patches(entries, strength_patch=strength)
        missing = [] if applied is None else sorted(set(entries) - set(applied))  # None: a patcher that cannot say
        if missing:  # ComfyUI skips keys its model does not have, without a word
            raise PackError(f"the MODEL has no weights {missing[:2]}{' ...' if len(missing) > 2 else ''} "
                            f"({len(missing)} of the adapter's {len(entries)} cross-attention weights): its UNet is "
                            "not laid out as the SD1.5/SD2.x/SDXL UNet the adapter was trained for; load the "
                            "checkpoint with a standard loader (Load Checkpoint)")
