"""W+ adapter (Li et al., "When StyleGAN Meets Stable Diffusion: a W+ Adapter for Personalized Image Generation"):
the one definition of its math, used by the ComfyUI nodes and the trainer (reference/official-checkpoints.md §3).

- :class:`WProjection` (the official ``WProjModel``): a StyleGAN W+ code [B, 18, 512] -> 4 tokens of the text width.
  Four bias-free linear maps over the row groups 0:4, 4:8, 8:12 and 12:18 (each group flattened), stacked, then one
  LayerNorm over the 4 tokens. State-dict keys ``proj_0.weight`` … ``proj_3.weight``, ``norm.weight``, ``norm.bias``.
- :class:`ResidualCrossAttention` (the official ``WPlusAttnProcessor``), one per cross-attention layer (attn2):
  ``h = Attn(to_q(x), to_k(text), to_v(text))`` is the ordinary text cross-attention *before* ``to_out``; the
  adapter adds ``scale * Attn(to_q_wplus(h), to_k_wplus(w), to_v_wplus(w))`` with the layer's own head count, and
  the block's frozen ``to_out`` is applied to the sum. The W+ query is computed from ``h`` (the text-attention
  output), not from the block's normed hidden states; the W+ branch gets no attention mask; ``scale`` multiplies
  the branch's output. ``to_q_wplus`` is [C, C], ``to_k_wplus``/``to_v_wplus`` are [C, context] (all bias-free).
  The caller computes ``h`` (ComfyUI: the attn2 replace patch that was there before, or ``optimized_attention``;
  the trainer: the UNet's own attention) and adds the residual, so the adapter stacks with other attn2 patches.
- The official file indexes the processors by their position in diffusers' ``unet.attn_processors`` of an SD1.5
  UNet (down_blocks, then up_blocks, then mid_block; attn1 and attn2 of each transformer block in turn), so the
  cross-attention layers are the odd indices 1 … 31. :data:`OFFICIAL_SD15_LAYERS` maps each to the pack's block
  name (ComfyUI's block key, ``input_1_0`` …, see :func:`unet_blocks.block_name`) and width.

File format ``wplus/1``: safetensors; ``__metadata__`` holds ``format``, ``family`` and ``config`` (JSON of
:class:`WPlusAdapterConfig`: ``{"family": "sd15", "blocks": {"input_1_0": {"channels": 320, "heads": 8,
"context_dim": 768}, …}}``). Tensors: ``w_proj.proj_0.weight`` … ``w_proj.norm.bias`` and
``layers.<block>.to_q_wplus.weight`` / ``to_k_wplus`` / ``to_v_wplus``.

Official files (``wplus_adapter.bin``, ``wplus_adapter_stage1.bin``): a tensors-only pickle
``{"w_proj": {...}, "wplus_adapter": {"<index>.to_q_wplus.weight": ...}}`` read with ``torch.load(weights_only=True,
mmap=True)``: nothing in it runs, and tensors stay in the file until their names, indices and shapes have been
compared with the SD1.5 table.

Every loader checks before it allocates (config integers bounded, modules built on the ``meta`` device and compared
with the file's shapes) and refuses NaN or infinite weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, ModelFileError
from .files import (check_shapes, first_few, looks_like_safetensors, materialized, metadata_json, open_safetensors,
                    read_tensors_only, write_safetensors)
from .unet_blocks import (FAMILIES, Attention, BlockKey, BlockSpec, CastLayerNorm, CastLinear, FamilyBlocksConfig,
                          block_name, sdpa_attention)

FORMAT = "wplus/1"
W_ROWS, W_DIM = 18, 512  # StyleGAN2 FFHQ 1024: 18 style rows of 512 (what e4e gives)
ROW_GROUPS = ((0, 4), (4, 8), (8, 12), (12, 18))  # the official proj_index [4, 8, 12, 18]
NUM_TOKENS = len(ROW_GROUPS)
PROJECTIONS = ("to_q_wplus", "to_k_wplus", "to_v_wplus")
SD15_HEADS = 8  # SD1.5's UNet: 8 heads in every transformer block (diffusers' attention_head_dim=8)

# The official processor index of each SD1.5 cross-attention layer (its position in diffusers'
# unet.attn_processors), the pack's block name for that transformer block, and its width. The one table:
# everything else here (the official config, key names, the inverse map) is derived from it.
OFFICIAL_SD15_LAYERS: tuple[tuple[int, str, int], ...] = (
    (1, "input_1_0", 320),     # down_blocks.0.attentions.0
    (3, "input_2_0", 320),     # down_blocks.0.attentions.1
    (5, "input_4_0", 640),     # down_blocks.1.attentions.0
    (7, "input_5_0", 640),     # down_blocks.1.attentions.1
    (9, "input_7_0", 1280),    # down_blocks.2.attentions.0
    (11, "input_8_0", 1280),   # down_blocks.2.attentions.1
    (13, "output_3_0", 1280),  # up_blocks.1.attentions.0
    (15, "output_4_0", 1280),  # up_blocks.1.attentions.1
    (17, "output_5_0", 1280),  # up_blocks.1.attentions.2
    (19, "output_6_0", 640),   # up_blocks.2.attentions.0
    (21, "output_7_0", 640),   # up_blocks.2.attentions.1
    (23, "output_8_0", 640),   # up_blocks.2.attentions.2
    (25, "output_9_0", 320),   # up_blocks.3.attentions.0
    (27, "output_10_0", 320),  # up_blocks.3.attentions.1
    (29, "output_11_0", 320),  # up_blocks.3.attentions.2
    (31, "middle_0_0", 1280),  # mid_block.attentions.0 (registered after up_blocks in diffusers)
)
OFFICIAL_INDEX_TO_BLOCK: dict[int, str] = {index: name for index, name, _ in OFFICIAL_SD15_LAYERS}
BLOCK_TO_OFFICIAL_INDEX: dict[str, int] = {name: index for index, name, _ in OFFICIAL_SD15_LAYERS}


@dataclass
class WPlusAdapterConfig(FamilyBlocksConfig):
    family: str
    blocks: dict[str, BlockSpec]  # block name -> dims of that UNet cross-attention layer

    def __post_init__(self):  # context_dim: the width of the W+ tokens and the input of to_k_wplus / to_v_wplus
        self.check_family_and_blocks()


def official_sd15_config() -> WPlusAdapterConfig:
    """The configuration of the released SD1.5 W+ adapters (16 cross-attention layers, 8 heads, context 768)."""
    context = FAMILIES["sd15"]["context_dim"]
    return WPlusAdapterConfig("sd15", {name: BlockSpec(channels, SD15_HEADS, context)
                                       for _, name, channels in OFFICIAL_SD15_LAYERS})


class WProjection(nn.Module):
    """The mapping network: W+ [B, 18, 512] -> LayerNorm(stack(proj_k(rows of group k, flattened))) [B, 4, context]."""

    def __init__(self, context_dim: int):
        super().__init__()
        for k, (start, end) in enumerate(ROW_GROUPS):
            self.add_module(f"proj_{k}", CastLinear(W_DIM * (end - start), context_dim, bias=False))
        self.norm = CastLayerNorm(context_dim)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if w.ndim != 3 or tuple(w.shape[1:]) != (W_ROWS, W_DIM):
            raise ConfigError(f"expected W+ codes shaped [batch, {W_ROWS}, {W_DIM}], got {tuple(w.shape)}")
        tokens = [getattr(self, f"proj_{k}")(w[:, start:end].reshape(w.shape[0], -1))
                  for k, (start, end) in enumerate(ROW_GROUPS)]
        return self.norm(torch.stack(tokens, dim=1))


class ResidualCrossAttention(nn.Module):
    """One cross-attention layer's W+ branch: ``h + scale * Attn(to_q_wplus(h), to_k_wplus(w), to_v_wplus(w))``.

    ``h`` is the text cross-attention's output before ``to_out`` [B, L, C]; ``tokens`` the W+ tokens [B or 1, 4,
    context]. Weights are cast to h's device and dtype per call, so the module runs wherever its owner stores it.
    """

    def __init__(self, channels: int, heads: int, context_dim: int):
        super().__init__()
        self.heads = heads
        self.to_q_wplus = CastLinear(channels, channels, bias=False)
        self.to_k_wplus = CastLinear(context_dim, channels, bias=False)
        self.to_v_wplus = CastLinear(context_dim, channels, bias=False)

    def residual(self, h: torch.Tensor, tokens: torch.Tensor, attention: Attention = sdpa_attention,
                 heads: int | None = None) -> torch.Tensor:
        """``Attn(to_q_wplus(h), to_k_wplus(w), to_v_wplus(w))``: what is added to h at scale 1 (no mask).

        ``attention(q, k, v, heads)`` takes and returns [B, L, heads * head_dim] (ComfyUI's optimized_attention
        fits); ``heads`` defaults to the layer's (ComfyUI passes ``extra_options["n_heads"]``).
        """
        tokens = tokens.to(device=h.device, dtype=h.dtype)
        if tokens.shape[0] != h.shape[0]:
            if tokens.shape[0] != 1:
                raise ConfigError(f"{tokens.shape[0]} sets of W+ tokens for a batch of {h.shape[0]}: give one set, "
                                  "or one per batch row")
            tokens = tokens.expand(h.shape[0], -1, -1)
        q, k, v = self.to_q_wplus(h), self.to_k_wplus(tokens), self.to_v_wplus(tokens)
        return attention(q, k, v, heads or self.heads)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, scale: float = 1.0,
                attention: Attention = sdpa_attention, heads: int | None = None) -> torch.Tensor:
        """``h + scale * residual``; scale 0 returns h itself (exactly the model without the adapter)."""
        if scale == 0:
            return h
        return h + scale * self.residual(h, tokens, attention, heads)

    def after_text_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor,
                             scale: float = 1.0, attention: Attention = sdpa_attention, heads: int | None = None,
                             text_attention: Attention | None = None) -> torch.Tensor:
        """The whole layer before ``to_out``, from the text attention's projected q, k, v: ``h`` is computed by
        ``text_attention`` (e.g. the attn2 replace patch that was there before) or ``attention``, then the W+
        residual is added. What the official processor computes between to_q/to_k/to_v and to_out."""
        heads = heads or self.heads
        h = (text_attention or attention)(q, k, v, heads)
        return self(h, tokens, scale, attention, heads)


class WPlusAdapter(nn.Module):
    """The mapping network and the residual cross-attention of every configured block."""

    def __init__(self, cfg: WPlusAdapterConfig):
        super().__init__()
        self.config = cfg
        self.w_proj = WProjection(cfg.context_dim)
        self.layers = nn.ModuleDict({name: ResidualCrossAttention(spec.channels, spec.heads, spec.context_dim)
                                     for name, spec in cfg.blocks.items()})

    def tokens(self, w: torch.Tensor) -> torch.Tensor:
        """W+ [B, 18, 512] (or [18, 512]) -> the 4 tokens [B, 4, context] in the mapping network's dtype."""
        if w.ndim == 2:
            w = w.unsqueeze(0)
        param = self.w_proj.norm.weight
        return self.w_proj(w.to(device=param.device, dtype=param.dtype))

    def uncond_tokens(self, w: torch.Tensor) -> torch.Tensor:
        """The official unconditional tokens: the projection of a zero W+ (LayerNorm of zeros: ``norm.bias``)."""
        return self.tokens(torch.zeros_like(w))

    def layer_for(self, key: BlockKey) -> ResidualCrossAttention | None:
        name = block_name(key)
        return self.layers[name] if name in self.layers else None


