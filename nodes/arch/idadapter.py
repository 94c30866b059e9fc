"""IDAdapter (Cui et al., "IDAdapter: Learning Mixed Features for Tuning-Free Personalization of
Text-to-Image Models"): the one definition of its math, used by the ComfyUI nodes and the trainer.

- :class:`MixedFacialFeatures` (``P_visual``): CLIP-vision patch features of N reference images plus their
  mean ArcFace vector -> a two-block transformer -> ``E_r``. ``E_r`` is a fixed number of tokens M (learned
  queries attending over ``[f_v, f_a]``), so the UNet-side cost does not grow with N.
- :class:`TextualProjector` (``P_textual``): the mean CLIP class embedding -> one text-token vector per text
  encoder (``E_c``), which replaces the identifier word's token embedding.
- :class:`GatedSelfAttention`: between self- and cross-attention of every transformer block,
  ``y = y + beta * tanh(gamma) * S([y, proj(E_r)])[:, :len(y)]`` with gamma initialised to 0.
- Cross-attention ``to_k``/``to_v`` of every block are fine-tuned; files store them as deltas.

The ``idadapter/1`` file format and its checks are in :mod:`.idadapter_file`; :func:`load_idadapter` and
:func:`save_idadapter` read and write it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelFileError, NoFaceError
from .face_embeds import mean_identity_vector
from .files import check_fingerprint, check_shapes, open_safetensors, same_weights, write_safetensors
from .idadapter_file import (FORMAT, KV_PREFIX, REEXPORT, WRITER, IDAdapterConfig, config_from_metadata,
                             kv_delta_shapes)
from .unet_blocks import (FAMILIES, Attention, BlockKey, BlockSpec, CastLayerNorm, CastLinear, block_name, cast_like,
                          sdpa_attention)

log = logging.getLogger(__name__)

DEFAULT_IDENTIFIER = "sks"


class _Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (the layout of the UNet's own attention)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = CastLinear(dim, dim, bias=False)
        self.to_k = CastLinear(context_dim, dim, bias=False)
        self.to_v = CastLinear(context_dim, dim, bias=False)
        self.to_out = CastLinear(dim, dim)

    def forward(self, x, context, attention: Attention = sdpa_attention):
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class _ResamplerBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_latents = nn.LayerNorm(width)
        self.norm_context = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, latents, context):
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_context(context), q], dim=1)  # the queries also see each other
        latents = latents + self.attn(q, kv)
        return latents + self.ff(self.norm_ff(latents))


class MixedFacialFeatures(nn.Module):
    """P_visual: ([B, N, T, d_v] patch features, [B, d_a] mean ArcFace) -> E_r [B, M, embed_dim]."""

    def __init__(self, cfg: IDAdapterConfig):
        super().__init__()
        self.proj_patches = nn.Linear(cfg.clip_vision_dim, cfg.width)
        self.proj_arcface = nn.Linear(cfg.arcface_dim, cfg.width)
        # tells the transformer which context token is the identity vector and which are image patches
        self.type_embedding = nn.Parameter(torch.zeros(2, cfg.width))
        self.latents = nn.Parameter(torch.randn(cfg.num_tokens, cfg.width) / math.sqrt(cfg.width))
        self.blocks = nn.ModuleList(_ResamplerBlock(cfg.width, cfg.mff_heads) for _ in range(cfg.mff_depth))
        self.norm_out = nn.LayerNorm(cfg.width)
        self.proj_out = nn.Linear(cfg.width, cfg.embed_dim)

    def forward(self, patch_features: torch.Tensor, arcface: torch.Tensor) -> torch.Tensor:
        if patch_features.ndim == 4:  # [B, N, T, d_v] -> the N images' patch tokens concatenated
            patch_features = patch_features.flatten(1, 2)
        patches = self.proj_patches(patch_features) + self.type_embedding[0]
        identity = self.proj_arcface(arcface).unsqueeze(1) + self.type_embedding[1]
        context = torch.cat([patches, identity], dim=1)
        latents = self.latents.unsqueeze(0).expand(context.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, context)
        return self.proj_out(self.norm_out(latents))


class TextualProjector(nn.Module):
    """P_textual: mean CLIP class embedding [B, d_v] -> {encoder key: [B, text dim]} (E_c)."""

    def __init__(self, cfg: IDAdapterConfig):
        super().__init__()
        self.keys = sorted(cfg.text_dims)
        self.dims = [cfg.text_dims[k] for k in self.keys]
        self.mlp = nn.Sequential(
            nn.LayerNorm(cfg.clip_vision_dim),
            nn.Linear(cfg.clip_vision_dim, cfg.textual_hidden),
            nn.GELU(),
            nn.Linear(cfg.textual_hidden, sum(self.dims)),
        )
        # start E_c at the scale of CLIP's own token embeddings (initialised with std 0.02), so the identity
        # token does not swamp the prompt before training has shaped it
        nn.init.normal_(self.mlp[-1].weight, std=0.02 / math.sqrt(cfg.textual_hidden))
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, class_embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.keys, self.mlp(class_embedding).split(self.dims, dim=-1)))


class GatedSelfAttention(nn.Module):
    """One UNet transformer block's adapter: ``y + beta * tanh(gamma) * S([y, proj(E_r)])[:, :len(y)]``.

    Only the first len(y) outputs of the self-attention are kept, so queries are computed for y alone;
    keys and values cover ``[y, proj(E_r)]``. Weights are cast to y's device and dtype per call, so the module
    runs wherever its owner (ComfyUI's memory manager, the trainer) stores it.
    """

    def __init__(self, channels: int, heads: int, embed_dim: int):
        super().__init__()
        self.proj = CastLinear(embed_dim, channels)
        self.norm = CastLayerNorm(channels)
        self.attn = _Attention(channels, heads)
        self.gamma = nn.Parameter(torch.zeros(()))  # tanh(0) = 0: an untrained adapter is the identity

    def residual(self, y: torch.Tensor, tokens: torch.Tensor, attention: Attention = sdpa_attention) -> torch.Tensor:
        """tanh(gamma) * S([y, proj(E_r)])[:, :len(y)]: what is added to y at weight beta = 1."""
        h = self.norm(torch.cat([y, self.proj(tokens)], dim=1))
        out = self.attn(h[:, : y.shape[1]], h, attention)
        return torch.tanh(cast_like(self.gamma, out)) * out

    def forward(self, y, tokens, beta: float = 1.0, attention: Attention = sdpa_attention):
        return y + beta * self.residual(y, tokens, attention)


class IDAdapter(nn.Module):
    """Every trainable IDAdapter module except the cross-attention K/V (those live in the UNet)."""

    def __init__(self, cfg: IDAdapterConfig):
        super().__init__()
        self.config = cfg
        self.mff = MixedFacialFeatures(cfg)
        self.textual = TextualProjector(cfg)
        self.adapters = nn.ModuleDict(
            {name: GatedSelfAttention(spec.channels, spec.heads, cfg.embed_dim) for name, spec in cfg.blocks.items()}
        )

    def adapter_for(self, key: BlockKey) -> GatedSelfAttention | None:
        return self.adapters[block_name(key)] if block_name(key) in self.adapters else None

    def encode(self, patch_features, arcface, class_embedding) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reference features -> (E_r [B, M, embed_dim], E_c {encoder key: [B, dim]})."""
        return self.mff(patch_features, arcface), self.textual(class_embedding)


@dataclass
class IDAdapterWeights:
    """What an ``idadapter/1`` file holds: the module, the cross-attention K/V deltas per block and the fingerprint
    of the ArcFace recognizer its identity vectors came from ("" when unknown)."""

    adapter: IDAdapter
    kv_deltas: dict[str, dict[str, torch.Tensor]]  # block name -> {"to_k": delta, "to_v": delta}
    recognizer: str = ""

    @property
    def config(self) -> IDAdapterConfig:
        return self.adapter.config


def save_idadapter(weights: IDAdapterWeights, path: str, dtype: torch.dtype = torch.float32) -> None:
    """Writes ``idadapter/1`` atomically."""
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in weights.adapter.state_dict().items()}
    for name, deltas in weights.kv_deltas.items():
        for proj, delta in deltas.items():
            tensors[f"{KV_PREFIX}{name}.{proj}"] = delta.detach().to("cpu", dtype).contiguous()
    cfg = weights.config
    write_safetensors(tensors, path, {"format": FORMAT, "family": cfg.family, "config": cfg.to_json(),
                                      "recognizer": weights.recognizer})


