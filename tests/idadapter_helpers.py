"""Tiny IDAdapter configurations for tests."""

import torch

from comfyui_idadapter.nodes.arch.idadapter import IDAdapter, IDAdapterConfig, IDAdapterWeights
from comfyui_idadapter.nodes.arch.unet_blocks import FAMILIES, BlockSpec

TINY_BLOCKS = {
    "input_1_0": BlockSpec(32, 2, 768),
    "middle_0_0": BlockSpec(64, 2, 768),
    "output_3_0": BlockSpec(32, 2, 768),
}


def tiny_config(family="sd15", blocks=None, **overrides) -> IDAdapterConfig:
    context = FAMILIES[family]["context_dim"]
    blocks = blocks or {k: BlockSpec(v.channels, v.heads, context) for k, v in TINY_BLOCKS.items()}
    kwargs = dict(clip_vision_dim=48, width=32, mff_heads=2, num_tokens=4, embed_dim=24, textual_hidden=32)
    kwargs.update(overrides)
    return IDAdapterConfig(family=family, blocks=blocks, **kwargs)


def tiny_adapter(family="sd15", gamma=0.0, seed=0, with_kv=True, **overrides) -> IDAdapterWeights:
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    adapter = IDAdapter(cfg)
    with torch.no_grad():
        for module in adapter.adapters.values():
            module.gamma.fill_(gamma)
    kv = {}
    if with_kv:
        kv = {name: {p: torch.randn(spec.channels, spec.context_dim) * 0.01 for p in ("to_k", "to_v")}
              for name, spec in cfg.blocks.items()}
    return IDAdapterWeights(adapter.eval().requires_grad_(False), kv)


class StandInPatcher:
    """What the IDAdapter patch uses of ComfyUI's ModelPatcher, for tests outside ComfyUI: ``.model``, the module
    the patcher owns (the adapter's gated-attention modules)."""

    def __init__(self, model):
        self.model = model