@dataclass
class WPlusAdapterWeights:
    """What a W+ adapter file holds; ``source`` is ``"wplus/1"`` or ``"official"`` (the file it came from)."""

    adapter: WPlusAdapter
    source: str = FORMAT

    @property
    def config(self) -> WPlusAdapterConfig:
        return self.adapter.config


_WRITER = "convert_official_wplus (from an official wplus_adapter.bin) or the W+ trainer"
_REWRITE = f"The file is damaged or was edited: write it again with {_WRITER}"
_OFFICIAL_FIX = ("Use the released wplus_adapter.bin or wplus_adapter_stage1.bin "
                 "(github.com/csxmli2016/w-plus-adapter/releases/tag/v1), unchanged")
# Upper bounds of the config's integers: far above any real UNet (SDXL: 1280 channels, 20 heads, 70 blocks), low
# enough that a hostile config cannot make building the module loop or allocate without end.
_BLOCK_LIMITS = {"channels": 8192, "heads": 256, "context_dim": 8192}
_MAX_BLOCKS = 1024
_BLOCK_NAME = re.compile(r"(input|middle|output)_\d{1,4}_\d{1,4}")
CONVERTED_DTYPES = (torch.float32, torch.float16)


def _refusal(path: str, name: str, expected: str, got, fix: str = _REWRITE) -> ModelFileError:
    return ModelFileError(f"{path}: W+ adapter config field {name!r} is {got!r}, expected {expected}. {fix}")