def load_idadapter(path: str) -> IDAdapterWeights:
    """Reads ``idadapter/1``; nothing is allocated before the config and every tensor shape fit the file."""
    with open_safetensors(path, FORMAT, "IDAdapter file", WRITER) as f:
        cfg = config_from_metadata(f.metadata, path)
        recognizer = check_fingerprint(f.metadata.get("recognizer", ""), path, REEXPORT)
        with torch.device("meta"):  # shapes only, no memory: the real tensors come from the file
            adapter = IDAdapter(cfg)
        expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
        expected.update(kv_delta_shapes(cfg, f.shapes, path))
        check_shapes(path, f.shapes, expected, "its own config", REEXPORT)
        tensors = f.tensors()
    kv: dict[str, dict[str, torch.Tensor]] = {}
    module_tensors = {}
    for k, v in tensors.items():
        if k.startswith(KV_PREFIX):
            _, name, projection = k.split(".")
            kv.setdefault(name, {})[projection] = v
        else:
            module_tensors[k] = v
    # fresh, aligned storage: tensors read from a file sit at arbitrary offsets, where CPU kernels take other paths
    # and give results that differ in the last bit
    adapter.to_empty(device="cpu").load_state_dict(module_tensors)
    return IDAdapterWeights(adapter.eval().requires_grad_(False), kv, recognizer)


