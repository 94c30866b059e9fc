"""W+ adapter training (paper §3.2-3.3; the official train_face.py / train_wild.py) as a task for ``training.loop``.

- Stage I (``--stage 1``): each photo's face FFHQ-aligned at --resolution (from its landmarks, as W+ Encode aligns
  it for e4e) with a neutral prompt (--stage1_prompts). The mapping network and every residual cross-attention
  train on the diffusion loss; the residual projections start as copies of their layer's own to_q / to_k / to_v
  (or from --adapter_init).
- Stage II (``--stage 2``): the photos themselves (centre square) with their captions and face masks; the mapping
  network is frozen (from --adapter_init, stage I's export), the residual cross-attention trains on
  reconstruction + --disentangle_weight x L_disen + --preserve_weight x L_preserve (``training.wplus_losses``).

Both stages drop the W+ code, the text or both (--wplus_dropout, --text_dropout, --both_dropout) for classifier-free
guidance; a dropped code is the zero code, whose tokens are the ones the node uses for the unconditional half.

Each photo's W+ code is e4e's code of its aligned face (``e4e.align_for_e4e``, what W+ Encode computes), computed
once and kept in ``<cache_dir>/wplus_codes.safetensors`` (keyed by the photo's path, size and mtime, and by the
encoder file; ``training.wplus_models``); a run with every code cached never loads e4e. The UNet runs with
``training.diffusers_binding``'s W+ processors, which hold the nodes' own ``ResidualCrossAttention`` modules.

Not done (the official stage II has them): the background-removed face for the code (W+ Encode has no face parser
either, so training and inference see the same codes), and the rotation/scale/colour augmentation of the photos.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from ..nodes.arch import wplus as wp
from ..nodes.arch import wplus_edits
from ..nodes.arch.ffhq_align import align_ffhq, ffhq_quad
from ..nodes.errors import ConfigError
from . import data as dataset
from . import diffusers_binding
from . import wplus_losses as losses
from .base_model import PerImageCache, base_family, sampling_pipeline
from .diffusion import training_target, vae_downscale
from .task import step_generator
from .wplus_config import WPlusTrainConfig
from .wplus_models import WPlusModels, cached_codes, load_models

HELDOUT_REPEATS = 8  # noise draws per held-out photo
PAPER_RESOLUTION = 512  # the resolution --mask_erode and --mask_blur are given at


class TrainableWPlus(nn.Module):
    """What Accelerate prepares: the frozen UNet with the W+ processors attached, and the adapter they run.

    ``forward(noisy, timesteps, text, w, scale)``: the mapping network turns W+ codes [B, 18, 512] into tokens inside
    the forward (so DDP sees its gradients), and the UNet predicts with them at ``scale``."""

    def __init__(self, unet, adapter: wp.WPlusAdapter):
        super().__init__()
        self.unet = unet
        self.adapter = adapter
        diffusers_binding.attach_wplus(unet, adapter)

    def forward(self, noisy, timesteps, text, w, scale: float = 1.0):
        kwargs = diffusers_binding.wplus_kwargs(self.adapter.tokens(w), scale)
        return self.unet(noisy, timesteps, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample


def initial_adapter(config: WPlusTrainConfig, unet, family: str) -> wp.WPlusAdapter:
    """Where training starts: --adapter_init (a wplus/1 or official file made for this UNet), else a new mapping
    network and residual projections copied from each cross-attention's own to_q, to_k, to_v (the official
    initialisation)."""
    cfg = wp.WPlusAdapterConfig(family, diffusers_binding.block_specs(unet))
    if config.adapter_init:
        adapter = wp.load_wplus_file(config.adapter_init).adapter
        if adapter.config != cfg:
            theirs, ours = adapter.config, cfg
            raise ConfigError(f"--adapter_init {config.adapter_init!r} is a W+ adapter for a {theirs.family} UNet with "
                              f"blocks {sorted(theirs.blocks)[:4]}...; this base is {ours.family} with blocks "
                              f"{sorted(ours.blocks)[:4]}... (or other widths): use an adapter trained on this base")
        return adapter.float().train().requires_grad_(True)
    torch.manual_seed(config.seed)
    adapter = wp.WPlusAdapter(cfg)
    blocks = diffusers_binding.transformer_blocks(unet)
    with torch.no_grad():
        for name, layer in adapter.layers.items():
            attn2 = blocks[name].attn2
            for ours, theirs in (("to_q_wplus", attn2.to_q), ("to_k_wplus", attn2.to_k), ("to_v_wplus", attn2.to_v)):
                getattr(layer, ours).weight.copy_(theirs.weight.float())
    return adapter


def _direction_rows(path: str) -> torch.Tensor:
    """A direction file as [18, 512] float32, zero on the rows it does not edit (a latent direction's 8:18)."""
    direction = wplus_edits.load_direction(path)
    if not isinstance(direction, wplus_edits.Direction):
        raise ConfigError(f"{path} is GANSpace's PCA, not one direction: pass InterFaceGAN .pt or latent-direction "
                          ".npy files")
    rows = wplus_edits.apply_direction(torch.zeros(wp.W_ROWS, wp.W_DIM, dtype=torch.float64), direction, 1.0)
    return rows.float()


class WPlusTask:
    comfyui_folder = "wplus"  # ComfyUI/models/<this>/, where Load W+ Adapter lists files

    def __init__(self, config: WPlusTrainConfig, models: WPlusModels | None = None, log=print):
        self.config = config
        self.log = log
        if models is None:
            models, data_dir, heldout_dir = load_models(config)
        else:
            data_dir, heldout_dir = config.dataset, config.heldout_dataset
        self.m = models
        self.cache_dir = config.cache_dir or os.path.join(config.output_dir, "cache")
        identities, _ = dataset.scan_dataset(data_dir, models.analyzer, self.cache_dir, log=log,
                                             mask_suffix=config.mask_suffix)
        self.photos = [image for identity in identities for image in identity.images]
        self.heldout = []  # (photo, index of the identity) of every held-out photo
        if heldout_dir:
            heldout, _ = dataset.scan_dataset(heldout_dir, models.analyzer, os.path.join(self.cache_dir, "heldout"),
                                              log=lambda text: log(f"held-out {text}"), mask_suffix=config.mask_suffix)
            if len(heldout) >= 2:  # the check compares a photo's own code with another person's
                self.heldout = [(image, i) for i, identity in enumerate(heldout) for image in identity.images]
            else:
                log("held-out check off: it compares a photo's own W+ code with another person's, so the held-out "
                    "set needs photos of at least two people")
        self.family = base_family(models.unet)
        for module in (models.text_encoder, models.vae, models.unet):
            module.requires_grad_(False).eval()
        adapter = initial_adapter(config, models.unet, self.family)
        if config.stage == 2:  # the mapping stays as stage I left it
            adapter.w_proj.requires_grad_(False)
        self.trainable = TrainableWPlus(models.unet, adapter)
        self.augment_directions = [_direction_rows(p) for p in config.augment_directions]
        self.validation_edits = [(os.path.basename(p), _direction_rows(p)) for p in config.validation_directions]
        self.mask_problems: set[str] = set()

    @property
    def adapter(self) -> wp.WPlusAdapter:
        return self.trainable.adapter

    # ---- the task interface used by training.loop

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.adapter.parameters() if p.requires_grad]}]

    def setup(self, accelerator):
        self.accelerator = accelerator
        self.device = accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                                torch.float32)
        for module in (self.m.text_encoder, self.m.unet):
            nn.Module.to(module, self.device, self.weight_dtype)
        nn.Module.to(self.m.vae, self.device)  # float32: the targets' latents are computed once
        self.trainable.to(self.device)
        if self.config.gradient_checkpointing:
            self.m.unet.enable_gradient_checkpointing()
        self.cache = PerImageCache(self.config.cache_mb)
        # the main process encodes the missing faces and writes the cache; the others then read it
        with accelerator.main_process_first():
            everything = self.photos + [photo for photo, _ in self.heldout]
            codes = cached_codes(everything, os.path.join(self.cache_dir, "wplus_codes.safetensors"),
                                 self.m.encoder_id, self.m.encoder, self.device,
                                 log=print if accelerator.is_main_process else (lambda text: None))
        self.codes, self.heldout_codes = codes[:len(self.photos)], codes[len(self.photos):]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.adapter.load_state_dict({k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")})

    def export(self, path: str) -> None:
        dtype = torch.float32 if self.config.preset == "tiny" else torch.float16
        wp.save_wplus_adapter(wp.WPlusAdapterWeights(self.adapter), path, dtype)

    def describe_export(self) -> str:
        what = f"W+ adapter (stage {'I' if self.config.stage == 1 else 'II'})"
        if self.config.preset == "tiny":
            return f"{what} for the tiny test UNet only"
        return f"{what} for {self.family} base models, for Load W+ Adapter"

    # ---- the frozen models' per-photo outputs (through the cache)

    def _generator(self, step: int, salt: int) -> torch.Generator:
        accelerator = getattr(self, "accelerator", None)
        return step_generator(self.config.seed, step, salt, accelerator.process_index if accelerator else 0)

    def target_pixels(self, photo, stage: int) -> torch.Tensor:
        """What the UNet learns to make of a photo: [3, R, R] in 0..1, its aligned face (stage 1) or the photo's
        centre square (stage 2)."""
        size = self.config.resolution
        if stage == 1:
            return align_ffhq(dataset.load_rgb_tensor(photo.path), photo.landmarks, size).clamp(0, 1)
        return dataset.load_square(photo, size)[0]

    def _moments(self, photo, stage: int) -> torch.Tensor:
        @torch.no_grad()
        def compute():
            pixels = self.target_pixels(photo, stage)[None] * 2 - 1
            return (self.m.vae.encode(pixels.to(self.device, self.m.vae.dtype)).latent_dist.parameters[0].cpu(),)

        return self.cache.get(("moments", stage, photo.path), compute)[0]

    def face_mask(self, photo) -> torch.Tensor:
        """The photo's face mask [R, R] in 0..1 in its centre square, eroded and blurred (--mask_erode, --mask_blur
        at 512 px): from its mask file, else the FFHQ crop square of its landmarks (the paper's face region)."""
        cfg = self.config
        size = cfg.resolution
        erode = round(cfg.mask_erode * size / PAPER_RESOLUTION)
        blur = round(cfg.mask_blur * size / PAPER_RESOLUTION)
        mask, source = dataset.load_square_mask(photo, size, cfg.mask_suffix)
        if source == "file":
            return losses.prepare_mask(mask[None], erode, blur)[0]
        if source.startswith("box:") and photo.path not in self.mask_problems:
            self.mask_problems.add(photo.path)
            self.log(f"{source[5:]}: its face region from the landmarks is used instead")
        quad = ffhq_quad(dataset.load_square(photo, size)[1]).float()
        box = torch.cat([quad.min(dim=0).values, quad.max(dim=0).values])
        return losses.face_region_mask(box[None], (size, size), erode, blur)[0]

    def _latent_mask(self, photo, latent_hw: tuple[int, int]) -> torch.Tensor:
        return self.cache.get(("mask", photo.path),
                              lambda: (losses.mask_to_latent(self.face_mask(photo)[None], latent_hw)[0],))[0]

    def fill_cache(self) -> None:
        """Computes every photo's frozen outputs for this stage that are not cached yet, as the first epoch would."""
        side = self.config.resolution // vae_downscale(self.m.vae)
        for photo in self.photos:
            self._moments(photo, self.config.stage)
            if self.config.stage == 2:
                self._latent_mask(photo, (side, side))

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = self.m.tokenizer(prompts, padding="max_length", max_length=self.m.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.m.text_encoder(ids.to(self.device))[0]

    def noisy_batch(self, photos: list, stage: int, gen: torch.Generator):
        """(latents, noise, timesteps, noisy latents) of the photos' targets, drawn from ``gen``."""
        moments = torch.stack([self._moments(photo, stage) for photo in photos])
        latents = DiagonalGaussianDistribution(moments).sample(generator=gen) * self.m.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, self.m.noise_scheduler.config.num_train_timesteps, (len(photos),), generator=gen)
        latents, noise, timesteps = latents.to(self.device), noise.to(self.device), timesteps.to(self.device)
        return latents, noise, timesteps, self.m.noise_scheduler.add_noise(latents, noise, timesteps)

    def augmented(self, codes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The disentanglement loss's other code for each row: one --augment strategy per step."""
        cfg = self.config
        mode = cfg.augment[int(torch.randint(len(cfg.augment), (1,), generator=gen))]
        if mode == "direction":
            direction = self.augment_directions[int(torch.randint(len(self.augment_directions), (1,), generator=gen))]
            return losses.augment_wplus(codes, "direction", gen, direction=direction,
                                        strength_range=(-cfg.direction_strength, cfg.direction_strength))
        if mode == "shuffle_gaussian":
            return losses.augment_wplus(losses.augment_wplus(codes, "shuffle", gen), "gaussian", gen)
        return losses.augment_wplus(codes, mode, gen)

    # ---- one step

    def loss(self, model, step: int):
        cfg = self.config
        gen = self._generator(step, 0)
        picks = torch.randint(len(self.photos), (cfg.batch_size,), generator=gen)
        photos = [self.photos[i] for i in picks.tolist()]
        drop_w, drop_text = losses.wplus_dropout(len(photos), cfg.wplus_dropout, cfg.text_dropout, cfg.both_dropout,
                                                 gen)
        if cfg.stage == 1:
            prompts = [cfg.stage1_prompts[i] for i in torch.randint(len(cfg.stage1_prompts), (len(photos),),
                                                                    generator=gen).tolist()]
        else:
            prompts = [photo.caption for photo in photos]
        text = self.encode_text(["" if drop else prompt for prompt, drop in zip(prompts, drop_text.tolist())])
        codes = self.codes[picks]
        latents, noise, timesteps, noisy = self.noisy_batch(photos, cfg.stage, gen)
        w = losses.apply_wplus_dropout(codes, drop_w).to(self.device)
        prediction = model(noisy, timesteps, text, w).float()
        reconstruction = F.mse_loss(prediction, training_target(self.m.noise_scheduler, latents, noise, timesteps))
        if cfg.stage == 1:
            return reconstruction, {"loss": reconstruction.detach()}
        other = losses.apply_wplus_dropout(self.augmented(codes, gen), drop_w).to(self.device)
        masks = torch.stack([self._latent_mask(photo, tuple(latents.shape[-2:])) for photo in photos]).to(self.device)
        loss, logs = reconstruction, {"reconstruction": reconstruction.detach()}
        # the other predictions are targets only (no gradient), as in the official script; a term weighted 0 is skipped
        with torch.no_grad(), self.accelerator.autocast():
            with_other = self.trainable(noisy, timesteps, text, other).float() if cfg.disentangle_weight else None
            without = self.trainable(noisy, timesteps, text, w, scale=0.0).float() if cfg.preserve_weight else None
        if with_other is not None:
            disentangle = losses.disentanglement_loss(prediction, with_other, masks)
            loss, logs["disentangle"] = loss + cfg.disentangle_weight * disentangle, disentangle.detach()
        if without is not None:
            preserve = losses.regularisation_loss(prediction, without,
                                                  masks if cfg.preserve_outside_face_only else None)
            loss, logs["preserve"] = loss + cfg.preserve_weight * preserve, preserve.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    # ---- evaluation and validation

    @torch.no_grad()
    def heldout_check(self) -> tuple[float, float, float] | None:
        """On the held-out photos, at fixed noise and timesteps: the denoising loss with each photo's own W+ code and
        with another person's (an adapter that learned W+ makes the first clearly lower), and how far that swap
        moves the prediction outside the face (stage II's aim: little). None without two held-out people."""
        if not self.heldout:
            return None
        was_training = self.trainable.training
        self.trainable.eval()
        try:
            return self.heldout_losses(self.trainable)
        finally:
            self.trainable.train(was_training)

    def heldout_losses(self, model, seed: int = 123) -> tuple[float, float, float]:
        """Means over the held-out photos of: the denoising loss on this stage's targets with the photo's own code,
        the same with the next other person's code, and how far that swap moves the prediction outside the face on
        the photo itself (stage II's setting, in both stages, so the two stages' figures compare)."""
        people = [person for _, person in self.heldout]
        count = len(people)
        others = [next((i + j) % count for j in range(1, count) if people[(i + j) % count] != people[i])
                  for i in range(count)]
        sums = np.zeros(3)
        for i, (photo, _) in enumerate(self.heldout):
            own = self.heldout_codes[i:i + 1].expand(HELDOUT_REPEATS, -1, -1).to(self.device)
            swapped = self.heldout_codes[others[i]:others[i] + 1].expand(HELDOUT_REPEATS, -1, -1).to(self.device)
            for stage in dict.fromkeys((self.config.stage, 2)):
                gen = torch.Generator().manual_seed((seed * 7919 + i) * 3 + stage)
                prompt = self.config.stage1_prompts[0] if stage == 1 else photo.caption
                text = self.encode_text([prompt]).expand(HELDOUT_REPEATS, -1, -1)
                latents, noise, timesteps, noisy = self.noisy_batch([photo] * HELDOUT_REPEATS, stage, gen)
                with self.accelerator.autocast():
                    with_own = model(noisy, timesteps, text, own).float()
                    with_other = model(noisy, timesteps, text, swapped).float()
                if stage == self.config.stage:
                    target = training_target(self.m.noise_scheduler, latents, noise, timesteps)
                    sums[0] += F.mse_loss(with_own, target).item()
                    sums[1] += F.mse_loss(with_other, target).item()
                if stage == 2:
                    mask = self._latent_mask(photo, tuple(latents.shape[-2:]))[None].expand(HELDOUT_REPEATS, -1, -1)
                    sums[2] += losses.disentanglement_loss(with_own, with_other, mask.to(self.device)).item()
        own_loss, other_loss, outside = (sums / count).tolist()
        return own_loss, other_loss, outside

    def heldout_line(self, before, after, when: str) -> str:
        return (f"denoising loss with the photo's own W+ {after[0]:.4f} vs another person's {after[1]:.4f} "
                f"({100 * (1 - after[0] / after[1]):.1f} % lower); outside the face that swap moves the prediction by "
                f"{after[2]:.5f} (mean square); {when}: {before[0]:.4f} vs {before[1]:.4f}, {before[2]:.5f}")

    @torch.no_grad()
    def validate(self, model, step: int):
        """Images for each validation prompt x up to two held-out faces (else training faces) x the edits (none, then
        each --validation_directions at -s and +s), DDIM with CFG 7.5 (the paper's evaluation sampler)."""
        trainable = self.accelerator.unwrap_model(model)
        pipe = sampling_pipeline(self.m, trainable.unet)
        codes = self.heldout_codes[:2] if self.heldout else self.codes[:2]
        strength = self.config.validation_edit_strength
        edits = [torch.zeros(wp.W_ROWS, wp.W_DIM)] + [sign * strength * rows for _, rows in self.validation_edits
                                                      for sign in (-1, 1)]
        negative = self.encode_text([""]).to(self.weight_dtype)
        was_training = trainable.training
        trainable.eval()
        try:  # autocast: the pipeline's latents take the text's dtype, the VAE stays in float32
            with self.accelerator.autocast():
                images = self._validation_images(pipe, trainable, codes, edits, negative)
        finally:
            trainable.train(was_training)
        return images

    def _validation_images(self, pipe, trainable, codes, edits, negative) -> list:
        from PIL import Image

        images = []
        for i, prompt in enumerate(self.config.validation_prompts):
            text = self.encode_text([prompt]).to(self.weight_dtype)
            for code in codes:
                for edit in edits:
                    w = (code + edit)[None].to(self.device)
                    tokens = torch.cat([trainable.adapter.uncond_tokens(w), trainable.adapter.tokens(w)])
                    out = pipe(prompt_embeds=text, negative_prompt_embeds=negative,
                               num_inference_steps=self.config.validation_steps, guidance_scale=7.5,
                               height=self.config.resolution, width=self.config.resolution, output_type="np",
                               generator=torch.Generator().manual_seed(i),
                               cross_attention_kwargs=diffusers_binding.wplus_kwargs(tokens.to(self.weight_dtype)))
                    images.append(Image.fromarray((np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)))
        return images