def checked_config(raw, path: str, fix: str = _REWRITE) -> WPlusAdapterConfig:
    """The :class:`WPlusAdapterConfig` of its JSON form, every field typed and bounded."""
    if not isinstance(raw, dict) or set(raw) != {"family", "blocks"}:
        raise _refusal(path, "config", "a JSON object with exactly ['blocks', 'family']",
                       sorted(raw) if isinstance(raw, dict) else type(raw).__name__, fix)
    family = raw["family"]
    if not isinstance(family, str) or family not in FAMILIES:
        raise _refusal(path, "family", f"one of {sorted(FAMILIES)}", family, fix)
    context = FAMILIES[family]["context_dim"]
    blocks = raw["blocks"]
    if not isinstance(blocks, dict) or not 1 <= len(blocks) <= _MAX_BLOCKS:
        raise _refusal(path, "blocks", f"a mapping of 1 to {_MAX_BLOCKS} block names to block dims",
                       blocks if not isinstance(blocks, dict) else f"{len(blocks)} blocks", fix)
    specs = {}
    for name, spec in blocks.items():
        if not _BLOCK_NAME.fullmatch(name):
            raise _refusal(path, f"blocks.{name}", "named like 'input_4_0' (input/middle/output, block id, index)",
                           name, fix)
        if not isinstance(spec, dict) or set(spec) != set(_BLOCK_LIMITS):
            raise _refusal(path, f"blocks.{name}", f"a mapping with exactly {sorted(_BLOCK_LIMITS)}", spec, fix)
        dims = {}
        for key, limit in _BLOCK_LIMITS.items():
            value = spec[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise _refusal(path, f"blocks.{name}.{key}", f"an integer from 1 to {limit}", value, fix)
            dims[key] = value
        if dims["channels"] % dims["heads"]:
            raise _refusal(path, f"blocks.{name}.heads", f"a divisor of channels ({dims['channels']})",
                           dims["heads"], fix)
        if dims["context_dim"] != context:
            raise _refusal(path, f"blocks.{name}.context_dim", f"{family}'s text width {context}",
                           dims["context_dim"], fix)
        specs[name] = BlockSpec(**dims)
    return WPlusAdapterConfig(family, specs)


def config_from_metadata(meta: dict[str, str], path: str) -> WPlusAdapterConfig:
    """The config in a ``wplus/1`` file's metadata; the ``family`` field must agree with it."""
    cfg = checked_config(metadata_json(meta, path, "config", "the JSON W+ adapter config", _REWRITE), path)
    if meta.get("family") != cfg.family:
        raise ModelFileError(f"{path}: the metadata says family {meta.get('family')!r}, its config says "
                             f"{cfg.family!r}. {_REWRITE}")
    return cfg


def _finite(path: str, name: str, tensor: torch.Tensor, fix: str) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise ModelFileError(f"{path}: {name!r} is {tensor.dtype}, expected floating-point weights. {fix}")
    if not torch.isfinite(tensor).all():
        raise ModelFileError(f"{path}: tensor {name!r} holds NaN or infinite values, expected finite numbers; the "
                             f"file is damaged or came from a diverged run. {fix}")
    return tensor


def save_wplus_adapter(weights: WPlusAdapterWeights, path: str, dtype: torch.dtype = torch.float32) -> None:
    """Writes ``wplus/1`` atomically, in ``dtype``; refuses weights that are not finite in it."""
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in weights.adapter.state_dict().items()}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            fix = "the weights are damaged" if dtype == torch.float32 else \
                f"{dtype} holds magnitudes up to {torch.finfo(dtype).max:g}: write the file in float32"
            raise ConfigError(f"cannot write {path}: {name} holds NaN or infinite values in {dtype}; {fix}")
    cfg = weights.config
    write_safetensors(tensors, path, {"format": FORMAT, "family": cfg.family, "config": cfg.to_json()})