def check_unet_compatible(cfg: IDAdapterConfig, unet_blocks: dict[str, BlockSpec], unet_desc: str = "the MODEL"):
    """Errors naming both sides when an adapter was trained for another UNet."""
    contexts = {spec.context_dim for spec in unet_blocks.values()}
    unet_context = contexts.pop() if len(contexts) == 1 else None
    if unet_context != cfg.context_dim:
        theirs = next((f for f, spec in FAMILIES.items() if spec["context_dim"] == unet_context), "unknown")
        raise ModelFileError(
            f"this IDAdapter was trained for {cfg.family} (context {cfg.context_dim}); {unet_desc} is {theirs} "
            f"(context {unet_context}). Load an IDAdapter trained for that base model."
        )
    missing = sorted(set(cfg.blocks) - set(unet_blocks))
    if missing:
        raise ModelFileError(
            f"this IDAdapter has adapters for transformer blocks {missing[:4]} that {unet_desc} does not have "
            f"(it has {sorted(unet_blocks)[:4]}...): it was trained on a UNet of another layout"
        )
    for name, spec in cfg.blocks.items():
        if unet_blocks[name].channels != spec.channels:
            raise ModelFileError(
                f"block {name}: the adapter has {spec.channels} channels, {unet_desc} has {unet_blocks[name].channels}"
            )


# The recognizer of each official insightface pack, to tell users which pack to load.
PACK_OF_RECOGNIZER = {"glintr100.onnx": "antelopev2", "w600k_r50.onnx": "buffalo_l"}


def check_same_recognizer(adapter_recognizer: str, embeds_recognizer: str) -> None:
    """Refuses face embeds from another ArcFace recognizer than the one the adapter was trained with: another
    recognizer's vectors lie in another space, and the identity would be lost without an error. When either side is
    unknown ("", a file from before recognizers were recorded) nothing can be checked: one warning, and on."""
    if not adapter_recognizer or not embeds_recognizer:
        unknown = [what for what, value in (("the IDAdapter file", adapter_recognizer),
                                            ("the face_embeds input", embeds_recognizer)) if not value]
        log.warning("IDAdapter: cannot check that the face embeds come from the ArcFace recognizer the adapter was "
                    "trained with: %s %s not record it (made by an older version of this pack)",
                    " and ".join(unknown), "does" if len(unknown) == 1 else "do")
        return
    if same_weights(adapter_recognizer, embeds_recognizer):
        return
    name = adapter_recognizer.rpartition(":")[0]
    pack = PACK_OF_RECOGNIZER.get(name)
    which = f"the {pack} pack (its recognizer is {name})" if pack else \
        f"the insightface pack whose recognizer is {name}"
    raise ModelFileError(
        f"this IDAdapter was trained on ArcFace vectors from {adapter_recognizer}; the face embeds come from "
        f"{embeds_recognizer}, another recognizer whose vectors lie in another space, so the identity would be lost. "
        f"In Load InsightFace pick {which} and run Face Embed again (or connect that INSIGHTFACE to MFF Embed in "
        "place of face_embeds)"
    )


