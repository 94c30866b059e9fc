"""Binds ``nodes.arch.idadapter`` to a diffusers UNet2DConditionModel (the trainer's side of the parity).

The gated self-attention sits where diffusers' BasicTransformerBlock runs its GLIGEN ``fuser``: after the
self-attention residual, before cross-attention; ComfyUI's ``middle_patch`` is the same slot. Each block's
fuser is an :class:`AdapterFuser` wrapping the very ``GatedSelfAttention`` module the nodes load, and the UNet
is called with ``cross_attention_kwargs=idadapter_kwargs(...)``. diffusers hands the UNet-level "gligen"
arguments to ``unet.position_net`` and passes its result to every fuser; ours passes them through.

Transformer blocks are named like ComfyUI's block keys (``input_4_0``...), so trainer exports and node-side
patches address the same blocks.

The W+ adapter (``nodes.arch.wplus``) binds through attn2 instead: :func:`attach_wplus` installs a
:class:`WPlusAttnProcessor` holding the adapter's own ``ResidualCrossAttention`` of that block, and the UNet is called
with ``cross_attention_kwargs=wplus_kwargs(tokens, scale)`` (what ComfyUI's ``WPlusAttn2Replace`` computes).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..nodes.arch.idadapter import GatedSelfAttention, IDAdapter
from ..nodes.arch.unet_blocks import BlockSpec, add_on_rows, block_name, sdpa_attention


def transformer_blocks(unet) -> dict[str, nn.Module]:
    """Every BasicTransformerBlock of a diffusers UNet under its ComfyUI block name."""
    return {name: block for name, block, _ in _walk_transformer_blocks(unet)}


def block_downscales(unet) -> dict[str, int]:
    """Each transformer block's token-grid downscale relative to the latent (down/up block k of L: 2**k /
    2**(L-1-k); the middle block: 2**(L-1)), as ``patches.unet_block_downscales`` reads it off a ComfyUI UNet."""
    return {name: factor for name, _, factor in _walk_transformer_blocks(unet)}


def _walk_transformer_blocks(unet):
    """(ComfyUI block name, BasicTransformerBlock, downscale) in the UNet's order."""
    levels = len(unet.down_blocks)
    input_id = 1  # input block 0 is conv_in
    for level, down in enumerate(unet.down_blocks):
        for i, attention in enumerate(getattr(down, "attentions", None) or []):
            for t, block in enumerate(attention.transformer_blocks):
                yield block_name(("input", input_id + i, t)), block, 2**level
        input_id += len(down.resnets) + (1 if getattr(down, "downsamplers", None) else 0)
    for attention in getattr(unet.mid_block, "attentions", None) or []:
        for t, block in enumerate(attention.transformer_blocks):
            yield block_name(("middle", 0, t)), block, 2 ** (levels - 1)
    output_id = 0
    for level, up in zip(range(len(unet.up_blocks) - 1, -1, -1), unet.up_blocks):
        for i, attention in enumerate(getattr(up, "attentions", None) or []):
            for t, block in enumerate(attention.transformer_blocks):
                yield block_name(("output", output_id + i, t)), block, 2**level
        output_id += len(up.resnets)


def block_specs(unet) -> dict[str, BlockSpec]:
    return {
        name: BlockSpec(block.attn1.to_q.in_features, block.attn1.heads, block.attn2.to_k.in_features)
        for name, block in transformer_blocks(unet).items()
    }


class AdapterFuser(nn.Module):
    """diffusers' ``fuser`` slot running one block's GatedSelfAttention.

    ``objs``: {"tokens": E_r [B or 1, M, D], "active": bool [B] on the CPU, or None (rows whose image condition
    is kept; dropped rows skip the branch, as the node does on the unconditional chunk), "beta": float,
    "block_weights": {block name: weight} or None (missing = 1; a block at 0 skips the branch)}.
    ``active`` stays on the host so choosing rows never waits for the GPU.

    Training passes "row_mask" instead of "active": [B, 1, 1] on the device, 1 for the rows that keep their image
    condition and 0 for the others. Every row computes the branch, which is then multiplied by the mask: choosing
    rows on the host makes a data-dependent shape, which torch.compile cannot trace (the UNet would run eagerly), and
    an index copied to the device in every block.
    """

    def __init__(self, gated: GatedSelfAttention, name: str):
        super().__init__()
        self.gated = gated
        self.name = name

    def forward(self, hidden_states: torch.Tensor, objs: dict) -> torch.Tensor:
        tokens, active = objs["tokens"], objs.get("active")
        beta = objs.get("beta", 1.0) * (objs.get("block_weights") or {}).get(self.name, 1.0)
        if beta == 0:
            return hidden_states
        if tokens.shape[0] != hidden_states.shape[0]:
            tokens = tokens[:1].expand(hidden_states.shape[0], -1, -1)
        row_mask = objs.get("row_mask")
        if row_mask is not None:  # in the residual's dtype, as the row selection below adds it
            residual = self.gated.residual(hidden_states, tokens, sdpa_attention)
            return hidden_states + beta * row_mask.to(residual.dtype) * residual
        rows = None if active is None else torch.as_tensor(active).nonzero().flatten().tolist()
        return add_on_rows(hidden_states, rows,
                           lambda y, sel: beta * self.gated.residual(y, tokens[sel], sdpa_attention))