def load_wplus_adapter(path: str) -> WPlusAdapterWeights:
    """Reads ``wplus/1``; nothing is allocated before the config and every tensor shape fit the file."""
    with open_safetensors(path, FORMAT, "W+ adapter file", _WRITER) as f:
        cfg = config_from_metadata(f.metadata, path)
        with torch.device("meta"):  # shapes only, no memory: the real tensors come from the file
            adapter = WPlusAdapter(cfg)
        expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
        check_shapes(path, f.shapes, expected, "its own config", _REWRITE)
        tensors = f.tensors()  # refuses NaN and infinities
    return WPlusAdapterWeights(materialized(adapter, tensors), FORMAT)


# ---- Official files


_OFFICIAL_KEY = re.compile(r"(\d{1,6})\.(to_[qkv]_wplus)\.weight")


def official_names(cfg: WPlusAdapterConfig | None = None) -> dict[str, str]:
    """Our state-dict name -> the official file's flat name (``w_proj.<key>`` or ``wplus_adapter.<index>.<key>``)
    for every tensor of the SD1.5 adapter."""
    cfg = cfg or official_sd15_config()
    names = {f"w_proj.proj_{k}.weight": f"w_proj.proj_{k}.weight" for k in range(NUM_TOKENS)}
    names.update({f"w_proj.norm.{p}": f"w_proj.norm.{p}" for p in ("weight", "bias")})
    for name in cfg.blocks:
        if name not in BLOCK_TO_OFFICIAL_INDEX:
            raise ConfigError(f"block {name!r} has no official processor index: the official layout covers the "
                              f"SD1.5 blocks {first_few(sorted(BLOCK_TO_OFFICIAL_INDEX))}")
        for projection in PROJECTIONS:
            names[f"layers.{name}.{projection}.weight"] = \
                f"wplus_adapter.{BLOCK_TO_OFFICIAL_INDEX[name]}.{projection}.weight"
    return names