# ---- The recipe: what the node and the trainer must do alike, so that inference sees what training saw.


def check_identifier(identifier: str) -> str:
    """The identifier word (e.g. "sks"): one word, no spaces."""
    if not identifier or any(c.isspace() for c in identifier):
        raise ConfigError(f"the identifier must be one word such as {DEFAULT_IDENTIFIER!r}, got {identifier!r}")
    return identifier


def identifier_token(identifier: str, token_ids: list[int], encoder: str) -> int:
    """The one token id of the identifier for a text encoder (its E_c vector goes where that token is)."""
    if len(token_ids) != 1:
        raise ConfigError(f"the identifier {identifier!r} is {len(token_ids)} tokens for the {encoder!r} text "
                          f"encoder; use a single-token rare word such as {DEFAULT_IDENTIFIER!r}")
    return int(token_ids[0])


def identity_prompt(caption: str, class_noun: str, identifier: str) -> str:
    """The paper's training prompt, "<caption>, <class noun> is <identifier>". The caption's trailing spaces and
    comma are dropped first, so "a photo," and "a photo" give the same prompt."""
    caption = caption.strip().rstrip(",").rstrip()
    phrase = f"{class_noun.strip()} is {identifier}"
    return f"{caption}, {phrase}" if caption else phrase


def fill_references(images: torch.Tensor, count: int, seed: int, augment: bool = True) -> torch.Tensor:
    """K reference images [K, C, H, W] (0..1) -> exactly ``count``: with K < N the paper fills up to N with
    augmented copies (``augment``; else plain copies); with more, the first ``count`` are used."""
    if augment:
        return augment_references(images, count, seed)
    return images.repeat((count + images.shape[0] - 1) // images.shape[0], 1, 1, 1)[:count]


def augment_references(images: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """K reference images [K, C, H, W] (0..1) -> exactly ``count`` images, as the paper does when K < N.

    The originals come first; the rest are seeded random copies with a horizontal flip, a small rotation
    (up to 10 degrees) and a brightness/contrast/saturation change (up to 10 %). More than ``count`` images:
    the first ``count`` are used.
    """
    k = images.shape[0]
    if k >= count:
        return images[:count]
    gen = torch.Generator().manual_seed(seed)
    extra = []
    for i in range(count - k):
        img = images[i % k]
        if torch.rand((), generator=gen) < 0.5:
            img = img.flip(-1)
        angle = (torch.rand((), generator=gen) * 2 - 1) * math.radians(10)
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=img.dtype).unsqueeze(0)
        grid = F.affine_grid(theta, [1, *img.shape], align_corners=False)
        img = F.grid_sample(img.unsqueeze(0), grid, padding_mode="border", align_corners=False)[0]
        brightness, contrast, saturation = (1 + (torch.rand(3, generator=gen) * 2 - 1) * 0.1).tolist()
        grey = img.mean(0, keepdim=True)
        img = grey + (img - grey) * saturation
        img = (img - img.mean()) * contrast + img.mean()
        extra.append((img * brightness).clamp(0, 1))
    return torch.cat([images, torch.stack(extra)])


@dataclass(frozen=True)
class IDAdapterEmbeds:
    """IDADAPTER_EMBEDS: one identity's vision tokens E_r [1, M, D] and text vectors E_c {encoder key: [dim]}."""

    tokens: torch.Tensor
    text: dict[str, torch.Tensor]
    family: str


def embed_references(
    adapter: IDAdapter, patch_features: torch.Tensor, class_embeddings: torch.Tensor, arcface: torch.Tensor
) -> IDAdapterEmbeds:
    """N references' CLIP-vision features ([N, T, d_v] penultimate states, [N, d_v] class tokens) and their
    ArcFace vectors [F, d_a] -> the identity's embeds (the MFF input is the N images' patches and the
    unit-length mean ArcFace vector)."""
    cfg = adapter.config
    width = patch_features.shape[-1]
    if width != cfg.clip_vision_dim or class_embeddings.shape[-1] != cfg.clip_vision_dim:
        raise ModelFileError(
            f"this IDAdapter was trained with a CLIP vision encoder of width {cfg.clip_vision_dim} "
            f"({_vision_name(cfg.clip_vision_dim)}); the CLIP_VISION given has width {width} "
            f"({_vision_name(width)}). Load the matching file in models/clip_vision."
        )
    if arcface.ndim == 2 and arcface.shape[0] == 0:
        raise NoFaceError("no face was found in the references: MFF Embed needs at least one detectable face")
    if arcface.ndim != 2 or arcface.shape[1] != cfg.arcface_dim:
        raise ModelFileError(f"expected ArcFace vectors [faces, {cfg.arcface_dim}], got {tuple(arcface.shape)}: "
                             "use the recognition model the IDAdapter was trained with")
    param = next(adapter.parameters())
    f_a = mean_identity_vector(arcface)[None]
    with torch.no_grad():
        tokens, text = adapter.encode(
            patch_features.to(param).unsqueeze(0), f_a.to(param), class_embeddings.to(param).mean(0, keepdim=True)
        )
    return IDAdapterEmbeds(tokens.float().cpu(), {k: v[0].float().cpu() for k, v in text.items()}, cfg.family)


def _vision_name(width: int) -> str:
    return {1024: "ViT-L/14", 1280: "ViT-H/14", 1664: "ViT-bigG/14"}.get(width, "unknown")


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _centre_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """[..., 3, H, W] -> [..., 3, size, size]: the short side resized to ``size`` (bicubic, antialiased), then the
    centre cut out, as ComfyUI's clip_preprocess(crop=True) does; a size x size input is returned as it is."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    batch = images.reshape(-1, *images.shape[-3:])
    batch = F.interpolate(batch, size=(round(h * scale), round(w * scale)), mode="bicubic", antialias=True)
    top, left = (batch.shape[-2] - size) // 2, (batch.shape[-1] - size) // 2
    return batch[..., top:top + size, left:left + size].reshape(*images.shape[:-2], size, size)


def reference_crop(image: torch.Tensor, box: torch.Tensor | None, margin: float | None, size: int) -> torch.Tensor:
    """What CLIP vision sees of one reference photo [3, H, W] (RGB 0..1): [3, size, size], before quantisation and
    normalisation. The node and the trainer both call this, so inference sees what training saw.

    ``margin`` None: the whole photo (short side to ``size``, centre crop: ComfyUI's clip_preprocess). Otherwise a
    square around the face ``box`` (x1, y1, x2, y2 pixels): side = the box's longer side x (1 + 2 margin), centred
    on the box, moved inside the photo where it would stick out (and no larger than the photo's short side), so it
    holds only real pixels; then resized to ``size`` (bicubic, antialiased). Off-centre and half-body photos then
    give CLIP the face, not clothes and background."""
    if margin is None:
        return _centre_square(image, size)
    h, w = image.shape[-2:]
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(1, min(round(max(x2 - x1, y2 - y1) * (1 + 2 * margin)), h, w))
    left = round(min(max((x1 + x2) / 2 - side / 2, 0), w - side))
    top = round(min(max((y1 + y2) / 2 - side / 2, 0), h - side))
    crop = image[..., top:top + side, left:left + side]
    if side == size:
        return crop
    return F.interpolate(crop[None], size=(size, size), mode="bicubic", antialias=True)[0]


def clip_vision_preprocess(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """[B, 3, H, W] RGB 0..1 -> CLIP vision input, as ComfyUI's clip_preprocess(crop=True) makes it: short side
    resized to ``size`` (bicubic, antialiased), centre crop, 8-bit quantisation, normalisation. The trainer uses
    this so its references look exactly like the node's."""
    cropped = torch.clip(255.0 * _centre_square(images, size), 0, 255).round() / 255.0
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (cropped - mean_t) / std_t
