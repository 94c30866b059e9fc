"""Binds ``nodes.arch.idadapter`` to a diffusers UNet2DConditionModel (the trainer's side of the parity).

The gated self-attention sits where diffusers' BasicTransformerBlock runs its GLIGEN ``fuser``: after the
self-attention residual, before cross-attention; ComfyUI's ``middle_patch`` is the same slot. Each block's
fuser is an :class:`AdapterFuser` wrapping the very ``GatedSelfAttention`` module the nodes load, and the UNet
is called with ``cross_attention_kwargs=idadapter_kwargs(...)``. diffusers hands the UNet-level "gligen"
arguments to ``unet.position_net`` and passes its result to every fuser; ours passes them through.

Transformer blocks are named like ComfyUI's block keys (``input_4_0``...), so trainer exports and node-side
patches address the same blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nodes.arch.idadapter import BlockSpec, GatedSelfAttention, IDAdapter, add_on_rows, block_name, sdpa_attention


def transformer_blocks(unet) -> dict[str, nn.Module]:
    """Every BasicTransformerBlock of a diffusers UNet under its ComfyUI block name."""
    named = {}
    input_id = 1  # input block 0 is conv_in
    for down in unet.down_blocks:
        for i, attention in enumerate(getattr(down, "attentions", None) or []):
            for t, block in enumerate(attention.transformer_blocks):
                named[block_name(("input", input_id + i, t))] = block
        input_id += len(down.resnets) + (1 if getattr(down, "downsamplers", None) else 0)
    for attention in getattr(unet.mid_block, "attentions", None) or []:
        for t, block in enumerate(attention.transformer_blocks):
            named[block_name(("middle", 0, t))] = block
    output_id = 0
    for up in unet.up_blocks:
        for i, attention in enumerate(getattr(up, "attentions", None) or []):
            for t, block in enumerate(attention.transformer_blocks):
                named[block_name(("output", output_id + i, t))] = block
        output_id += len(up.resnets)
    return named


def block_specs(unet) -> dict[str, BlockSpec]:
    return {
        name: BlockSpec(block.attn1.to_q.in_features, block.attn1.heads, block.attn2.to_k.in_features)
        for name, block in transformer_blocks(unet).items()
    }


class AdapterFuser(nn.Module):
    """diffusers' ``fuser`` slot running one block's GatedSelfAttention.

    ``objs``: {"tokens": E_r [B or 1, M, D], "active": bool [B] on the CPU, or None (rows whose image condition
    is kept; dropped rows skip the branch, as the node does on the unconditional chunk), "beta": float}.
    ``active`` stays on the host so choosing rows never waits for the GPU.
    """

    def __init__(self, gated: GatedSelfAttention):
        super().__init__()
        self.gated = gated

    def forward(self, hidden_states: torch.Tensor, objs: dict) -> torch.Tensor:
        tokens, active, beta = objs["tokens"], objs.get("active"), objs.get("beta", 1.0)
        if tokens.shape[0] != hidden_states.shape[0]:
            tokens = tokens[:1].expand(hidden_states.shape[0], -1, -1)
        rows = None if active is None else torch.as_tensor(active).nonzero().flatten().tolist()
        return add_on_rows(hidden_states, rows,
                           lambda y, sel: beta * self.gated.residual(y, tokens[sel], sdpa_attention))


class _PassObjects(nn.Module):
    """Stands in for GLIGEN's position net: the fusers receive the UNet-level arguments unchanged."""

    def forward(self, **objs):
        return objs


def attach(unet, adapter: IDAdapter) -> None:
    """Installs the adapter's gated attention in every transformer block it has weights for."""
    unet.position_net = _PassObjects()
    for name, block in transformer_blocks(unet).items():
        gated = adapter.adapters[name] if name in adapter.adapters else None
        if gated is not None:
            block.fuser = AdapterFuser(gated)


def idadapter_kwargs(tokens: torch.Tensor, active: torch.Tensor | None = None, beta: float = 1.0) -> dict:
    """``cross_attention_kwargs`` for a UNet call with the adapter on (for the ``active`` rows)."""
    return {"gligen": {"tokens": tokens, "active": active, "beta": beta}}