def to_official_state(weights: WPlusAdapterWeights) -> dict[str, dict[str, torch.Tensor]]:
    """``{"w_proj": {...}, "wplus_adapter": {"<index>.to_q_wplus.weight": ...}}``: what the official code loads
    (``torch.save`` it to use an adapter of this pack with the official pipeline)."""
    state = weights.adapter.state_dict()
    out: dict[str, dict[str, torch.Tensor]] = {"w_proj": {}, "wplus_adapter": {}}
    for ours, theirs in official_names(weights.config).items():
        group, key = theirs.split(".", 1)
        out[group][key] = state[ours].detach().cpu().clone()
    return out


def _official_shapes(path: str, state) -> dict[str, tuple]:
    """The flat name -> shape of an official file's tensors, with a precise refusal for the files people mix up
    (IP-Adapter, accelerate training checkpoints, other UNet layouts)."""
    if not isinstance(state, Mapping):
        raise ModelFileError(f"{path} holds a {type(state).__name__}, expected the W+ adapter's dict "
                             f"{{'w_proj': ..., 'wplus_adapter': ...}}. {_OFFICIAL_FIX}")
    keys = sorted(str(k) for k in state)
    if {"image_proj", "ip_adapter"} & set(keys):
        raise ModelFileError(f"{path} is an IP-Adapter file (keys {first_few(keys)}), not a W+ adapter: load it with "
                             f"an IP-Adapter node. {_OFFICIAL_FIX}")
    if any(k.startswith(("unet.", "w_proj_model.", "adapter_modules.")) for k in keys):
        raise ModelFileError(f"{path} is a W+ adapter *training* checkpoint (keys {first_few(keys)}): extract the "
                             "adapter with the official script/transfer_pytorchmodel_to_wplus.py first")
    if set(keys) != {"w_proj", "wplus_adapter"}:
        missing = sorted({"w_proj", "wplus_adapter"} - set(keys))
        raise ModelFileError(f"{path} has top-level keys {first_few(keys)}, expected exactly ['w_proj', "
                             f"'wplus_adapter']{f' (missing {missing})' if missing else ''}. {_OFFICIAL_FIX}")
    shapes = {}
    for group in ("w_proj", "wplus_adapter"):
        part = state[group]
        if not isinstance(part, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in part.items()):
            raise ModelFileError(f"{path}: {group!r} holds a {type(part).__name__} that is not a state dict (names "
                                 f"-> tensors). {_OFFICIAL_FIX}")
        shapes.update({f"{group}.{k}": tuple(v.shape) for k, v in part.items()})
    adapter_keys = sorted(state["wplus_adapter"])
    if any("_ip." in k for k in adapter_keys):
        raise ModelFileError(f"{path}: 'wplus_adapter' holds IP-Adapter keys ({first_few(adapter_keys)}), expected "
                             f"'<index>.to_q_wplus.weight' etc. {_OFFICIAL_FIX}")
    odd = [k for k in adapter_keys if not _OFFICIAL_KEY.fullmatch(k)]
    if odd:
        raise ModelFileError(f"{path}: 'wplus_adapter' holds keys {first_few(odd)}, expected only "
                             f"'<index>.to_q_wplus.weight', '.to_k_wplus.weight', '.to_v_wplus.weight'. "
                             f"{_OFFICIAL_FIX}")
    indices = sorted({int(_OFFICIAL_KEY.fullmatch(k).group(1)) for k in adapter_keys})
    if indices != sorted(OFFICIAL_INDEX_TO_BLOCK):
        raise ModelFileError(
            f"{path}: 'wplus_adapter' holds processor indices {first_few(indices)} ({len(indices)} layers); an SD1.5 "
            f"W+ adapter has the 16 cross-attention layers {sorted(OFFICIAL_INDEX_TO_BLOCK)} (positions in "
            f"diffusers' unet.attn_processors): this file was made for another UNet layout. {_OFFICIAL_FIX}")
    return shapes


