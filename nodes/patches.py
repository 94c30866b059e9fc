"""ComfyUI-side patch objects: the only module that knows ComfyUI's patch call signatures and UNet layout.

- :class:`IDAdapterMiddlePatch`: a ``middle_patch`` ``(x, extra_options) -> x`` running IDAdapter's gated
  self-attention between self- and cross-attention of every transformer block.
- :func:`add_kv_patches`: cross-attention K/V deltas as ``ModelPatcher.add_patches`` entries (they stack
  with LoRAs).
- :func:`unet_block_weights`: a node's block preset and block weight text as {block name: weight}.
- :func:`tokenize_with_identities`, :func:`place_identity_vectors`: put identity vectors where their words' tokens
  are in the output of ``clip.tokenize``.
- :func:`module_patcher`, :func:`run_loaded`: weights owned and loaded by ComfyUI's memory manager.

Patch objects are immutable once attached and shared by every ``model.clone()``. The gated-attention weights
belong to ComfyUI's memory manager: the patch holds them through a model patcher that it returns from
``models()``, so ``load_models_gpu`` loads and offloads them with the MODEL (under --lowvram and dynamic VRAM too);
each call casts them to the activations' device and dtype without keeping the cast. What the patch derives per
device (identity tokens, masks, the step's sigma) is memoised under a lock: ComfyUI 0.38 runs the cond batches
of one step on several devices in threads that share the patch.
"""

from __future__ import annotations

import copy
import math
import threading
import weakref

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .arch import block_weights as block_weights_arch
from .arch.adaface import expand_placeholder
from .arch.idadapter import IDAdapter, identifier_token
from .arch.unet_blocks import BlockSpec, add_on_rows, block_name
from .errors import ConfigError, ImageInputError, PackError


def module_patcher(module: torch.nn.Module):
    """A ComfyUI model patcher owning ``module``, so that ComfyUI's memory manager loads and offloads it.

    ComfyUI 0.38 builds patch models with ``comfy.model_patcher.CoreModelPatcher``, which main.py rebinds at
    startup to the dynamic-VRAM patcher where that is on (so it is looked up here, at call time); 0.3.x has only
    ``ModelPatcher``. Make one per loaded file and keep it as long as the module: every node using that file
    shares it, and with it a single copy of the weights.
    """
    import comfy.model_management
    import comfy.model_patcher

    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    return patcher_class(module, load_device=comfy.model_management.get_torch_device(),
                         offload_device=comfy.model_management.unet_offload_device())


def adapter_patcher(adapter: IDAdapter):
    """The model patcher of ``adapter``'s gated-attention modules (all the UNet patch runs)."""
    return module_patcher(adapter.adapters)


def run_loaded(patcher, *args):
    """The patcher's module called on ``args``, loaded by ComfyUI's memory manager, on its load device.

    Under --lowvram the manager may leave part of the module offloaded, so the call sees every parameter on the
    load device as float32 for this call only (a no-op for those already there); nothing keeps that copy.
    """
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    module = patcher.model
    device = patcher.load_device
    params = {name: p.to(device, torch.float32) for name, p in module.named_parameters()}
    buffers = {name: b.to(device) for name, b in module.named_buffers()}
    return torch.func.functional_call(module, {**params, **buffers}, args, strict=True, tie_weights=False)


def comfy_attention(extra_options: dict):
    """ComfyUI's current attention kernel for one block call, in the (q, k, v, heads) form the arch modules take.

    It gets the block's ``attn_precision`` (SD2.x asks for float32: its fp16 attention logits overflow) and the
    call's transformer options, as the block's own attention does, so an ``optimized_attention_override`` that a
    node put in the MODEL's transformer options (an attention-backend switch) runs for the adapter's attention too.
    """
    from comfy.ldm.modules.attention import optimized_attention

    precision = extra_options.get("attn_precision")

    def attention(q, k, v, heads):
        return optimized_attention(q, k, v, heads, attn_precision=precision, transformer_options=extra_options)

    return attention


