"""The layout of ComfyUI's UNet: its transformer blocks under the pack's block names, each block's token-grid
downscale, a node's block weights over those blocks, ComfyUI's state-dict keys of the cross-attention weights
(K/V deltas as ``add_patches`` entries) and its ``patches_replace`` keys.
"""

from __future__ import annotations

import torch

from ..arch import block_weights as block_weights_arch
from ..arch.unet_blocks import BlockSpec, block_name


def unet_transformer_blocks(diffusion_model) -> dict[str, BlockSpec]:
    """Every BasicTransformerBlock of a ComfyUI UNet under its block name (``input_4_0``, ``middle_0_0``...)."""
    return {name: BlockSpec(channels=tb.attn1.to_q.in_features, heads=tb.attn1.heads,
                            context_dim=tb.attn2.to_k.in_features)
            for name, tb, _ in _walk_transformer_blocks(diffusion_model)}


def unet_block_downscales(diffusion_model) -> dict[str, int]:
    """Each transformer block's token-grid downscale relative to the latent (1, 2, 4, ...), from where the UNet's
    Downsample and Upsample layers sit."""
    return {name: factor for name, _, factor in _walk_transformer_blocks(diffusion_model)}


def unet_block_weights(diffusion_model, family: str, covered, preset: str, text: str) -> dict[str, float]:
    """{block name: weight} for the blocks a patch ``covered`` in this UNet, from a node's preset and text
    (:mod:`.arch.block_weights`)."""
    downscales = unet_block_downscales(diffusion_model)
    levels = block_weights_arch.block_levels({name: downscales[name] for name in covered if name in downscales},
                                             family)
    return block_weights_arch.block_weights(preset, text, levels)


def _walk_transformer_blocks(diffusion_model):
    """(block name, BasicTransformerBlock, downscale) in the UNet's order. An input block's Downsample halves what
    follows it; an output block's Upsample is its last layer, so it doubles what the next blocks see."""
    factor = 1
    groups = [("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
              ("output", diffusion_model.output_blocks)]
    for kind, sequence in groups:
        for ident, block in enumerate(sequence):
            for layer in block:
                if type(layer).__name__ == "Downsample":
                    factor *= 2
                for index, tb in enumerate(getattr(layer, "transformer_blocks", [])):
                    yield block_name((kind, ident, index)), tb, factor
                if type(layer).__name__ == "Upsample":
                    factor //= 2


def attn2_weight_key(name: str, proj: str) -> str:
    """ComfyUI's state-dict key of a block's cross-attention projection weight."""
    kind, ident, index = name.rsplit("_", 2)
    container = "middle_block" if kind == "middle" else f"{kind}_blocks.{ident}"
    return f"diffusion_model.{container}.1.transformer_blocks.{index}.attn2.{proj}.weight"


def kv_weight_patches(kv_deltas: dict[str, dict[str, torch.Tensor]]) -> dict[str, tuple]:
    """``add_patches`` entries: a 1-tuple is ComfyUI's "diff" patch, weight += strength * delta."""
    return {attn2_weight_key(name, proj): (delta,) for name, deltas in kv_deltas.items() for proj, delta in deltas.items()}


def block_key(name: str) -> tuple[str, int, int]:
    """A pack block name ("input_1_0") as ComfyUI's patches_replace key (("input", 1, 0))."""
    kind, number, index = name.rsplit("_", 2)
    return kind, int(number), int(index)
