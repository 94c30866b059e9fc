"""IDAdapter training (the paper's recipe) as a task for ``training.loop``.

Per example: N reference images of one identity (augmented up to N when fewer), a target image of the same
identity with its caption + ", <class noun> is sks". E_c replaces "sks" at the text encoder's input, E_r feeds
the gated self-attention of every UNet transformer block. Trainable: MFF, P_textual, the gated adapters and
the cross-attention W_K, W_V; everything else is frozen. Loss: L_SD + lambda * F(x0_hat) * L_id with L_id =
1 - cos(ArcFace(aligned x0_hat), f_a) and F the face gate of --id_gate (``training.face_gate``).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn
from torch.profiler import record_function

from ..nodes.arch import idadapter as ida
from ..nodes.arch.iresnet import align_faces
from ..nodes.arch.transfer import host_to_device
from ..nodes.errors import ConfigError
from ..nodes.face import insightface_backend
from . import data as dataset
from . import diffusers_binding, face_gate, id_decode
from .base_model import PerImageCache, base_family, sampling_pipeline
from .diffusion import predicted_x0, training_target
from .idadapter_config import IDAdapterTrainConfig
from .idadapter_models import (Components, TrainableIDAdapter, adapter_config, clip_vision_features, generate_image,
                               load_components)
from .prompts import PromptEncoder
from .task import step_generator


class PhotoPrefetcher:
    """Loads the photos the next step needs in worker threads while this step runs (decoding is the host's work
    for every photo the cache does not hold: about 0.27 s for a batch's 20 photos of 1024² JPEG on one core).

    ``next_step(loads)`` starts ``{key: load}`` for the next step and makes the previous call's loads this step's;
    ``get(key, load)`` takes this step's result for ``key``, or loads it now if it was not started. A load is a pure
    function of its photo, so whichever way a photo arrives it is the same data (a resumed run stays exact). No
    threads (0): every load runs when it is asked for. The threads end when the prefetcher is collected."""

    def __init__(self, threads: int):
        # one intra-op thread each: a loader thread running torch's ops on its own OpenMP team of every core's threads
        # slowed the training thread's steps by a third on 2 cores, even between loads. (torch keeps one default for
        # threads started later, which then begin with 1 too; the trainer starts none that compute.)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="photo-loader", initializer=torch.set_num_threads,
                                       initargs=(1,)) if threads else None
        self.started: dict = {}
        self.ready: dict = {}

    def next_step(self, loads: dict) -> None:
        for future in self.ready.values():  # what this step did not ask for is not needed
            future.cancel()
        self.ready = self.started
        self.started = {key: self.pool.submit(load) for key, load in loads.items()} if self.pool else {}

    def get(self, key, load):
        future = self.ready.pop(key, None)
        return load() if future is None else future.result()


class IDAdapterTask:
    def __init__(self, config: IDAdapterTrainConfig, components: Components | None = None, log=print):
        self.config = config
        self.log = log
        if components is None:
            components, data_dir, heldout_dir = load_components(config)
        else:
            data_dir, heldout_dir = config.dataset, config.heldout_dataset
        self.c = components
        unet = components.unet
        self.family = base_family(unet)
        self.prompts = PromptEncoder(self.family, components.tokenizers, components.text_encoders, config.identifier,
                                     config.resolution)
        self.data_dir = data_dir
        cache_dir = config.cache_dir or os.path.join(config.output_dir, "cache")
        identities, self.report = dataset.scan_dataset(data_dir, components.analyzer, cache_dir, log=log)
        self.identities = self.enough_photos(identities, log)
        self.heldout = []
        if heldout_dir:
            self.heldout, _ = dataset.scan_dataset(heldout_dir, components.analyzer, os.path.join(cache_dir, "heldout"),
                                                   log=lambda text: log(f"held-out {text}"))
        self.vision_size = components.clip_vision.config.image_size
        adapter_cfg = adapter_config(config, unet, components.clip_vision)
        for key, encoder in zip(self.prompts.keys, components.text_encoders):
            width = encoder.get_input_embeddings().embedding_dim
            if width != adapter_cfg.text_dims[key]:
                raise ConfigError(f"the base's text encoder {key!r} is {width} wide; a {self.family} base has "
                                  f"{adapter_cfg.text_dims[key]}")
        torch.manual_seed(config.seed)
        self.adapter = ida.IDAdapter(adapter_cfg)
        for module in (*components.text_encoders, components.vae, unet, components.clip_vision, components.arcface):
            module.requires_grad_(False).eval()
        self.kv_params = {}
        for name, block in diffusers_binding.transformer_blocks(unet).items():
            for proj in ("to_k", "to_v"):
                weight = getattr(block.attn2, proj).weight
                weight.requires_grad_(True)
                self.kv_params[(name, proj)] = weight
        self.base_kv = {key: w.detach().float().cpu().clone() for key, w in self.kv_params.items()}
        diffusers_binding.attach(unet, self.adapter)
        unet.train()
        # in place (Module.compile): parameter names, and so checkpoints and the export, stay the same
        for part in config.compiled_parts():
            self.compiled_module(part).compile(backend=config.compile_backend)
        self.trainable = TrainableIDAdapter(unet, self.adapter)
        self.prefetcher = PhotoPrefetcher(config.prefetch_threads)  # its threads start with its first loads
        self.gate_rates = face_gate.GateOpenRates(components.noise_scheduler.config.num_train_timesteps,
                                                  window=config.log_every * config.gradient_accumulation_steps)

    def compiled_module(self, part: str) -> nn.Module:
        """The module a --compile part names."""
        return {"unet": self.c.unet, "vae_decoder": self.c.vae.decoder, "arcface": self.c.arcface}[part]

    def enough_photos(self, identities: list, log) -> list:
        """The identities with at least --min_images photos, and a line saying how many have N or fewer."""
        n = self.config.num_images
        least = self.config.min_images or n + 1
        few = [identity for identity in identities if len(identity.images) <= n]
        kept = [identity for identity in identities if len(identity.images) >= least]
        if few:
            left_out = len(identities) - len(kept)
            log(f"{len(few)} of {len(identities)} identities have {n} photos or fewer (N = --num_images {n}): "
                + (f"{left_out} with fewer than --min_images {least} left out" if left_out else "none left out")
                + ("; the others' references are their other photos, filled up to N by augmentation"
                   if len(kept) > len(identities) - len(few) else ""))
        if not kept:
            raise dataset.DatasetError(f"no identity has --min_images {least} photos: add photos, or lower "
                                       f"--min_images (fewer than N + 1 = {n + 1} photos: the references are filled "
                                       "up by augmentation)")
        return kept

    # ---- the task interface used by training.loop

    def param_groups(self) -> list[dict]:
        kv_lr = self.config.kv_learning_rate or self.config.learning_rate
        return [{"params": list(self.adapter.parameters())},
                {"params": list(self.kv_params.values()), "lr": kv_lr}]

    def setup(self, accelerator):
        self.accelerator = accelerator
        self.device = accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        # a VAE that overflows in fp16 (SDXL's, config force_upcast) stays in fp32 for fp16 runs
        upcast = self.weight_dtype == torch.float16 and getattr(self.c.vae.config, "force_upcast", False)
        self.vae_dtype = torch.float32 if upcast else self.weight_dtype
        for module in (*self.c.text_encoders, self.c.clip_vision, self.c.arcface):
            module.to(self.device, self.weight_dtype)
        # torch's own cast: diffusers' ModelMixin.to warns about "modules that should be kept in float32" on every
        # cast with a dtype, even when there are none (diffusers 0.42), and the VAE has none
        nn.Module.to(self.c.vae, self.device, self.vae_dtype)
        self.cache = PerImageCache(self.config.cache_mb)
        self.trainable.to(self.device)
        if self.config.channels_last:
            for module in (self.c.unet, self.c.vae, self.c.arcface):
                module.to(memory_format=torch.channels_last)
        if self.config.gradient_checkpointing:
            self.c.unet.enable_gradient_checkpointing()
            self.c.vae.enable_gradient_checkpointing()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        state.update({f"kv.{name}.{proj}": w.detach() for (name, proj), w in self.kv_params.items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.adapter.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("adapter.")})
        with torch.no_grad():
            for (name, proj), w in self.kv_params.items():
                w.copy_(state[f"kv.{name}.{proj}"])

    def export(self, path: str) -> None:
        deltas = {}
        for (name, proj), w in self.kv_params.items():
            deltas.setdefault(name, {})[proj] = w.detach().float().cpu() - self.base_kv[(name, proj)]
        # the recognizer that made the dataset's f_a vectors: the nodes refuse face embeds of another one
        recognizer = insightface_backend.recognizer_fingerprint(self.c.analyzer)
        ida.save_idadapter(ida.IDAdapterWeights(self.adapter, deltas, recognizer), path)

    # ---- one step

    def _generator(self, step: int, salt: int) -> torch.Generator:
        return step_generator(self.config.seed, step, salt, self._rank()[0])

    # ---- the frozen models' per-image outputs (through the cache)

    def targets(self, images: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per target photo: VAE posterior moments [B, 2C, h, w], landmarks [B, 5, 2] and face box [B, 4] at
        training size, and the ArcFace feature norm of its aligned face [B] (the norm gate's reference)."""
        found = [self._target(image) for image in images]
        return tuple(torch.stack([f[i] for f in found]) for i in range(4))

    def fill_cache(self, images: list) -> None:
        """Computes the frozen outputs of ``images`` that are not cached yet, as the first epoch would."""
        for image in images:
            self._target(image)
            self._reference_features(image)

    def _target(self, image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        @torch.no_grad()
        def compute():
            rgb, landmarks = self.prefetcher.get(("target", image.path), lambda: self.load_target(image))
            pixels = (rgb[None] * 2 - 1).to(self.device, self.vae_dtype)
            moments = self.c.vae.encode(pixels).latent_dist.parameters
            face = align_faces(pixels.float(), landmarks[None])
            norm = self.c.arcface(face.to(self.weight_dtype)).float().norm(dim=-1)
            return moments[0].cpu(), landmarks, dataset.square_box(image, self.config.resolution), norm[0].cpu()

        return self.cache.get(("target", image.path), compute)

    def load_target(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        return dataset.load_square(image, self.config.resolution)

    def _clip_vision(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return clip_vision_features(self.c.clip_vision, images, self.device, self.weight_dtype)

    def reference_pixels(self, image) -> torch.Tensor:
        """What CLIP vision sees of a reference photo, [3, S, S] 0..1: the crop MFF Embed makes of it."""
        return self.prefetcher.get(("reference", image.path), lambda: self.load_reference(image))

    def load_reference(self, image) -> torch.Tensor:
        return ida.reference_crop(dataset.load_rgb_tensor(image.path), image.box, self.adapter.config.face_crop_margin,
                                  self.vision_size)

    def examples(self, step: int) -> list[dict]:
        """This process's examples of ``step`` (a pure function of seed, step and process)."""
        cfg = self.config
        rank, processes = self._rank()
        return dataset.sample_batch(self.identities, cfg.batch_size, cfg.num_images, step, cfg.seed, rank, processes,
                                    include_target=cfg.references_include_target)

    def prefetch(self, step: int) -> None:
        """Starts loading the photos of ``step``'s batch that it will load: targets and references the cache does
        not hold, and the references that are augmented every step (identities with fewer than N photos)."""
        loads = {}
        for ex in self.examples(step):
            target = ex["target"]
            if ("target", target.path) not in self.cache.entries:
                loads[("target", target.path)] = lambda image=target: self.load_target(image)
            augmented = len(ex["references"]) < self.config.num_images
            for image in ex["references"]:
                if augmented or ("reference", image.path) not in self.cache.entries:
                    loads[("reference", image.path)] = lambda image=image: self.load_reference(image)
        self.prefetcher.next_step(loads)

    def _reference_features(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        @torch.no_grad()
        def compute():
            patches, cls = self._clip_vision(self.reference_pixels(image)[None])
            return patches[0].cpu(), cls[0].cpu()

        return self.cache.get(("reference", image.path), compute)

    def encode_references(self, examples) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """E_r [B, M, D] and E_c {key: [B, dim]} for a batch of examples (grad flows into the adapter).

        References of an identity with at least N images are plain photos: their CLIP features come from the
        cache. Fewer are augmented up to N with per-step randomness, so those run CLIP vision every step (one
        call for the batch)."""
        n = self.config.num_images
        features: list = [None] * len(examples)
        augmented = [i for i, ex in enumerate(examples) if len(ex["references"]) < n]
        if augmented:
            images = [torch.stack([self.reference_pixels(im) for im in examples[i]["references"]]) for i in augmented]
            patches, cls = self._clip_vision(torch.cat([ida.fill_references(im, n, examples[i]["augment_seed"])
                                                        for i, im in zip(augmented, images)]))
            for j, i in enumerate(augmented):
                features[i] = (patches[j * n:(j + 1) * n], cls[j * n:(j + 1) * n])
        for i, ex in enumerate(examples):
            if features[i] is None:
                found = [self._reference_features(im) for im in ex["references"]]
                features[i] = tuple(self.to_device(torch.stack([f[k] for f in found])) for k in range(2))
        patches = torch.stack([f[0] for f in features]).float()
        classes = torch.stack([f[1] for f in features]).float().mean(1)
        arcface = self.to_device(torch.stack([ida.mean_identity_vector(torch.stack([im.embedding for im in ex["references"]]))
                                              for ex in examples]))
        return self.adapter.encode(patches, arcface, classes) + (arcface,)

    def _rank(self) -> tuple[int, int]:
        """(this process's index, number of processes)."""
        accelerator = getattr(self, "accelerator", None)
        return (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)

    def log_examples(self, step: int, examples: list[dict]) -> None:
        """One JSON line per micro-step in <output_dir>/examples/rank-<rank>.jsonl (a resumed run appends)."""
        rank, _ = self._rank()
        folder = os.path.join(self.config.output_dir, "examples")
        os.makedirs(folder, exist_ok=True)
        rel = lambda image: os.path.relpath(image.path, self.data_dir)  # noqa: E731
        line = {"step": step, "rank": rank, "examples": [
            {"identity": ex["identity"].name, "target": rel(ex["target"]), "references": [rel(r) for r in ex["references"]]}
            for ex in examples]}
        with open(os.path.join(folder, f"rank-{rank}.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def loss(self, model, step: int):
        cfg = self.config
        examples = self.examples(step)
        self.prefetch(step + 1)
        if cfg.log_examples:
            self.log_examples(step, examples)
        gen = self._generator(step, 0)
        keep_image = torch.rand(len(examples), generator=gen) >= cfg.image_dropout  # stays on the CPU (host-side rows)
        keep_text = torch.rand(len(examples), generator=gen) >= cfg.text_dropout
        with record_function("ida.targets"):
            moments, landmarks, boxes, reference_norms = self.targets([ex["target"] for ex in examples])
        with record_function("ida.references"):
            e_r, e_c, f_a = self.encode_references(examples)
        captions = [self.prompts.prompt(ex["target"].caption, ex["identity"].class_noun) if keep_text[i] else ""
                    for i, ex in enumerate(examples)]
        with record_function("ida.text"):
            text, added = self.prompts(captions, e_c)

        scheduler = self.c.noise_scheduler
        # every draw is made on the host from the step's generator (a resumed run draws the same) and copied over
        posterior = DiagonalGaussianDistribution(self.to_device(moments))
        draw = torch.randn(posterior.mean.shape, generator=gen, dtype=posterior.mean.dtype)
        latents = (posterior.mean + posterior.std * self.to_device(draw)).float() * self.c.vae.config.scaling_factor
        noise = self.to_device(torch.randn(latents.shape, generator=gen))
        host_timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(examples),), generator=gen)
        timesteps = self.to_device(host_timesteps)
        noisy = self.in_layout(scheduler.add_noise(latents, noise, timesteps))
        row_mask = self.to_device(keep_image.float()[:, None, None])
        with record_function("ida.unet"):
            prediction = model(noisy, timesteps, text, e_r, row_mask, added).float()
        loss_sd = F.mse_loss(prediction, training_target(scheduler, latents, noise, timesteps))
        logs = {"loss_sd": loss_sd.detach()}
        loss = loss_sd
        if cfg.id_loss_weight > 0 and bool(keep_image.any()):
            with record_function("ida.identity_loss"):
                loss_id, gate = self.identity_loss(noisy, prediction, timesteps, landmarks, boxes, reference_norms,
                                                   f_a, keep_image)
            loss = loss + cfg.id_loss_weight * loss_id
            logs.update(loss_id=loss_id.detach(), id_gate=gate.float().mean(),
                        **self.gate_rates.add(gate, host_timesteps[keep_image]))
        logs["loss"] = loss.detach()
        return loss, logs

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host data on the training device, without making the host wait for the accelerator."""
        return host_to_device(tensor, self.device)

    def in_layout(self, images: torch.Tensor) -> torch.Tensor:
        """A model input [B, C, H, W] in the models' memory layout (--channels_last)."""
        return images.contiguous(memory_format=torch.channels_last) if self.config.channels_last else images

    def identity_loss(self, noisy, prediction, timesteps, landmarks, boxes, reference_norms, f_a, keep_image):
        """The gated identity loss over the rows that keep their image condition, and the gate [rows] bool."""
        rows = keep_image.nonzero().flatten()
        reference_norms = self.to_device(reference_norms[rows])
        # on the host: windows are placed, alignments solved and the detector run there
        landmarks, boxes = landmarks[rows], boxes[rows]
        rows = self.to_device(rows)
        x0 = predicted_x0(self.c.noise_scheduler, noisy[rows], prediction[rows], timesteps[rows])
        x0 = x0 / self.c.vae.config.scaling_factor
        # x0_hat estimates the target image: all of it, or the window around the face (--id_decode)
        faces, decoded, corners = id_decode.decode_faces(self.c.vae, self.in_layout(x0.to(self.vae_dtype)), landmarks,
                                                         self.config.id_decode)
        features = self.c.arcface(self.in_layout(faces.to(self.weight_dtype))).float()
        if self.config.id_gate == "detector":
            framed = id_decode.in_frame(decoded, corners, self.config.resolution)
            gate = face_gate.detector_gate(self.c.analyzer, framed, boxes, self.config.id_gate_iou).to(features.device)
        else:
            gate = face_gate.norm_gate(features, reference_norms, self.config.id_gate_ratio)
        per_example = 1 - F.cosine_similarity(features, f_a[rows], dim=-1)
        return (per_example * gate).mean(), gate

    # ---- evaluation and validation

    def heldout_check(self) -> tuple[float, float] | None:
        """Held-out denoising loss with each identity's own references and with another identity's: an adapter that
        learned identity makes the first clearly lower (None without a held-out set, or with a single identity)."""
        if len(self.heldout) < 2:
            return None
        was_training = self.trainable.training
        self.trainable.eval()
        try:
            return self.denoising_loss(self.heldout), self.denoising_loss(self.heldout, shuffle=True)
        finally:
            self.trainable.train(was_training)

    @staticmethod
    def heldout_line(before, after, when: str) -> str:
        return (f"denoising loss with the right identity {after[0]:.4f} vs another's {after[1]:.4f} "
                f"({100 * (1 - after[0] / after[1]):.1f} % lower); {when}: {before[0]:.4f} vs {before[1]:.4f}")

    comfyui_folder = "idadapter"  # ComfyUI/models/<this>/, where Load IDAdapter lists files

    def describe_export(self) -> str:
        if self.config.preset == "tiny":
            return "IDAdapter weights for the tiny test UNet only (a real base model gives weights for images)"
        return f"IDAdapter weights for {self.family} base models, for Load IDAdapter"

    @torch.no_grad()
    def denoising_loss(self, identities, shuffle: bool = False, seed: int = 123, repeats: int = 4,
                       min_timestep: int = 0) -> float:
        """Mean held-out L_SD over every image of ``identities`` at fixed noise and timesteps >= ``min_timestep``,
        conditioned on its own identity's references (or, with ``shuffle``, on the next identity's)."""
        model = self.trainable
        total, count = 0.0, 0
        for idx, identity in enumerate(identities):
            source = identities[(idx + 1) % len(identities)] if shuffle else identity
            for j, image in enumerate(identity.images):
                # the own identity's references leave the image out, as in training
                others = [im for im in source.images if im.path != image.path] or [image]
                refs = others[: self.config.num_images]
                example = {"identity": source, "target": image, "references": refs, "augment_seed": seed + j}
                e_r, e_c, _ = self.encode_references([example])
                moments = self.targets([image])[0].to(self.device)
                latents = DiagonalGaussianDistribution(moments).mean.float() * self.c.vae.config.scaling_factor
                text, added = self.prompts([self.prompts.prompt(image.caption, source.class_noun)], e_c)
                gen = torch.Generator().manual_seed(seed * 7919 + idx * 101 + j)
                draws = [(torch.randn(latents.shape, generator=gen),
                          torch.randint(min_timestep, self.c.noise_scheduler.config.num_train_timesteps, (1,),
                                        generator=gen)) for _ in range(repeats)]
                noise = torch.cat([n for n, _ in draws]).to(self.device)  # the repeats in one batch
                t = torch.cat([t for _, t in draws]).to(self.device)
                latents = latents.expand(repeats, -1, -1, -1)
                noisy = self.c.noise_scheduler.add_noise(latents, noise, t)
                added = None if added is None else {k: v.expand(repeats, -1) for k, v in added.items()}
                pred = model(noisy, t, text.expand(repeats, -1, -1), e_r.expand(repeats, -1, -1), None, added).float()
                error = F.mse_loss(pred, training_target(self.c.noise_scheduler, latents, noise, t), reduction="none")
                total += error.mean(dim=(1, 2, 3)).sum().item()
                count += repeats
        return total / count

    @torch.no_grad()
    def validate(self, model, step: int):
        """Images from the fixed validation prompts for the first identity (a held-out face if you keep one
        identity out of training), with CFG; the adapter runs on the conditional half only."""
        unet = self.accelerator.unwrap_model(model).unet
        pipe = sampling_pipeline(self.c, unet, sdxl=self.family == "sdxl")
        identity = self.identities[0]
        example = {"identity": identity, "target": identity.images[0], "references": identity.images[:self.config.num_images],
                   "augment_seed": 0}
        was_training = unet.training
        unet.eval()
        try:
            e_r, e_c, _ = self.encode_references([example])
            return [generate_image(pipe, self.prompts, e_r, e_c, self.prompts.prompt(prompt, identity.class_noun),
                                   steps=self.config.validation_steps, guidance_scale=5.0,
                                   resolution=self.config.resolution, seed=i, dtype=self.weight_dtype)
                    for i, prompt in enumerate(self.config.validation_prompts)]
        finally:
            unet.train(was_training)