class PerDeviceMemo:
    """Values computed once per key, where a key starts with the torch.device the value lives on.

    Safe when several threads (one per device) ask at once. A value is computed outside the lock, so one device's
    copy never waits for another's; if two threads race on one key, both get the first value stored.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict = {}

    def get(self, key: tuple, compute):
        with self._lock:
            if key in self._values:
                return self._values[key]
        value = compute()
        with self._lock:
            return self._values.setdefault(key, value)

    def release_accelerator_values(self) -> None:
        """Forgets every value not on the CPU (callers still holding one keep it alive until they are done)."""
        with self._lock:
            self._values = {k: v for k, v in self._values.items() if k[0].type == "cpu"}


class StepSigma:
    """The current step's sigma as a float, read off each device once per step (every block of a step sees the
    same ``sigmas`` tensor; each multi-GPU thread has its own), without keeping the tensor alive."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: dict = {}  # device -> (weakref to the sigmas tensor, its value)

    def get(self, sigmas: torch.Tensor) -> float:
        with self._lock:
            seen = self._seen.get(sigmas.device)
        if seen is not None and seen[0]() is sigmas:
            return seen[1]
        sigma = float(sigmas.detach().max())
        with self._lock:
            self._seen[sigmas.device] = (weakref.ref(sigmas), sigma)
        return sigma


def images_per_chunk(extra_options: dict, batch: int) -> int:
    """How many latent images each CFG chunk of a ``batch``-row call holds (ComfyUI stacks one copy of the latent
    batch per entry of ``cond_or_uncond``)."""
    return batch // len(extra_options.get("cond_or_uncond") or [0])


def conditional_rows(cond_or_uncond, batch: int) -> list[int] | None:
    """Row indices of the conditional CFG chunks, or None when every row is conditional."""
    if not cond_or_uncond or all(c == 0 for c in cond_or_uncond):
        return None
    per_chunk = batch // len(cond_or_uncond)
    return [i * per_chunk + j for i, c in enumerate(cond_or_uncond) if c == 0 for j in range(per_chunk)]


def token_grid(extra_options: dict, tokens: int) -> tuple[int, int]:
    """(h, w) of a block's token grid: the ``activations_shape`` [B, C, H, W] its SpatialTransformer sets, or
    where that is missing or does not fit, the downscale of the latent in ``original_shape`` that holds ``tokens``."""
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[-2] * shape[-1] == tokens:
        return int(shape[-2]), int(shape[-1])
    original = extra_options.get("original_shape")
    if original is None:
        raise PackError(f"cannot place {tokens} tokens: the block gave neither activations_shape nor original_shape")
    height, width = original[-2:]
    for level in range(8):
        f = 2**level
        h, w = math.ceil(height / f), math.ceil(width / f)
        if h * w == tokens:
            return h, w
    raise PackError(f"cannot place {tokens} tokens on the {height}x{width} latent grid")