def load_official_wplus(path: str) -> WPlusAdapterWeights:
    """An official ``wplus_adapter.bin`` / ``wplus_adapter_stage1.bin`` as the pack's modules (SD1.5, float32).

    Nothing in the pickle runs (``weights_only``); tensors stay memory-mapped in the file until every name, index
    and per-layer width has been compared with :data:`OFFICIAL_SD15_LAYERS`.
    """
    state = read_tensors_only(path, "W+ adapter file", _OFFICIAL_FIX)
    shapes = _official_shapes(path, state)
    cfg = official_sd15_config()
    names = official_names(cfg)
    with torch.device("meta"):  # shapes only, no memory: the real tensors come from the file
        adapter = WPlusAdapter(cfg)
    expected = {names[k]: tuple(v.shape) for k, v in adapter.state_dict().items()}
    check_shapes(path, shapes, expected, "the official SD1.5 W+ adapter layout (w_proj 4 x [768, 2048 or 3072] + "
                 "LayerNorm(768); per index: to_q_wplus [C, C], to_k_wplus/to_v_wplus [C, 768])", _OFFICIAL_FIX)
    tensors = {}
    for ours, theirs in names.items():
        group, key = theirs.split(".", 1)
        tensors[ours] = _finite(path, theirs, state[group][key], _OFFICIAL_FIX)
    return WPlusAdapterWeights(materialized(adapter, tensors), "official")


def load_wplus_file(path: str) -> WPlusAdapterWeights:
    """Either kind of W+ adapter file, told apart by content: ``wplus/1`` safetensors, or an official ``.bin``."""
    if looks_like_safetensors(path):
        return load_wplus_adapter(path)
    return load_official_wplus(path)


def convert_official_wplus(bin_path: str, out_path: str, overwrite: bool = False,
                           dtype: torch.dtype = torch.float32) -> WPlusAdapterWeights:
    """Writes an official W+ adapter file as ``wplus/1`` (float32 by default: lossless whatever the file held);
    returns what it wrote."""
    if dtype not in CONVERTED_DTYPES:
        raise ConfigError(f"dtype {dtype} is not one of {[str(d) for d in CONVERTED_DTYPES]}: use float32 or "
                          "float16 (half the size)")
    if os.path.exists(out_path) and not overwrite:
        raise ConfigError(f"{out_path} already exists; choose another output file, or allow overwriting it "
                          "(--overwrite)")
    weights = load_official_wplus(bin_path)
    save_wplus_adapter(weights, out_path, dtype)
    return weights