class _PassObjects(nn.Module):
    """Stands in for GLIGEN's position net: the fusers receive the UNet-level arguments unchanged."""

    def forward(self, **objs):
        return objs


class _NoAdapter(nn.Module):
    """The fuser of a block the adapter has no weights for (an idadapter/1 file may cover some blocks only): diffusers
    calls every block's fuser once the UNet gets the "gligen" argument."""

    def forward(self, hidden_states: torch.Tensor, objs: dict) -> torch.Tensor:
        return hidden_states


def attach(unet, adapter: IDAdapter) -> None:
    """Installs the adapter's gated attention in every transformer block it has weights for."""
    unet.position_net = _PassObjects()
    for name, block in transformer_blocks(unet).items():
        block.fuser = AdapterFuser(adapter.adapters[name], name) if name in adapter.adapters else _NoAdapter()


@torch.no_grad()
def add_kv_deltas(unet, kv_deltas: dict[str, dict[str, torch.Tensor]], weight: float = 1.0,
                  block_weights: dict[str, float] | None = None) -> None:
    """Adds an idadapter/1 file's cross-attention K/V deltas, times ``weight`` x each block's weight (missing = 1),
    to the UNet's attn2 weights in place (what Apply IDAdapter's weight patches add in ComfyUI)."""
    blocks = transformer_blocks(unet)
    for name, deltas in kv_deltas.items():
        strength = weight * (block_weights or {}).get(name, 1.0)
        for projection, delta in deltas.items():
            base = getattr(blocks[name].attn2, projection).weight
            base += strength * delta.to(base)


def idadapter_kwargs(tokens: torch.Tensor, active: torch.Tensor | None = None, beta: float = 1.0,
                     block_weights: dict[str, float] | None = None, row_mask: torch.Tensor | None = None) -> dict:
    """``cross_attention_kwargs`` for a UNet call with the adapter on (for the ``active`` rows, or times
    ``row_mask``: see :class:`AdapterFuser`), ``block_weights`` multiplying ``beta`` per block as Apply IDAdapter's
    do."""
    return {"gligen": {"tokens": tokens, "active": active, "beta": beta, "block_weights": block_weights,
                       "row_mask": row_mask}}


# ---- W+ adapter: an attn2 processor


WPLUS_KWARG = "wplus"  # the cross_attention_kwargs key the W+ processor reads


class WPlusAttnProcessor:
    """diffusers' attn2 processor of one block with the W+ adapter's residual cross-attention.

    The text attention is diffusers' ``AttnProcessor2_0`` step for step up to before ``to_out`` (spatial norm, group
    norm, ``norm_cross``, attention mask, ``norm_q``/``norm_k``, SDPA); then ``h + scale * layer.residual(h, tokens)``
    (the W+ branch: no mask, the attention's own head count, as ComfyUI's ``WPlusAttn2Replace`` passes
    ``n_heads``), then ``to_out``, the residual connection and the rescale the default processor applies. Without
    the ``wplus`` argument, or at scale 0, it computes exactly what ``AttnProcessor2_0`` does.

    ``layer`` is the adapter's own :class:`ResidualCrossAttention` (the module the nodes run; no copy). The
    processor is not an ``nn.Module``, so the adapter's parameters stay out of ``unet.parameters()`` and
    ``unet.state_dict()``: freezing or saving the UNet leaves the adapter alone; move and optimize it yourself.
    """

    def __init__(self, layer, name: str):
        self.layer = layer
        self.name = name

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 wplus: dict | None = None) -> torch.Tensor:
        import torch.nn.functional as F

        def attend(hidden_states, context, attention_mask, batch_size, sequence_length):
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
                attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
            head_dim = key.shape[-1] // attn.heads
            query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            h = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                               is_causal=False)
            h = h.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            scale = 0 if wplus is None else wplus.get("scale", 1.0) * (wplus.get("block_weights") or {}).get(
                self.name, 1.0)
            if scale != 0:  # h + scale * Attn(to_q_wplus(h), W+ tokens)
                h = h + scale * self.layer.residual(h, wplus["tokens"], sdpa_attention, attn.heads)
            return attn.to_out[1](attn.to_out[0](h))

        return around_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, attend)