def check_attn_mask(mask) -> torch.Tensor | None:
    """An Apply node's ``attn_mask`` as float [B, H, W] in [0, 1] (values outside are clamped), or None.

    A mask that is not [H, W] or [B, H, W], is empty, or holds NaN or infinite values is an error here, at apply.
    Whether B fits the latent batch (one mask for every image, or one per image) is known only at sampling
    (:meth:`BlockMask.for_rows`).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or 0 in mask.shape:
        got = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ImageInputError(f"attn_mask must be a MASK [batch, height, width] with at least one pixel, got {got}: "
                              "connect a mask node's output (e.g. Load Image's MASK, Solid Mask, Mask Composite)")
    mask = mask.detach().float()
    if not torch.isfinite(mask).all():
        raise ImageInputError("attn_mask contains NaN or infinite values: check the node that produced it (a mask "
                              "holds 0 to 1, white where the identity goes)")
    return mask.reshape(-1, *mask.shape[-2:]).clamp(0, 1)


class BlockMask:
    """A MASK [H, W] or [B, H, W] resized to each block's token grid, once per device, grid and row count.

    The batch rule: one mask for every image of the latent batch, or exactly one per image (mask i on image i
    in every CFG chunk); any other count is an error when the latent batch is known, at sampling.
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.detach().float().reshape(-1, *mask.shape[-2:])
        self._resized = PerDeviceMemo()

    def for_rows(self, extra_options: dict, images: int, rows: int, tokens: int, like: torch.Tensor) -> torch.Tensor:
        """[1 or rows, tokens, 1] for ``rows`` batch rows, ``images`` latent images per CFG chunk: the one mask,
        or each image's mask on its row of each of the ``rows // images`` chunks."""
        masks = self.mask.shape[0]
        if masks not in (1, images):
            raise ImageInputError(
                f"attn_mask is a batch of {masks} masks and the latent batch has {images} image{'s' * (images != 1)}: "
                f"give one mask for all images, or one per image (a batch of {images} mask{'s' * (images != 1)}, "
                f"or a latent batch of {masks})")
        h, w = token_grid(extra_options, tokens)

        def resized():
            mask = F.interpolate(self.mask.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False)
            mask = mask.reshape(masks, h * w, 1).to(like.device, like.dtype)
            return mask if masks == 1 else mask.repeat(rows // images, 1, 1)

        return self._resized.get((like.device, like.dtype, h, w, rows), resized)

    def cropped(self, regions, source_width: int, source_height: int, target_width: int,
                target_height: int) -> BlockMask:
        """The mask of each tile of tiled sampling: for each (left, top, right, bottom) region in pixels of the
        ``source_width`` x ``source_height`` image, that part of the mask (0 outside the image), resized to
        ``target_width`` x ``target_height``; tile i of the batch gets region i's mask. A batch of masks (one per
        image) cannot follow the tiles of one image and is refused."""
        if self.mask.shape[0] != 1:
            raise ImageInputError(f"attn_mask is a batch of {self.mask.shape[0]} masks and the sampler tiles the image: "
                                  "tiled sampling takes one mask for the whole image (or sample without tiles)")
        sizes = (source_width, source_height, target_width, target_height)
        if not all(isinstance(n, int) and n > 0 for n in sizes) or not regions or not all(
                len(r) == 4 and all(isinstance(n, int) for n in r) and r[0] < r[2] and r[1] < r[3] for r in regions):
            raise PackError(f"tiled sampling gave regions {list(regions)[:4]} of a {source_width}x{source_height} image "
                            f"for {target_width}x{target_height} tiles: expected (left, top, right, bottom) pixel "
                            "rectangles and positive sizes")
        image = F.interpolate(self.mask.unsqueeze(1), size=(source_height, source_width), mode="bilinear",
                              align_corners=False)[0, 0]
        tiles = []
        for left, top, right, bottom in regions:
            inside = image[max(top, 0):min(bottom, source_height), max(left, 0):min(right, source_width)]
            tile = F.pad(inside, (max(-left, 0), max(right - source_width, 0), max(-top, 0),
                                  max(bottom - source_height, 0)))
            tiles.append(F.interpolate(tile[None, None], size=(target_height, target_width), mode="bilinear",
                                       align_corners=False)[0, 0])
        return BlockMask(torch.stack(tiles))

    def release_accelerator_values(self) -> None:
        self._resized.release_accelerator_values()


class IdentityResidual:
    """One Apply IDAdapter's identity: its adapter (through the patcher), tokens E_r, weight beta, sigma window,
    mask and block weights, and the gated-attention residual it adds in a block."""

    def __init__(self, patcher, tokens: torch.Tensor, weight: float, sigma_start: float, sigma_end: float,
                 mask: torch.Tensor | None, block_weights: dict[str, float] | None):
        self.patcher = patcher
        self.tokens = tokens.detach()
        self.weight = float(weight)
        self.block_weights = dict(block_weights or {})
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self.mask = None if mask is None else BlockMask(mask)
        self._tokens = PerDeviceMemo()

    def weight_at(self, name: str, sigma: float | None) -> float:
        """beta x the block's weight; 0 where the adapter has no such block or sigma is outside the window."""
        if name not in self.patcher.model or (sigma is not None and not self.sigma_end <= sigma <= self.sigma_start):
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

    def with_mask(self, mask: BlockMask):
        """This identity with another mask (this one stays as it is)."""
        identity = copy.copy(self)
        identity.mask, identity._tokens = mask, PerDeviceMemo()
        return identity

    def release_accelerator_values(self) -> None:
        self._tokens.release_accelerator_values()
        if self.mask is not None:
            self.mask.release_accelerator_values()


class IdentitiesPatch:
    """What the IDAdapter and W+ patches share: a tuple of identities (each with its ``patcher``, per-device values
    and ``release_accelerator_values``), joined by later apply nodes into a new patch, never changed once attached."""

    identities: tuple

    def joined(self, other):
        """A new patch with this patch's identities and then ``other``'s (both stay as they are)."""
        return self._replace(identities=self.identities + other.identities)

    def _replace(self, **changes):
        """A copy of this patch with ``changes`` (attribute: value); this one stays as it is."""
        patch = copy.copy(self)
        patch.__dict__.update(changes)
        patch._sigma = StepSigma()
        return patch

    def spatial_crop_inputs(self, *, regions, source_width: int, source_height: int, target_width: int,
                            target_height: int, **kwargs):
        """ComfyUI's protocol for tiled sampling: a patch for tiles cut out of the image. ``regions`` are the tiles'
        (left, top, right, bottom) rectangles in pixels of the ``source_width`` x ``source_height`` image, tile i
        being image i of the tiled batch, each resized to ``target_width`` x ``target_height``. Each identity's mask
        becomes each tile's part of it (:meth:`BlockMask.cropped`); without masks the patch is the same for every
        tile and comes back as it is. This patch stays as it is."""
        crop = (regions, source_width, source_height, target_width, target_height)
        if all(identity.mask is None for identity in self.identities):
            return self
        return self._replace(identities=tuple(identity.with_mask(identity.mask.cropped(*crop))
                                              if identity.mask is not None else identity
                                              for identity in self.identities))

    def __deepcopy__(self, memo):
        return self  # immutable once attached: clones share it (and its patchers)

    def _patchers(self) -> list:
        """Each adapter file's patcher once, for ComfyUI's ``load_models_gpu``."""
        return list({id(i.patcher): i.patcher for i in self.identities}.values())

    def _release_if_cpu(self, device_or_dtype) -> None:
        """On a move to the CPU, lets go of the identities' copies on accelerators."""
        if isinstance(device_or_dtype, (str, torch.device)) and torch.device(device_or_dtype).type == "cpu":
            for identity in self.identities:
                identity.release_accelerator_values()


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


@dataclass(frozen=True)
class IdentityWord:
    """One identity's word in a prompt and what replaces it: per text encoder key, K vectors [K, D]. The prompt
    carries the word once per place; it is written out K times there before tokenizing, and the K copies become the
    K vectors in order."""

    word: str
    vectors: dict[str, torch.Tensor]
    source: str  # the node that made it, for messages ("IDAdapter", "AdaFace")
    class_noun: str = ""  # IDAdapter: "<class noun> is <word>" is appended when the encode node appends phrases
    append_if_missing: bool = False  # AdaFace Encode's own placeholder: appended when the text lacks it (official)

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def word_token_ids(clip, word: str) -> dict[str, int]:
    """The single token id ``word`` is for each of the CLIP's text encoders."""
    ids = {}
    for key, rows in clip.tokenize(word, return_word_ids=True).items():
        ids[key] = identifier_token(word, [entry[0] for entry in rows[0] if len(entry) > 2 and entry[2] == 1], key)
    return ids


def tokenize_with_identities(clip, text: str, words: list[IdentityWord]) -> dict:
    """``clip.tokenize(text)`` with each identity word's tokens replaced by its vectors, for every text encoder.

    Each word must be its own (one-token) word, written where its person goes; several words are several people in
    one prompt ("sks and ohwx at a cafe"). Rows keep their length (ComfyUI adds position embeddings to all 77
    places), weights and word ids.
    """
    names = [w.word.lower() for w in words]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"several identities use the word {repeated[0]!r}: give each person its own word")
    found = {}
    for word in words:
        if word.count > 1 or word.append_if_missing:
            text, found[word.word] = expand_placeholder(text, word.word, word.count)
            if not found[word.word] and not word.append_if_missing:
                raise _not_in_text(word)
    tokens = clip.tokenize(text)
    for word in words:
        lacking = sorted(set(tokens) - set(word.vectors))
        if lacking:
            raise PackError(f"the CLIP has text encoders {sorted(tokens)}; the {word.source} identity {word.word!r} "
                            f"gives vectors for {sorted(word.vectors)}: it was made for another base model")
        for key, token_id in word_token_ids(clip, word.word).items():
            tokens, placed = place_identity_vectors(tokens, key, token_id, word.vectors[key])
            if placed == 0:
                raise _not_in_text(word)
            expected = word.count * max(found.get(word.word, 1), 1)
            if (word.word in found and placed != expected) or placed % word.count:
                raise PackError(f"the {word.source} identity's word {word.word!r} was found "
                                f"{placed / word.count:g} times among the text's tokens: write it as a separate "
                                "word where that person goes (or choose another word)")
    return tokens


