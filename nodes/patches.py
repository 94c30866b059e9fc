"""ComfyUI-side patch objects: the only module that knows ComfyUI's patch call signatures and UNet layout.

- :class:`IDAdapterMiddlePatch`: a ``middle_patch`` ``(x, extra_options) -> x`` running IDAdapter's gated
  self-attention between self- and cross-attention of every transformer block.
- :func:`kv_weight_patches`: cross-attention K/V deltas as ``ModelPatcher.add_patches`` entries (they stack
  with LoRAs).
- :func:`inject_identity_tokens`: puts identity vectors where the identifier word's tokens are in the
  output of ``clip.tokenize``.

Patch objects are immutable once attached and share their weights across ``model.clone()`` (ComfyUI
deep-copies ``model_options`` on every clone). They move their small weights to the activations' device and
dtype when called, keeping one converted copy per (device, dtype).
"""

from __future__ import annotations

import copy
import math
import weakref

import torch
import torch.nn.functional as F

from .arch.idadapter import BlockSpec, IDAdapter, add_on_rows, block_name
from .errors import PackError

_converted: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def module_on(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` on device/dtype, made once and shared by every patch that uses the module."""
    per_module = _converted.setdefault(module, {})
    key = (str(device), dtype)
    if key not in per_module:
        per_module[key] = copy.deepcopy(module).to(device=device, dtype=dtype).requires_grad_(False)
    return per_module[key]


def comfy_attention():
    """ComfyUI's current attention kernel in the (q, k, v, heads) form the arch modules take."""
    from comfy.ldm.modules.attention import optimized_attention

    return lambda q, k, v, heads: optimized_attention(q, k, v, heads)


class _PerStepCache:
    """Remembers one value per object (the step's sigmas tensor, a device...) without keeping it alive."""

    def __init__(self):
        self._ref, self._value = None, None

    def get(self, obj, compute):
        if self._ref is None or self._ref() is not obj:
            self._ref, self._value = weakref.ref(obj), compute(obj)
        return self._value


def conditional_rows(cond_or_uncond, batch: int) -> list[int] | None:
    """Row indices of the conditional CFG chunks, or None when every row is conditional."""
    if not cond_or_uncond or all(c == 0 for c in cond_or_uncond):
        return None
    per_chunk = batch // len(cond_or_uncond)
    return [i * per_chunk + j for i, c in enumerate(cond_or_uncond) if c == 0 for j in range(per_chunk)]


def token_grid(extra_options: dict, tokens: int) -> tuple[int, int]:
    """(h, w) of a block's token grid, from the latent size in ``original_shape``."""
    height, width = extra_options["original_shape"][-2:]
    for level in range(8):
        f = 2**level
        h, w = math.ceil(height / f), math.ceil(width / f)
        if h * w == tokens:
            return h, w
    raise PackError(f"cannot place {tokens} tokens on the {height}x{width} latent grid")


class IDAdapterMiddlePatch:
    """``y + beta * tanh(gamma) * S([y, proj(E_r)])[:, :len(y)]`` on conditional chunks inside the sigma window.

    The unconditional chunk runs the plain UNet: training drops the image condition by switching the adapter
    branch off, so this is the model's own unconditional prediction (and it halves the adapter's cost).
    """

    def __init__(
        self,
        adapter: IDAdapter,
        tokens: torch.Tensor,
        weight: float,
        sigma_start: float = float("inf"),
        sigma_end: float = 0.0,
        mask: torch.Tensor | None = None,
        attention=None,
    ):
        self.adapter = adapter
        self.tokens = tokens.detach()
        self.weight = float(weight)
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)
        self.mask = None if mask is None else mask.detach().float().reshape(-1, *mask.shape[-2:])
        self.attention = attention
        # every block of a step sees the same sigmas tensor: read it off the device once per step
        self._sigma = _PerStepCache()
        self._tokens: dict = {}
        self._masks: dict = {}

    def __deepcopy__(self, memo):
        return self  # immutable once attached: clones share it (and its weights)

    def to(self, *args, **kwargs):
        return self  # weights follow the activations at call time

    def active_at(self, sigma: float | None) -> bool:
        return sigma is None or self.sigma_end <= sigma <= self.sigma_start

    def __call__(self, x: torch.Tensor, extra_options: dict) -> torch.Tensor:
        block = extra_options.get("block")
        if block is None:
            return x
        key = (block[0], block[1], extra_options.get("block_index", 0))
        if block_name(key) not in self.adapter.adapters or not self.active_at(self._current_sigma(extra_options)):
            return x
        rows = conditional_rows(extra_options.get("cond_or_uncond"), x.shape[0])
        adapter = module_on(self.adapter.adapters[block_name(key)], x.device, x.dtype)
        tokens = self._tokens_on(x.device, x.dtype)
        attention = {"attention": self.attention} if self.attention else {}

        def residual(y, _rows):
            out = adapter.residual(y, tokens[:1].expand(y.shape[0], -1, -1) if tokens.shape[0] != y.shape[0] else tokens,
                                   **attention) * self.weight
            if self.mask is not None:
                out = out * self._mask_for(extra_options, y.shape[0], y.shape[1], x)
            return out

        return add_on_rows(x, rows, residual)

    def _current_sigma(self, extra_options: dict) -> float | None:
        sigmas = extra_options.get("sigmas")
        return None if sigmas is None else self._sigma.get(sigmas, lambda s: float(s.detach().max()))

    def _tokens_on(self, device, dtype) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._tokens:
            self._tokens[key] = self.tokens.to(device, dtype)
        return self._tokens[key]

    def _mask_for(self, extra_options, rows: int, tokens: int, like: torch.Tensor) -> torch.Tensor:
        h, w = token_grid(extra_options, tokens)
        key = (h, w, rows, str(like.device), like.dtype)
        if key not in self._masks:
            mask = F.interpolate(self.mask.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)
            mask = mask.reshape(mask.shape[0], h * w, 1).to(like.device, like.dtype)
            if mask.shape[0] != 1:  # one mask per image, repeated for each conditional chunk
                mask = mask.repeat(rows // mask.shape[0], 1, 1)
            self._masks[key] = mask
        return self._masks[key]


def unet_transformer_blocks(diffusion_model) -> dict[str, BlockSpec]:
    """Every BasicTransformerBlock of a ComfyUI UNet under its block name (``input_4_0``, ``middle_0_0``...)."""
    groups = [("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
              ("output", diffusion_model.output_blocks)]
    blocks = {}
    for kind, sequence in groups:
        for ident, block in enumerate(sequence):
            for layer in block:
                for index, tb in enumerate(getattr(layer, "transformer_blocks", [])):
                    blocks[block_name((kind, ident, index))] = BlockSpec(
                        channels=tb.attn1.to_q.in_features, heads=tb.attn1.heads, context_dim=tb.attn2.to_k.in_features
                    )
    return blocks


def attn2_weight_key(name: str, proj: str) -> str:
    """ComfyUI's state-dict key of a block's cross-attention projection weight."""
    kind, ident, index = name.rsplit("_", 2)
    container = "middle_block" if kind == "middle" else f"{kind}_blocks.{ident}"
    return f"diffusion_model.{container}.1.transformer_blocks.{index}.attn2.{proj}.weight"


def kv_weight_patches(kv_deltas: dict[str, dict[str, torch.Tensor]]) -> dict[str, tuple]:
    """``add_patches`` entries: a 1-tuple is ComfyUI's "diff" patch, weight += strength * delta."""
    return {attn2_weight_key(name, proj): (delta,) for name, deltas in kv_deltas.items() for proj, delta in deltas.items()}


def inject_identity_tokens(tokens: dict, identifier_ids: dict[str, int], vectors: dict[str, torch.Tensor]) -> dict:
    """Replaces every identifier token of each encoder's rows by that encoder's identity vector.

    ``tokens`` is what ``clip.tokenize`` returns: {encoder key: rows of (token, weight[, word id])}. Rows keep
    their length (ComfyUI adds position embeddings to all 77 places) and weights.
    """
    missing = sorted(set(tokens) - set(vectors))
    if missing:
        raise PackError(
            f"the CLIP has text encoders {sorted(tokens)}, the IDAdapter embeds give vectors for {sorted(vectors)}: "
            "the IDAdapter was trained for another base model"
        )
    out = {}
    for key, rows in tokens.items():
        vector = vectors[key].detach().float().reshape(-1)
        ident = identifier_ids[key]
        out[key] = [[(vector, *entry[1:]) if entry[0] == ident else entry for entry in row] for row in rows]
    return out
