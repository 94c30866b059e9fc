"""The frozen Stable Diffusion base every trainer trains against (loaded offline from a diffusers folder or a single
file, its family, diffusers' pipeline classes) and the cache of frozen models' per-photo outputs the tasks share."""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from ..nodes.arch.unet_blocks import family_of_unet
from ..nodes.errors import ConfigError
from .model_folders import base_model_problems


def load_base_model(base: str) -> dict:
    """A Stable Diffusion base (diffusers folder or single-file checkpoint), offline: tokenizer, text_encoder, vae,
    unet, noise_scheduler (a DDPMScheduler with the base's schedule) and, for SDXL, tokenizer_2 and text_encoder_2."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    second = {}  # SDXL's second tokenizer and text encoder (OpenCLIP bigG, with the pooled projection)
    if os.path.isdir(base):
        problems = base_model_problems(base)
        if problems:
            raise ConfigError(problems[0])
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
        if os.path.isdir(os.path.join(base, "text_encoder_2")):
            second = dict(tokenizer_2=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2"),
                          text_encoder_2=CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2"))
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    else:
        sd_pipeline, sdxl_pipeline = sd_pipelines()
        pipeline_class = sdxl_pipeline if is_sdxl_checkpoint(base) else sd_pipeline
        try:
            pipe = pipeline_class.from_single_file(base, local_files_only=True)
        except Exception as exc:
            raise ConfigError(f"could not load the single-file checkpoint {base!r} offline as {pipeline_class.__name__} "
                              f"({type(exc).__name__}: {exc}); convert it to a diffusers folder or pass that folder as "
                              "--base_model") from exc
        tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
        if getattr(pipe, "text_encoder_2", None) is not None:
            second = dict(tokenizer_2=pipe.tokenizer_2, text_encoder_2=pipe.text_encoder_2)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, noise_scheduler=noise_scheduler,
                **second)


def sd_pipelines():
    """diffusers' SD and SDXL pipeline classes. Importing them makes transformers announce, once per image-processor
    class, a fallback to PIL where torchvision is missing; the trainer uses no image processor, so that notice is
    silenced here and nowhere else."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    finally:
        transformers_logging.set_verbosity(verbosity)
    return StableDiffusionPipeline, StableDiffusionXLPipeline


def sampling_pipeline(models, unet, sdxl: bool = False):
    """diffusers' SD (or, with ``sdxl``, SDXL) pipeline with DDIM over ``models``' VAE, text encoder(s), tokenizer(s)
    and training scheduler's config, and ``unet`` (no safety checker, no watermark): how validation and the
    evaluation generate images."""
    from diffusers import DDIMScheduler

    sd_pipeline, sdxl_pipeline = sd_pipelines()
    scheduler = DDIMScheduler.from_config(models.noise_scheduler.config)
    if sdxl:
        pipe = sdxl_pipeline(vae=models.vae, text_encoder=models.text_encoder, text_encoder_2=models.text_encoder_2,
                             tokenizer=models.tokenizer, tokenizer_2=models.tokenizer_2, unet=unet, scheduler=scheduler,
                             add_watermarker=False)
    else:
        pipe = sd_pipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=unet,
                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_sdxl_checkpoint(path: str) -> bool:
    """Whether a single-file checkpoint holds SDXL's two text encoders (read from the safetensors header only)."""
    if not path.endswith(".safetensors"):
        return False
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return any(k.startswith("conditioner.embedders.1.") for k in f.keys())
    except Exception:
        return False  # an unreadable file gets its clear error from the loader


def base_family(unet) -> str:
    """sd15, sd21 or sdxl from the UNet's config; any other base is a clear error."""
    return family_of_unet(unet.config.cross_attention_dim, unet.config.addition_embed_type == "text_time")


class PerImageCache:
    """Values computed from one dataset image by a frozen model, kept on the CPU within ``budget_mb`` (least
    recently used out first). Each value is computed from its image alone, so it never depends on the batch
    that first asked for it: a resumed run stays exact."""

    def __init__(self, budget_mb: int):
        self.budget = budget_mb * 2**20
        self.used = 0
        self.entries: OrderedDict[tuple, tuple] = OrderedDict()

    @staticmethod
    def nbytes(value: tuple) -> int:
        return sum(v.numel() * v.element_size() for v in value if isinstance(v, torch.Tensor))

    def get(self, key: tuple, compute) -> tuple:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
            return value
        value = compute()
        size = self.nbytes(value)
        if size <= self.budget:
            while self.used + size > self.budget:
                self.used -= self.nbytes(self.entries.popitem(last=False)[1])
            self.entries[key] = value
            self.used += size
        return value