def _not_in_text(word: IdentityWord) -> PackError:
    return PackError(f"the text does not contain {word.word!r} (an {word.source} identity's word): write it where "
                     "that person goes, as a separate word")


def _is_token(entry: tuple, token_id: int) -> bool:
    """Whether a ``clip.tokenize`` entry is that token (entries of ``embedding:`` names hold tensors instead)."""
    return isinstance(entry[0], int) and entry[0] == token_id


def place_identity_vectors(tokens: dict, key: str, placeholder_id: int, vectors: torch.Tensor) -> tuple[dict, int]:
    """Each placeholder entry of encoder ``key``'s rows, in reading order, becomes the next of ``vectors`` [K, D],
    starting over after K: the prompt was written with every placeholder repeated K times.

    Rows keep their length (ComfyUI adds position embeddings to all 77 places), weights and word ids. Returns the
    tokens and how many entries were replaced.
    """
    vectors = vectors.detach().float()
    placed = 0
    rows = []
    for row in tokens[key]:
        new_row = []
        for entry in row:
            if _is_token(entry, placeholder_id):
                entry = (vectors[placed % len(vectors)], *entry[1:])
                placed += 1
            new_row.append(entry)
        rows.append(new_row)
    return {**tokens, key: rows}, placed


def block_key(name: str) -> tuple[str, int, int]:
    """A pack block name ("input_1_0") as ComfyUI's patches_replace key (("input", 1, 0))."""
    kind, number, index = name.rsplit("_", 2)
    return kind, int(number), int(index)


