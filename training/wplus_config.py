"""The W+ adapter trainer's options (training/train_wplus.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

from .options import TrainConfig, mask_suffix_problems

# Stage I's neutral prompts (the paper trains the alignment on faces described only as faces; ours, in its spirit)
WPLUS_STAGE1_PROMPTS = [
    "a photo of a face", "a close-up photo of a face", "a portrait photo of a face", "a face",
    "a photo of a person's face", "a headshot of a face", "a cropped photo of a face", "a good photo of a face",
]
WPLUS_STAGES = (1, 2)
WPLUS_AUGMENTS = ("shuffle", "gaussian", "shuffle_gaussian", "direction")


@dataclass
class WPlusTrainConfig(TrainConfig):
    """The W+ adapter's stage I (aligning W+ with the UNet on aligned faces) or, with ``--stage 2``, its stage II
    (in-the-wild photos with captions, the mapping frozen, the disentanglement and regularisation losses)."""

    trainer: ClassVar[str] = "wplus"
    title: ClassVar[str] = "W+ adapter"

    architecture_options: ClassVar[tuple[str, ...]] = ("preset", "stage")
    path_options: ClassVar[tuple[str, ...]] = (
        "base_model", "e4e", "insightface_pack", "dataset", "heldout_dataset", "adapter_init")
    required_inputs: ClassVar[tuple[str, ...]] = ("base_model", "e4e", "insightface_pack", "dataset")
    presets: ClassVar[dict[str, dict]] = {
        "tiny": dict(
            resolution=64, batch_size=4, max_steps=150, learning_rate=1e-3, adam_weight_decay=0.0,
            checkpoint_every=50, validation_every=150, validation_steps=3, log_every=5,
            validation_prompts=["a photo of a face"],
        ),
    }

    # inputs
    base_model: str = ""  # SD1.5 (the official adapter's base): diffusers folder or single-file checkpoint
    e4e: str = ""  # the e4e encoder: the official e4e_ffhq_encode.pt or an e4e/1 .safetensors
    insightface_pack: str = ""  # detector (+ recognizer) .onnx: each photo's landmarks, for the FFHQ alignment
    # photos in identity folders (docs/training.md "Training data"); stage 2 also reads captions and masks
    dataset: str = ""
    # where the adapter starts: a wplus/1 file or an official wplus_adapter*.bin. Stage 2 needs stage I's (its
    # mapping is kept frozen); stage 1 starts from copies of the UNet's own to_q/to_k/to_v without it
    adapter_init: str = ""
    output_dir: str = "runs/wplus"
    stage: int = 1  # 1: alignment on FFHQ-aligned faces; 2: in-the-wild photos (paper §3.2 / §3.3)
    # the official scripts' settings (train_face.py / train_wild.py): batch 16 per GPU, AdamW 1e-4, weight decay 0.01
    resolution: int = 512
    batch_size: int = 16
    learning_rate: float = 1e-4
    adam_weight_decay: float = 0.01
    max_steps: int = 100_000  # the paper gives hours (24 + 96 on 8 V100s), not steps: our default
    # conditioning dropout for classifier-free guidance, three exclusive cases as the official dataset: the W+ code
    # alone (zeroed), the text alone (empty), both
    wplus_dropout: float = 0.05
    text_dropout: float = 0.05
    both_dropout: float = 0.05
    stage1_prompts: list[str] = field(default_factory=lambda: list(WPLUS_STAGE1_PROMPTS))
    # stage 2: loss = reconstruction + disentangle_weight x L_disen + preserve_weight x L_preserve (train_wild.sh's
    # 2.0 and 1.0; the paper says 1.5 and 1.0)
    disentangle_weight: float = 2.0
    preserve_weight: float = 1.0
    # the official preserve loss is unmasked (every pixel: the W+ branch's whole effect); true counts only the
    # pixels outside the face
    preserve_outside_face_only: bool = False
    # the augmented W+ of the disentanglement loss, one strategy drawn per step: another photo's code (shuffle), the
    # official Gaussian perturbation (gaussian), both (shuffle_gaussian), a step along one of --augment_directions
    augment: list[str] = field(default_factory=lambda: ["shuffle", "gaussian", "shuffle_gaussian"])
    augment_directions: list[str] = field(default_factory=list)  # InterFaceGAN .pt, latent-direction .npy
    direction_strength: float = 4.0  # a direction step is U(-s, s) x the direction (unit InterFaceGAN: a few units)
    # face masks: <stem><mask_suffix> beside a photo (white = face), else the FFHQ crop square of its landmarks; either
    # eroded and blurred by these kernel sizes at 512 px (the paper's 32 and 7), scaled with --resolution
    mask_suffix: str = "_mask.png"
    mask_erode: int = 32
    mask_blur: int = 7
    # CPU memory for the frozen models' per-photo outputs (VAE posterior, face mask), each computed once (W+ codes are
    # computed once per photo and kept on disk in the cache folder)
    cache_mb: int = 4096
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of a face", "a painting of a face"])
    validation_directions: list[str] = field(default_factory=list)  # each adds its -s and +s edits to validation
    validation_edit_strength: float = 3.0
    export_name: str = "wplus_adapter.safetensors"
    synthetic_identities: int = 6
    synthetic_images: int = 3
    tiny_base_steps: int = 120  # the tiny base UNet is first trained as a plain denoiser (a stand-in for SD)

    def method_problems(self) -> list[str]:
        problems = []
        if self.stage not in WPLUS_STAGES:
            problems.append(f"--stage must be 1 (aligned faces) or 2 (in-the-wild photos), got {self.stage}")
        if self.resolution % 8 or self.resolution < 32:
            problems.append(f"--resolution must be a multiple of 8 and at least 32, got {self.resolution}")
        rates = (self.wplus_dropout, self.text_dropout, self.both_dropout)
        if any(not 0.0 <= p <= 1.0 for p in rates) or sum(rates) >= 1.0:
            problems.append(f"--wplus_dropout, --text_dropout and --both_dropout must be in [0, 1] with a sum below 1 "
                            f"(they are exclusive cases), got {rates}")
        if not (self.stage1_prompts and all(p.strip() for p in self.stage1_prompts)):
            problems.append("--stage1_prompts must be one or more non-empty prompts")
        for name in ("disentangle_weight", "preserve_weight", "cache_mb", "mask_erode", "mask_blur",
                     "tiny_base_steps"):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("direction_strength", "validation_edit_strength"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name} must be positive, got {getattr(self, name)}")
        unknown = [a for a in self.augment if a not in WPLUS_AUGMENTS]
        if unknown or not self.augment:
            problems.append(f"--augment must name one or more of {', '.join(WPLUS_AUGMENTS)}, got {self.augment}")
        if "direction" in self.augment and not self.augment_directions:
            problems.append("--augment direction needs --augment_directions (InterFaceGAN .pt or latent-direction "
                            ".npy files), or leave direction out of --augment")
        for name in ("augment_directions", "validation_directions"):
            for path in getattr(self, name):
                if not os.path.isfile(path):
                    problems.append(f"--{name}: {path!r} is not a file")
        if self.adapter_init and os.path.abspath(self.adapter_init) == os.path.abspath(
                os.path.join(self.output_dir, self.export_name)):
            problems.append(f"--adapter_init {self.adapter_init!r} is the export this run would write over: give stage "
                            "II its own --output_dir (or another --export_name)")
        if self.stage == 2 and not self.adapter_init:
            problems.append("--stage 2 needs --adapter_init: stage I's export (its mapping network stays frozen), e.g. "
                            "runs/wplus/wplus_adapter.safetensors, or the official wplus_adapter_stage1.bin")
        problems.extend(mask_suffix_problems(self.mask_suffix))
        if self.synthetic_identities < 2 or self.synthetic_images < 1:
            problems.append(f"--synthetic_identities must be at least 2 and --synthetic_images at least 1, got "
                            f"{self.synthetic_identities} and {self.synthetic_images}")
        return problems