def around_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, attend) -> torch.Tensor:
    """What diffusers' attention processors do around the attention itself: the spatial and group norms, 4-D inputs
    flattened to tokens, ``norm_cross`` of the context, then after ``attend`` the shape restored, the residual
    connection and the rescale. ``attend(hidden_states [B, N, C], context [B, T, D], attention_mask, batch_size,
    sequence_length)`` projects, attends and applies ``to_out``; the processors that differ only there share the
    rest."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    out = attend(hidden_states, encoder_hidden_states, attention_mask, batch_size, sequence_length)
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class _QuietWPlusKwarg(logging.Filter):
    """Drops diffusers' per-call warning that a processor without the ``wplus`` argument (attn1, attn2 of blocks
    the adapter does not cover) ignores it; any other unexpected argument is still reported."""

    _MESSAGE = f"cross_attention_kwargs {[WPLUS_KWARG]} are not expected by "

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self._MESSAGE)


def _quiet_wplus_warning() -> None:
    log = logging.getLogger("diffusers.models.attention_processor")
    if not any(isinstance(f, _QuietWPlusKwarg) for f in log.filters):
        log.addFilter(_QuietWPlusKwarg())


def attach_wplus(unet, adapter) -> list[str]:
    """Installs :class:`WPlusAttnProcessor` on the attn2 of every transformer block in ``adapter.config.blocks``
    (a :class:`~..nodes.arch.wplus.WPlusAdapter`); every other processor stays. Returns the block names.

    Each block's widths must match its config entry (``ConfigError`` otherwise, before anything is installed).
    Stacks with :func:`attach` (the IDAdapter): in a transformer block the IDAdapter's gated self-attention (the
    ``fuser`` slot, after self-attention) runs first, then attn2 with the W+ residual, as ComfyUI runs Apply
    IDAdapter's middle patch before Apply W+ Adapter's attn2 replace; merge the two ``cross_attention_kwargs``
    (``{**idadapter_kwargs(...), **wplus_kwargs(...)}``). The IDAdapter's K/V deltas, added to attn2's ``to_k`` /
    ``to_v`` weights, enter the text attention the W+ residual is computed from, as in ComfyUI.
    """
    from ..nodes.errors import ConfigError

    blocks = transformer_blocks(unet)
    config = adapter.config
    missing = sorted(set(config.blocks) - set(blocks))
    if missing:
        raise ConfigError(f"the W+ adapter has layers for blocks {missing[:5]} this UNet lacks (it has "
                          f"{sorted(blocks)[:5]}...): use the UNet the adapter was made for")
    for name, spec in config.blocks.items():
        attn2 = blocks[name].attn2
        got = (attn2.to_q.in_features, attn2.to_k.in_features)
        if got != (spec.channels, spec.context_dim) or attn2.to_q.out_features != spec.channels:
            raise ConfigError(f"block {name}: the W+ adapter expects {spec.channels} channels and context "
                              f"{spec.context_dim}, the UNet's cross-attention has {got[0]} and {got[1]}")
    for name in config.blocks:
        blocks[name].attn2.set_processor(WPlusAttnProcessor(adapter.layers[name], name))
    _quiet_wplus_warning()
    return sorted(config.blocks)


def wplus_kwargs(tokens: torch.Tensor, scale: float = 1.0, block_weights: dict[str, float] | None = None) -> dict:
    """``cross_attention_kwargs`` for a UNet call with the W+ adapter on: ``tokens`` [B or 1, 4, context] (one set
    per batch row, e.g. ``torch.cat([adapter.uncond_tokens(w), adapter.tokens(w)])`` for both CFG halves);
    ``block_weights`` multiply ``scale`` per block as Apply W+ Adapter's do."""
    return {WPLUS_KWARG: {"tokens": tokens, "scale": float(scale), "block_weights": block_weights}}