def previous_attn2_replace(model, key: tuple[str, int, int]):
    """The attn2 replace patch ComfyUI would run at ``key`` now (its 3-part key first, else the 2-part one)."""
    replaces = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return replaces.get(key, replaces.get(key[:2]))


class WPlusIdentity:
    """One Apply W+ Adapter's code: the adapter (through the patcher), the code's tokens and the zero code's, the
    scale for this block, the sigma window and the mask, and the residual it adds to one block's text attention."""

    def __init__(self, patcher, tokens: torch.Tensor, uncond_tokens: torch.Tensor, scale: float, sigma_start: float,
                 sigma_end: float, mask: torch.Tensor | None):
        self.patcher = patcher
        self.tokens, self.uncond_tokens = tokens.detach(), uncond_tokens.detach()
        self.scale = float(scale)
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self.mask = None if mask is None else BlockMask(mask)
        self._tokens = PerDeviceMemo()

    def active_at(self, sigma: float | None) -> bool:
        return self.scale != 0 and (sigma is None or self.sigma_end <= sigma <= self.sigma_start)

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

    def with_mask(self, mask: BlockMask):
        """This identity with another mask (this one stays as it is)."""
        identity = copy.copy(self)
        identity.mask, identity._tokens = mask, PerDeviceMemo()
        return identity

    def release_accelerator_values(self) -> None:
        self._tokens.release_accelerator_values()
        if self.mask is not None:
            self.mask.release_accelerator_values()


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
        """As :meth:`IDAdapterMiddlePatch.to`, and the patch it wraps is moved too. This patch is never changed (every
        clone and every multi-GPU thread shares it): where the wrapped patch's ``to`` gives another object, the
        result is a copy of this patch around that one."""
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
