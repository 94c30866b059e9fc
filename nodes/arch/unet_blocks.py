"""What every adapter needs of the UNet's transformer blocks, outside any one method: the base families, the
block names (ComfyUI's block key written ``input_4_0``) and dims, the attention call the arch modules take (the
trainer's kernel, or ComfyUI's passed in), layers that compute with weights cast to the activations, and the
residual added on the conditional CFG rows only. IDAdapter and the W+ adapter (and their bindings) import these
from here, never from each other.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelFileError
from .transfer import host_to_device

# Each base family's text encoders (ComfyUI's token-dict keys, in the base model's order: text_encoder,
# text_encoder_2), the UNet's cross-attention width, and whether the UNet also takes pooled text (SDXL's
# text_time conditioning).
FAMILIES = {
    "sd15": {"text_dims": {"l": 768}, "context_dim": 768, "pooled_text": False},
    "sd21": {"text_dims": {"h": 1024}, "context_dim": 1024, "pooled_text": False},
    "sdxl": {"text_dims": {"l": 768, "g": 1280}, "context_dim": 2048, "pooled_text": True},
}


def family_of_unet(context_dim: int, pooled_text: bool) -> str:
    """The base family of a UNet from its cross-attention width and whether it takes pooled text."""
    for family, spec in FAMILIES.items():
        if spec["context_dim"] == context_dim and spec["pooled_text"] == pooled_text:
            return family
    raise ConfigError(f"the base UNet has cross-attention width {context_dim}"
                      f"{' with' if pooled_text else ' without'} pooled-text conditioning; this pack supports "
                      "SD1.5 (768), SD2.x (1024) and SDXL base (2048 with pooled text) UNets")


BlockKey = tuple  # ("input" | "middle" | "output", block id, index inside the SpatialTransformer)

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

@dataclass
class BlockSpec:
    channels: int
    heads: int
    context_dim: int


class FamilyBlocksConfig:
    """What the adapters' file configs share, for dataclasses with the fields ``family`` (a key of FAMILIES) and
    ``blocks`` (block name -> BlockSpec, or its dict as read from a file's JSON)."""

    def check_family_and_blocks(self) -> None:
        if self.family not in FAMILIES:
            raise ModelFileError(f"unknown base family {self.family!r}; expected one of {sorted(FAMILIES)}")
        self.blocks = {
            name: spec if isinstance(spec, BlockSpec) else BlockSpec(**spec) for name, spec in self.blocks.items()
        }

    @property
    def context_dim(self) -> int:
        """The UNet's text width (the width of the tokens its cross-attention reads)."""
        return FAMILIES[self.family]["context_dim"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Lq, H*D] x [B, Lk, H*D] -> [B, Lq, H*D]; the trainer's kernel (ComfyUI passes its own)."""
    b, lq, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, lq, inner)


def block_name(key: BlockKey) -> str:
    return f"{key[0]}_{int(key[1])}_{int(key[2])}"


def cast_like(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight`` on x's device and in x's dtype, for this call only (no copy when they already match).

    Whoever owns the weights decides where they are stored (ComfyUI's memory manager may keep them on the CPU
    under --lowvram); the activations decide the compute dtype, unless autocast is choosing it (the trainer).
    """
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return weight.to(x.device)
    return weight.to(x)


class CastLinear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) computing with :func:`cast_like` weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, cast_like(self.weight, x), None if self.bias is None else cast_like(self.bias, x))


class CastLayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state-dict keys) computing with :func:`cast_like` weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else cast_like(self.weight, x)
        bias = None if self.bias is None else cast_like(self.bias, x)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def add_on_rows(x: torch.Tensor, rows: list[int] | None, residual: Callable) -> torch.Tensor:
    """``x`` with ``residual(x[sel], sel)`` added on the selected batch rows (None: every row).

    The adapter runs on the conditional CFG rows only. They are usually one contiguous run (ComfyUI's
    [uncond, cond] chunks), which is sliced: no index tensors, gathers or host-to-device copies.
    """
    if rows is None:
        return x + residual(x, slice(None))
    if not rows:
        return x
    start, stop = rows[0], rows[0] + len(rows)
    if rows == list(range(start, stop)):
        return torch.cat([x[:start], x[start:stop] + residual(x[start:stop], slice(start, stop)), x[stop:]])
    index = host_to_device(torch.tensor(rows, dtype=torch.long), x.device)
    return x.index_add(0, index, residual(x[index], index))
