"""AdaFace training, stage 1 of the paper (face distillation, with dynamic model expansion), as a task for
``training.loop``.

Teacher: Arc2Face (its ID encoder + its UNet, frozen), conditioned on "photo of a id person" with the face at "id".
Student: the prompt inverter (trained) -> the SD1.5 text encoder (frozen) with the 16 tokens where the prompt's
placeholder is (as AdaFace Encode places them) -> the SD1.5 UNet (frozen). Both UNets start from the same pure
noise at a timestep near the top of the schedule; the teacher then walks ``distill_steps`` DDIM steps down and the
student predicts the noise at every one of them: the loss is the mean MSE between the two predictions (the paper's
multi-timestep distillation, Eq. 2). Identities are real faces' ArcFace vectors and random unit Gaussian vectors.

With ``--stage composition``: the paper's stage 2, composition distillation (``AdaFaceTask.composition_batch`` and
``composition_loss_on``; the features in ``training.adaface_compos``, the losses in ``training.adaface_losses``).

Trainable: the inverter's transformer layers, final layer norm and hidden-state layer weights (its token and
position embeddings stay CLIP's, as in the official code). Dynamic model expansion multiplies the K/V copies of
chosen layers when the loss plateaus or at given steps (``training.adaface_expansion``); the loop grows the optimiser
and EMA state with them, and a resumed run grows the fresh inverter to the checkpoint's shapes first.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nodes.arch import adaface as ada
from ..nodes.errors import ConfigError
from . import adaface_expansion as expansion
from . import data as dataset
from .adaface_compos import (CompositionBatch, CompositionPrompts, capturing_cross_attention, end_token_index,
                             replaced_positions, subject_token_mass)
from .adaface_config import COMPOSITION_STAGE_SETTINGS, AdaFaceTrainConfig
from .adaface_losses import delta_loss_over, face_preserving_loss, mask_to_token_grid
from .adaface_models import AdaFaceModels, load_models
from .base_model import sampling_pipeline
from .diffusion import ddim_step
from .prompts import placed_tokens
from .task import step_generator

DELTA_TYPES = ("attn_out", "attn_map", "prompt_embeds")  # the compositional delta loss's feature types
EXPANSION_STATE = "expansion_state"  # loss EMA, best EMA, step of the last improvement, expansions done
LOSS_EMA_DECAY = 0.99


class TrainableInverter(nn.Module):
    """The inverter and its hidden-state layer weights: image-prompt embeddings [B, 16, D] -> tokens [B, 16, D]."""

    def __init__(self, inverter: ada.CLIPTextTransformer, hidden_state_layer_weights: torch.Tensor):
        super().__init__()
        self.inverter = inverter
        self.hidden_state_layer_weights = nn.Parameter(hidden_state_layer_weights.detach().float().clone())
        self.register_buffer("template", ada.inverter_template_ids(ada.NUM_ID_VECS), persistent=False)

    def forward(self, face_prompt: torch.Tensor) -> torch.Tensor:
        return ada.invert(self.inverter, face_prompt, self.template, self.hidden_state_layer_weights)


class AdaFaceTask:
    comfyui_folder = "adaface"  # ComfyUI/models/<this>/, where Load AdaFace lists files

    def __init__(self, config: AdaFaceTrainConfig, models: AdaFaceModels | None = None, log=print):
        self.config = config
        self.log = log
        if models is None:
            models, data_dir, heldout_dir = load_models(config)
        else:
            data_dir, heldout_dir = config.dataset, config.heldout_dataset
        self.m = models
        cache_dir = config.cache_dir or os.path.join(config.output_dir, "cache")
        identities, report = dataset.scan_dataset(data_dir, models.analyzer, cache_dir, log=log,
                                                  mask_suffix=config.mask_suffix)
        self.photos = [image for identity in identities for image in identity.images]
        self.real_faces = torch.stack([image.embedding for image in self.photos])
        self.heldout_faces = None
        if heldout_dir:
            heldout, _ = dataset.scan_dataset(heldout_dir, models.analyzer, os.path.join(cache_dir, "heldout"),
                                              log=lambda text: log(f"held-out {text}"),
                                              mask_suffix=config.mask_suffix)
            self.heldout_faces = torch.stack([identity.images[0].embedding for identity in heldout])

        inverter = copy.deepcopy(models.inverter).float()
        width = models.text_encoder.get_input_embeddings().embedding_dim
        if inverter.config.hidden_size != width or models.arc2face.config.hidden_size != width:
            raise ConfigError(f"the inverter is {inverter.config.hidden_size} wide and the Arc2Face encoder "
                              f"{models.arc2face.config.hidden_size}; the base's text encoder takes {width}")
        if inverter.config.vocab_size <= ada.END_TOKEN:
            raise ConfigError(f"the inverter's vocabulary has {inverter.config.vocab_size} tokens; it is CLIP ViT-L/14's "
                              f"({ada.END_TOKEN + 1}), whose ids its input template uses")
        inverter.text_model.embeddings.requires_grad_(False)  # CLIP's token and position embeddings stay
        self.trainable = TrainableInverter(inverter, models.hidden_state_layer_weights)
        for module in (models.text_encoder, models.unet, models.teacher_unet, models.arc2face, models.vae):
            module.requires_grad_(False).eval()

        tokenizer = models.tokenizer
        placeholder = tokenizer(config.placeholder, add_special_tokens=False).input_ids
        if len(placeholder) != 1:
            raise ConfigError(f"--placeholder {config.placeholder!r} is {len(placeholder)} tokens for the base's "
                              "tokenizer; use a one-token word such as z")
        self.placeholder_id = placeholder[0]
        self.prompt_ids = self._tokenize(config.distill_prompt)
        plain = ada.expand_placeholder(config.distill_prompt, config.placeholder, 1, word="person")[0]
        self.plain_prompt_ids = self._tokenize(plain)  # the baseline: the prompt with no identity
        self.expansion_state = torch.tensor([float("nan"), float("inf"), 0.0, 0.0], dtype=torch.float64)
        self.mask_problems: set[str] = set()  # mask files reported as unusable (each once)
        if config.stage == "composition":
            self.compos = self._composition_prompts()
            paper = " ".join(f"--{name} {value}" for name, value in COMPOSITION_STAGE_SETTINGS.items())
            here = ", ".join(f"--{name} {getattr(config, name)}" for name, value in COMPOSITION_STAGE_SETTINGS.items()
                             if getattr(config, name) != value)
            if here and not config.preset:  # the tiny preset's own values are deliberate
                log(f"note: the paper's stage-2 settings are {paper}; this run has {here}")

    def _tokenize(self, text: str) -> torch.Tensor:
        expanded, _ = ada.expand_placeholder(text, self.config.placeholder, ada.NUM_ID_VECS)
        return self._ids([expanded])

    def _ids(self, texts: list[str]) -> torch.Tensor:
        """Token ids [len(texts), 77], padded as the pipelines pad them."""
        return self.m.tokenizer(texts, padding="max_length", max_length=self.m.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids

    # ---- the task interface used by training.loop

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.trainable.parameters() if p.requires_grad]}]

    def setup(self, accelerator):
        self.accelerator = accelerator
        self.device = accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                                torch.float32)
        for module in (self.m.text_encoder, self.m.unet, self.m.teacher_unet, self.m.arc2face):
            nn.Module.to(module, self.device, self.weight_dtype)
        nn.Module.to(self.m.vae, self.device)
        self.trainable.to(self.device)
        if self.config.gradient_checkpointing:  # the UNet's activations are what the memory goes to (k steps)
            self.m.unet.enable_gradient_checkpointing()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {f"inverter.{k}": v for k, v in self.trainable.inverter.state_dict().items()
                 if not k.startswith("text_model.embeddings.")}  # frozen: they come from the starting weights
        state["hidden_state_layer_weights"] = self.trainable.hidden_state_layer_weights.detach()
        state[EXPANSION_STATE] = self.expansion_state
        return state

    def fit_to_state(self, state: dict[str, torch.Tensor]) -> None:
        """Grows the inverter to the K/V multipliers of a checkpoint written after an expansion."""
        cfg = self.trainable.inverter.config
        shapes = {k[len("inverter."):]: tuple(v.shape) for k, v in state.items() if k.startswith("inverter.")}
        multipliers = ada.kv_multipliers_from_shapes(shapes, "", cfg.hidden_size, cfg.num_layers, "the checkpoint")
        if multipliers != cfg.kv_multipliers:
            expansion.expand_to_multipliers(self.trainable.inverter, multipliers)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        inverter = {k[len("inverter."):]: v for k, v in state.items() if k.startswith("inverter.")}
        missing, unexpected = self.trainable.inverter.load_state_dict(inverter, strict=False)
        if unexpected or any(not k.startswith("text_model.embeddings.") for k in missing):
            raise ConfigError(f"the checkpoint's inverter does not fit this run's: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
        with torch.no_grad():
            self.trainable.hidden_state_layer_weights.copy_(state["hidden_state_layer_weights"])
        self.expansion_state = state[EXPANSION_STATE].to(torch.float64).clone()

    def pad_embeddings(self) -> torch.Tensor:
        """CLIP's embeddings of the empty prompt, positions included: what ``strength`` < 1 mixes towards."""
        embeddings = self.trainable.inverter.text_model.embeddings
        ids = ada.inverter_template_ids(0)
        ids[1:] = ada.END_TOKEN
        ids = ids.to(embeddings.token_embedding.weight.device)
        return (embeddings.token_embedding(ids) + embeddings.position_embedding.weight[:len(ids)]).detach()

    def export(self, path: str) -> None:
        cfg = self.config
        inverter = self.trainable.inverter
        arc2face = self.m.arc2face if cfg.bundle_encoder else None
        weights = ada.AdaFaceWeights(
            config=ada.AdaFaceConfig(copy.deepcopy(inverter.config),
                                     copy.deepcopy(arc2face.config) if arc2face is not None else None),
            inverter=inverter, hidden_state_layer_weights=self.trainable.hidden_state_layer_weights.detach(),
            pad_embeddings=self.pad_embeddings(), arc2face=arc2face)
        ada.save_adaface(weights, path, torch.float32 if cfg.preset == "tiny" else torch.float16)

    # ---- one step

    def _rank(self) -> tuple[int, int]:
        accelerator = getattr(self, "accelerator", None)
        return (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)

    def _generator(self, step: int, salt: int) -> torch.Generator:
        return step_generator(self.config.seed, step, salt, self._rank()[0])

    def sample_faces(self, count: int, gen: torch.Generator) -> torch.Tensor:
        """Unit ArcFace vectors [count, 512]: a real face's, or with probability --random_face_ratio a random one."""
        real = self.real_faces[torch.randint(len(self.real_faces), (count,), generator=gen)]
        random = F.normalize(torch.randn(count, ada.ARCFACE_DIM, generator=gen), dim=-1)
        use_random = torch.rand(count, generator=gen) < self.config.random_face_ratio
        return torch.where(use_random.unsqueeze(-1), random, real)

    def sample_timesteps(self, count: int, gen: torch.Generator) -> torch.Tensor:
        """[distill_steps, count] strictly decreasing per column: the first from the top --distill_start of the
        schedule, the others below it."""
        total = self.m.noise_scheduler.config.num_train_timesteps
        low = max(int(total * (1 - self.config.distill_start)), self.config.distill_steps - 1)
        first = torch.randint(low, total, (count,), generator=gen)
        columns = []
        for t in first.tolist():
            below = torch.randperm(t, generator=gen)[:self.config.distill_steps - 1].sort(descending=True).values
            columns.append(torch.cat([torch.tensor([t]), below]))
        return torch.stack(columns, dim=1)

    def student_context(self, tokens: torch.Tensor, prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The SD1.5 text encoder's output for the prompt with the tokens [B, 16, D] at its placeholders."""
        ids = (self.prompt_ids if prompt_ids is None else prompt_ids).expand(len(tokens), -1).to(self.device)
        with placed_tokens(self.m.text_encoder, ids, self.placeholder_id, tokens):
            return self.m.text_encoder(ids)[0]

    def distillation_loss(self, model, faces: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                          plain: bool = False) -> torch.Tensor:
        """Mean MSE between the student's and the teacher's predictions along the teacher's DDIM path; with
        ``plain`` the student gets the prompt without the identity (the baseline)."""
        faces, noise, timesteps = faces.to(self.device), noise.to(self.device), timesteps.to(self.device)
        with torch.no_grad():
            context = ada.arc2face_context(self.m.arc2face, faces.to(self.weight_dtype))
        if plain:
            student_context = self.m.text_encoder(self.plain_prompt_ids.expand(len(faces), -1).to(self.device))[0]
        else:
            tokens = model(context[:, ada.ID_START:ada.ID_START + ada.NUM_ID_VECS].float())
            student_context = self.student_context(tokens.to(self.weight_dtype))
        latents, loss = noise.to(self.weight_dtype), 0.0
        for i, t in enumerate(timesteps):
            with torch.no_grad():
                teacher = self.m.teacher_unet(latents, t, encoder_hidden_states=context).sample
            student = self.m.unet(latents, t, encoder_hidden_states=student_context).sample
            loss = loss + F.mse_loss(student.float(), teacher.float())
            if i + 1 < len(timesteps):
                with torch.no_grad():
                    latents = ddim_step(self.m.noise_scheduler, latents.float(), teacher.float(), t,
                                        timesteps[i + 1]).to(self.weight_dtype)
        return loss / len(timesteps)

    def _noise(self, count: int, gen: torch.Generator) -> torch.Tensor:
        side = self.config.resolution // 8
        return torch.randn(count, self.m.unet.config.in_channels, side, side, generator=gen)

    def loss(self, model, step: int):
        cfg = self.config
        distill_step = cfg.stage == "face" or (cfg.face_distill_every and step % cfg.face_distill_every == 0)
        if not distill_step:
            return self.composition_loss_on(model, self.composition_batch(step))
        gen = self._generator(step, 0)
        count = cfg.batch_size
        loss = self.distillation_loss(model, self.sample_faces(count, gen), self._noise(count, gen),
                                      self.sample_timesteps(count, gen))
        if cfg.stage == "face":
            return loss, {"loss": loss.detach()}
        weighted = cfg.face_distill_weight * loss  # the composition stage's interleaved identity-keeping step
        return weighted, {"loss": weighted.detach(), "face_distill_loss": loss.detach()}

    # ---- composition distillation (--stage composition)

    def _composition_prompts(self) -> "CompositionPrompts":
        """Every prompt of the composition stage, tokenized once: the subject's (16 placeholder copies), the class's
        (--class_word where the placeholder is) and where the subject is in each."""
        cfg, tokenizer = self.config, self.m.tokenizer
        single = cfg.distill_prompt.rstrip()
        texts = [single] + [f"{single}, {suffix.strip()}" for suffix in cfg.composition_prompts]
        subject = [ada.expand_placeholder(text, cfg.placeholder, ada.NUM_ID_VECS)[0] for text in texts]
        klass = [ada.expand_placeholder(text, cfg.placeholder, 1, word=cfg.class_word.strip())[0] for text in texts]
        limit = tokenizer.model_max_length
        for text, written in zip(texts * 2, subject + klass):
            length = len(tokenizer(written).input_ids)
            if length > limit:
                raise ConfigError(f"the composition prompt {text[:120]!r} is {length} tokens (the placeholder written "
                                  f"{ada.NUM_ID_VECS} times), over the text encoder's {limit}: shorten "
                                  "--distill_prompt or that --composition_prompts entry")
        subject_ids, class_ids = self._ids(subject), self._ids(klass)
        word = tokenizer(cfg.class_word.strip(), add_special_tokens=False).input_ids
        try:
            class_positions = replaced_positions(self._ids(texts), self.placeholder_id, class_ids, word)
        except ValueError as exc:
            raise ConfigError(f"--class_word {cfg.class_word!r}: its tokens cannot be found in the class prompts "
                              f"({exc})") from exc
        return CompositionPrompts(subject_ids, class_ids, subject_ids == self.placeholder_id, class_positions)

    def composition_batch(self, step: int) -> "CompositionBatch":
        """Step ``step``'s photos (from (seed, step, rank), as the face stage samples faces), each VAE-encoded at
        --resolution and noised at its own timestep from the bottom --composition_timestep_max of the schedule,
        with its face mask and one compositional suffix."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        cfg, gen = self.config, self._generator(step, 0)
        photos = [self.photos[i] for i in torch.randint(len(self.photos), (cfg.batch_size,), generator=gen).tolist()]
        suffixes = torch.randint(len(cfg.composition_prompts), (cfg.batch_size,), generator=gen)
        total = self.m.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, max(1, round(total * cfg.composition_timestep_max)), (cfg.batch_size,),
                                  generator=gen)
        pixels = torch.stack([dataset.load_square(photo, cfg.resolution)[0] for photo in photos])
        masks = []
        for photo in photos:
            mask, source = dataset.load_square_mask(photo, cfg.resolution, cfg.mask_suffix)
            if source.startswith("box:") and photo.path not in self.mask_problems:
                self.mask_problems.add(photo.path)
                self.log(f"{source[5:]}: its face box is used instead")
            masks.append(mask)
        with torch.no_grad():
            moments = self.m.vae.encode((pixels * 2 - 1).to(self.device, self.m.vae.dtype)).latent_dist.parameters
            latents = DiagonalGaussianDistribution(moments.float()).sample(generator=gen)
            latents = latents * self.m.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=gen).to(self.device)
            noisy = self.m.noise_scheduler.add_noise(latents, noise, timesteps.to(self.device))
        faces = torch.stack([photo.embedding for photo in photos])
        return CompositionBatch(faces, noisy, timesteps, suffixes, torch.stack(masks))

    def composition_loss_on(self, model, batch: "CompositionBatch"):
        """The composition stage's loss on one batch: --delta_loss_weight x the compositional delta loss over the
        cross-attention outputs, the subject's attention mass and the prompt embeddings + --face_preserving_weight x
        the elastic face-preserving loss averaged over the cross-attention layers. One UNet pass over the 4 x B
        rows (subject-single, subject-compos, class-single, class-compos), all from the same noisy latents."""
        cfg, prompts, count = self.config, self.compos, len(batch.faces)
        device, dtype = self.device, self.weight_dtype
        single, compos = torch.zeros(count, dtype=torch.long), batch.suffixes + 1  # prompt rows: 0 is the single one
        rows = torch.cat([single, compos])
        subject_ids, class_ids = prompts.subject_ids[rows], prompts.class_ids[rows]
        with torch.no_grad():
            face_context = ada.arc2face_context(self.m.arc2face, batch.faces.to(device, dtype))
            class_text = self.m.text_encoder(class_ids.to(device))[0]
        tokens = model(face_context[:, ada.ID_START:ada.ID_START + ada.NUM_ID_VECS].float()).to(dtype)
        subject_text = self.student_context(tokens.repeat(2, 1, 1), subject_ids)
        text = torch.cat([subject_text, class_text])  # [4B, 77, D]
        ids = torch.cat([subject_ids, class_ids])
        positions = torch.cat([prompts.subject_positions[rows], prompts.class_positions[rows]]).to(device)
        latents = batch.noisy.to(device, dtype)
        aspect = tuple(latents.shape[-2:])
        features, face_losses = {}, []
        with capturing_cross_attention(self.m.unet) as captured:
            self.m.unet(latents.repeat(4, 1, 1, 1), batch.timesteps.to(device).repeat(4), encoder_hidden_states=text)
            for name, layer in captured.items():
                outputs = layer.output.chunk(4)
                queries = layer.query.chunk(4)
                features[f"attn_out/{name}"] = outputs
                features[f"attn_map/{name}"] = subject_token_mass(layer.probs, positions).chunk(4)
                mask = mask_to_token_grid(batch.masks.to(device), queries[0].shape[1], aspect)
                face_losses.append(face_preserving_loss(queries[0], queries[1], outputs[0], outputs[1], mask))
            ends = end_token_index(ids, self.m.tokenizer.eos_token_id).to(device)
            features["prompt_embeds"] = text[torch.arange(len(text), device=device), ends].chunk(4)
            delta, per_name = delta_loss_over(features)
            face = torch.stack(face_losses).mean()
        loss = cfg.delta_loss_weight * delta + cfg.face_preserving_weight * face
        logs = {"loss": loss.detach(), "delta_loss": delta.detach(), "face_preserving_loss": face.detach()}
        for kind in DELTA_TYPES:
            logs[f"delta_{kind}"] = torch.stack([v for k, v in per_name.items() if k.split("/", 1)[0] == kind]).mean()
        return loss, logs

    # ---- dynamic model expansion

    def after_step(self, step: int, logs: dict):
        """Expands the inverter when the loss has plateaued or at --expand_at_steps; returns how the grown
        parameters grew (for the loop to grow their optimiser state), else None."""
        cfg = self.config
        ema, best, last_improved, done = self.expansion_state.tolist()
        done = int(done)
        loss = float(logs["loss"])
        ema = loss if ema != ema else LOSS_EMA_DECAY * ema + (1 - LOSS_EMA_DECAY) * loss  # ema != ema: not started
        if ema < best * (1 - cfg.plateau_threshold):
            best, last_improved = ema, step
        due = done < len(cfg.expand_factors) and (
            step in cfg.expand_at_steps or (cfg.expand_on_plateau and step - last_improved >= cfg.plateau_patience))
        grown = None
        if due:
            inverter = self.trainable.inverter
            factors = expansion.parse_expansion(cfg.expand_factors[done], inverter.config.num_layers)
            gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 7919 + step)
            grown = expansion.expand_kv(inverter, factors, cfg.expand_noise, gen)
            done += 1
            best, last_improved = float("inf"), step  # the grown model's loss starts a new plateau search
            self.log(f"step {step}: expanded the inverter's keys/values ({cfg.expand_factors[done - 1]}); "
                     f"K/V multipliers now {inverter.config.kv_multipliers}")
        self.expansion_state = torch.tensor([ema, best, last_improved, done], dtype=torch.float64)
        return grown

    # ---- evaluation and validation

    @torch.no_grad()
    def heldout_check(self) -> tuple[float, float] | None:
        """The distillation loss on held-out faces (plus two fixed random ones) at fixed noise and timesteps: with
        the inverter's tokens, and with a plain prompt ("person" for the placeholder) as the baseline."""
        if self.heldout_faces is None:
            return None
        gen = torch.Generator().manual_seed(123)
        faces = torch.cat([self.heldout_faces, F.normalize(torch.randn(2, ada.ARCFACE_DIM, generator=gen), dim=-1)])
        noise, timesteps = self._noise(len(faces), gen), self.sample_timesteps(len(faces), gen)
        was_training = self.trainable.training
        self.trainable.eval()
        try:
            return (self.distillation_loss(self.trainable, faces, noise, timesteps).item(),
                    self.distillation_loss(self.trainable, faces, noise, timesteps, plain=True).item())
        finally:
            self.trainable.train(was_training)

    def heldout_line(self, before, after, when: str) -> str:
        line = (f"distillation loss (student vs teacher) with the tokens {after[0]:.4f}, with a plain prompt "
                f"{after[1]:.4f}; {when}: {before[0]:.4f} and {before[1]:.4f}")
        if self.config.stage == "composition":  # this stage does not train on it: it watches the identity
            line += (" (composition stage: the identity is kept while the loss with the tokens stays well below the "
                     "plain prompt's)")
        return line

    def describe_export(self) -> str:
        multipliers = self.trainable.inverter.config.kv_multipliers
        bundled = " + the Arc2Face ID encoder" if self.config.bundle_encoder else ""
        if self.config.preset == "tiny":
            return f"AdaFace inverter (K/V multipliers {multipliers}){bundled} for the tiny test models only"
        return f"AdaFace inverter (K/V multipliers {multipliers}){bundled}, for Load AdaFace (SD1.5)"

    @torch.no_grad()
    def validate(self, model, step: int):
        """Images of the first held-out face (else a dataset face) for each validation prompt, with CFG."""
        from PIL import Image

        pipe = sampling_pipeline(self.m, self.m.unet)
        face = (self.heldout_faces if self.heldout_faces is not None else self.real_faces)[:1].to(self.device)
        context = ada.arc2face_context(self.m.arc2face, face.to(self.weight_dtype))
        tokens = self.accelerator.unwrap_model(model)(context[:, ada.ID_START:ada.ID_START + ada.NUM_ID_VECS].float())
        empty = self.m.tokenizer([""], padding="max_length", max_length=self.m.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids
        negative = self.m.text_encoder(empty.to(self.device))[0]
        images = []
        for i, prompt in enumerate(self.config.validation_prompts):
            text = self.student_context(tokens.to(self.weight_dtype), self._tokenize(prompt))
            with self.accelerator.autocast():  # the pipeline's latents take the text's dtype, the VAE stays float32
                out = pipe(prompt_embeds=text, negative_prompt_embeds=negative, num_inference_steps=self.config.validation_steps,
                           guidance_scale=5.0, height=self.config.resolution, width=self.config.resolution,
                           output_type="np", generator=torch.Generator().manual_seed(i))
            images.append(Image.fromarray((np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)))
        return images
