"""The models an IDAdapter run uses, for the trainer and the evaluation alike: loaded (or, for --preset tiny, built),
the adapter's shape for a base, CLIP vision's features of the references, images generated with an adapter, and the
module a training run prepares (the UNet with the adapter attached)."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..nodes.arch import idadapter as ida
from ..nodes.arch.iresnet import load_arcface, same_features
from ..nodes.errors import ConfigError
from ..nodes.face import insightface_backend
from . import diffusers_binding
from .base_model import base_family, load_base_model
from .idadapter_config import IDAdapterTrainConfig
from .prompts import PromptEncoder


class Components:
    """The frozen models and tokenizers a run uses (SDXL bases also have ``tokenizer_2``/``text_encoder_2``)."""

    def __init__(self, tokenizer, text_encoder, vae, unet, noise_scheduler, clip_vision, arcface, analyzer,
                 tokenizer_2=None, text_encoder_2=None):
        self.tokenizer, self.text_encoder, self.vae, self.unet = tokenizer, text_encoder, vae, unet
        self.noise_scheduler, self.clip_vision, self.arcface, self.analyzer = noise_scheduler, clip_vision, arcface, analyzer
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def text_encoders(self) -> list:
        return [t for t in (self.text_encoder, self.text_encoder_2) if t is not None]


def load_components(config: IDAdapterTrainConfig) -> tuple[Components, str, str]:
    """Loads (or, for --preset tiny, builds) every model; returns them, the dataset folder and the held-out one."""
    if config.preset == "tiny":
        from . import tiny

        # held out: new photos of the same identities
        assets, pack, data_dir, heldout_dir = tiny.face_assets(config, config.resolution, config.synthetic_identities, 2)
        tokenizer = tiny.tiny_tokenizer(os.path.join(assets, "tokenizer"))
        text_encoder, vae = tiny.tiny_text_encoder(len(tokenizer)), tiny.tiny_vae()
        noise_scheduler = tiny.tiny_scheduler()
        unet = tiny.base_unet(assets, vae, text_encoder, tokenizer, noise_scheduler, data_dir, config.tiny_base_steps,
                              config.seed)
        analyzer, arcface = load_face_models(pack, provider="CPU")
        return Components(tokenizer, text_encoder, vae, unet, noise_scheduler, tiny.tiny_clip_vision(), arcface,
                          analyzer), data_dir, heldout_dir

    from transformers import CLIPVisionModelWithProjection

    base = load_base_model(config.base_model)
    clip_vision = CLIPVisionModelWithProjection.from_pretrained(config.clip_vision)
    analyzer, arcface = load_face_models(config.insightface_pack, config.arcface)
    return Components(base.pop("tokenizer"), base.pop("text_encoder"), base.pop("vae"), base.pop("unet"),
                      base.pop("noise_scheduler"), clip_vision, arcface, analyzer, **base), config.dataset, \
        config.heldout_dataset


def load_face_models(pack_folder: str, arcface: str = "", provider: str = "auto"):
    """The insightface detector + recognizer of a pack (any folder holding its .onnx files) and the torch ArcFace
    of the identity loss: the pack's own recognizer, as the nodes use it, or ``arcface``, which must hold the same
    weights (in any file format): the loss compares its features with the dataset's vectors, made by the pack's."""
    analyzer = insightface_backend.load_analyzer(insightface_backend.check_pack_folder(pack_folder), provider, 640)
    pack_recognizer = insightface_backend.recognizer_file(analyzer)
    identity_model = load_arcface(pack_recognizer)
    if arcface:
        chosen = load_arcface(arcface)
        if not same_features(identity_model, chosen):
            raise ConfigError(
                f"--arcface {arcface} holds other weights than the insightface pack's recognizer {pack_recognizer}: "
                "the dataset's identity vectors come from the pack's recognizer, so the identity loss would compare "
                "features of two different ArcFace models. Leave --arcface out (the pack's recognizer is used) or "
                "pass that recognizer's own weights (its .onnx, or an arcface_torch .pth of the same model)"
            )
        identity_model = chosen
    return analyzer, identity_model


def adapter_config(config: IDAdapterTrainConfig, unet, clip_vision) -> ida.IDAdapterConfig:
    """The shape of the adapter the trainer's options make for this UNet and CLIP vision encoder."""
    return ida.IDAdapterConfig(
        family=base_family(unet), blocks=diffusers_binding.block_specs(unet),
        clip_vision_dim=clip_vision.config.hidden_size, width=config.mff_width, mff_heads=config.mff_heads,
        num_tokens=config.num_tokens, embed_dim=config.embed_dim, textual_hidden=config.textual_hidden,
        num_images=config.num_images,
        face_crop_margin=config.face_crop_margin if config.reference_crop == "face" else None,
    )


@torch.no_grad()
def clip_vision_features(clip_vision, images: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate hidden states [n, T, D] and final class tokens [n, D] of [n, 3, H, W] 0..1 images (what MFF Embed
    takes from ComfyUI's CLIP_VISION)."""
    pixel = ida.clip_vision_preprocess(images, clip_vision.config.image_size).to(device, dtype)
    out = clip_vision(pixel_values=pixel, output_hidden_states=True)
    return out.hidden_states[-2], out.last_hidden_state[:, 0]


@torch.no_grad()
def generate_image(pipe, prompts: PromptEncoder, e_r: torch.Tensor, e_c: dict[str, torch.Tensor], prompt: str, *,
                   steps: int, guidance_scale: float, resolution: int, seed: int, dtype, weight: float = 1.0):
    """One image (PIL) of a finished prompt (the identifier in it), with E_c in the text and E_r in the gated
    attention at ``weight``; with guidance the adapter runs on the conditional half only, as the node does."""
    from PIL import Image

    text, added = prompts([prompt], e_c)
    negative, negative_added = prompts([""], e_c)
    embeds = dict(prompt_embeds=text.to(dtype), negative_prompt_embeds=negative.to(dtype))
    if added is not None:
        embeds.update(pooled_prompt_embeds=added["text_embeds"].to(dtype),
                      negative_pooled_prompt_embeds=negative_added["text_embeds"].to(dtype))
    # diffusers batches the unconditional half first, and runs no unconditional half at guidance 1 or less
    active = torch.tensor([False, True]) if guidance_scale > 1 else None
    out = pipe(**embeds, num_inference_steps=steps, guidance_scale=guidance_scale, height=resolution,
               width=resolution, output_type="np", generator=torch.Generator().manual_seed(seed),
               cross_attention_kwargs=diffusers_binding.idadapter_kwargs(e_r, active, weight))
    return Image.fromarray((np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8))


class TrainableIDAdapter(nn.Module):
    """What Accelerate prepares: the UNet (frozen but for attn2 to_k/to_v) with the adapter attached."""

    def __init__(self, unet, adapter: ida.IDAdapter):
        super().__init__()
        self.unet = unet
        self.adapter = adapter

    def forward(self, noisy, timesteps, text, tokens, row_mask, added_cond=None):
        """``row_mask`` [B, 1, 1] on the device (1: the row keeps its image condition) or None (every row)."""
        kwargs = diffusers_binding.idadapter_kwargs(tokens, row_mask=row_mask)
        return self.unet(noisy, timesteps, encoder_hidden_states=text, cross_attention_kwargs=kwargs,
                         added_cond_kwargs=added_cond).sample
