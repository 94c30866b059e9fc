"""The AdaFace trainer's options (training/train_adaface.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..nodes.errors import ConfigError
from .options import TrainConfig, is_class_noun, mask_suffix_problems

# the composition stage's default pool of compositional suffixes (the paper's "backgrounds, additional objects,
# dresses, image styles and lighting conditions"); each is appended to --distill_prompt after ", "
DEFAULT_COMPOSITION_PROMPTS = [
    "in a garden", "on a beach at sunset", "in a busy city street", "in a snowy forest",
    "holding a cup of coffee", "playing the guitar", "wearing a red hat", "wearing a business suit",
    "oil painting", "pencil sketch", "under neon lights", "in soft morning light",
]
# the options the paper sets differently for stage 2 (Prodigy d_coef 0.5, batch 3, 120k iterations, no expansion):
# the composition stage hints at them when a run keeps the face stage's defaults
COMPOSITION_STAGE_SETTINGS = {"prodigy_d_coef": 0.5, "batch_size": 3, "max_steps": 120_000, "expand_on_plateau": False}
STAGES = ("face", "composition")


@dataclass
class AdaFaceTrainConfig(TrainConfig):
    """AdaFace's face distillation (the paper's stage 1) with dynamic model expansion, or with ``--stage
    composition`` its composition distillation (stage 2)."""

    trainer: ClassVar[str] = "adaface"
    title: ClassVar[str] = "AdaFace"

    # the K/V multipliers grow during a run and are read back from a checkpoint's shapes; these decide the rest
    architecture_options: ClassVar[tuple[str, ...]] = ("preset", "inverter_init", "optimizer")
    path_options: ClassVar[tuple[str, ...]] = (
        "base_model", "arc2face", "inverter_init", "insightface_pack", "dataset", "heldout_dataset")
    required_inputs: ClassVar[tuple[str, ...]] = ("base_model", "arc2face", "insightface_pack", "dataset")
    presets: ClassVar[dict[str, dict]] = {
        "tiny": dict(
            resolution=32, batch_size=2, gradient_accumulation_steps=1, max_steps=60, optimizer="adamw",
            learning_rate=1e-3, distill_steps=2, expand_on_plateau=False, expand_at_steps=[30],
            expand_factors=["2:0-1"], checkpoint_every=20, validation_every=60, validation_steps=3, log_every=5,
            validation_prompts=["a photo of z"],
        ),
    }

    # --preset tiny --stage composition: a step costs about twice a face-stage one, so half as many
    tiny_composition: ClassVar[dict] = dict(max_steps=30, expand_at_steps=[15], checkpoint_every=15,
                                            validation_every=30)

    @classmethod
    def preset_values(cls, given: dict) -> dict:
        values = super().preset_values(given)
        if given.get("preset") == "tiny" and given.get("stage") == "composition":
            values.update(cls.tiny_composition)
        return values

    # inputs
    base_model: str = ""  # the student's SD1.5 (text encoder and UNet, frozen): diffusers folder or single file
    arc2face: str = ""  # the teacher: FoivosPar/Arc2Face's folder, holding arc2face/ (UNet) and encoder/ (ID encoder)
    # where the inverter starts: an adaface/1 file (e.g. an earlier run's export); default the base's text encoder,
    # which is CLIP ViT-L/14's, as in the paper
    inverter_init: str = ""
    insightface_pack: str = ""  # detector + ArcFace .onnx (antelopev2 with Arc2Face's arcface.onnx, as Arc2Face)
    # face photos in identity folders (docs/training.md "Training data"); only their ArcFace vectors are used
    dataset: str = ""
    output_dir: str = "runs/adaface"
    # face: the paper's stage 1 (face distillation); composition: its stage 2 (composition distillation, usually
    # from a face-stage export given as --inverter_init; set --prodigy_d_coef 0.5 --batch_size 3 --max_steps 120000
    # --expand_on_plateau false for the paper's stage-2 settings)
    stage: str = "face"
    # the paper's settings (stage 1: face distillation)
    resolution: int = 512
    batch_size: int = 4
    gradient_accumulation_steps: int = 2
    max_steps: int = 240_000
    optimizer: str = "auto"  # auto (prodigy when prodigyopt is installed, else adamw) | prodigy | adamw
    prodigy_d_coef: float = 2.0
    learning_rate: float = 2e-6  # AdamW's (the official configs' base_lr); Prodigy finds its own step size
    max_grad_norm: float = 0.5  # the official configs' gradient clip
    # multi-timestep distillation: the student imitates the teacher on this many consecutive denoising steps of
    # one initial noise (the first at a timestep drawn from the top distill_start of the schedule)
    distill_steps: int = 3
    distill_start: float = 0.2
    # the share of identities drawn as random unit Gaussian vectors instead of real faces (the paper's F_rand)
    random_face_ratio: float = 0.5
    distill_prompt: str = "a photo of z"  # the student's prompt; the placeholder becomes the 16 tokens
    placeholder: str = "z"
    # dynamic model expansion: each expansion multiplies the K/V copies of some inverter layers, "factor:layers"
    # ("4:0-11", "2:0-2": the paper's final (8, 8, 8, 4, ..., 4)), in order, when the loss plateaus and/or at
    # given steps
    expand_factors: list[str] = field(default_factory=lambda: ["4:0-11", "2:0-2"])
    expand_on_plateau: bool = True
    plateau_patience: int = 5000  # optimiser steps without a relative improvement of plateau_threshold
    plateau_threshold: float = 0.01
    expand_at_steps: list[int] = field(default_factory=list)
    expand_noise: float = 0.1  # std of the noise on the new copies, relative to each weight's std
    # composition distillation (--stage composition): per photo one suffix from this pool makes the compositional
    # prompts (--distill_prompt + ", " + suffix); the class prompts put --class_word where the placeholder is
    composition_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_COMPOSITION_PROMPTS))
    class_word: str = "person"
    # the paper gives no loss weights: both parts count equally (our choice)
    delta_loss_weight: float = 1.0
    face_preserving_weight: float = 1.0
    # the noisy photo's timestep is drawn uniformly from the bottom this fraction of the schedule: noisy enough
    # for the prompts to change the image, clean enough for its face to stay where the face mask says
    composition_timestep_max: float = 0.6
    # in the composition stage every n-th step is a face-distillation step instead, its loss weighted: what keeps the
    # identity while composition is learned (the official configs' unet_distill_iter_gap 2, unet_distill_weight 8;
    # 0 = none)
    face_distill_every: int = 2
    face_distill_weight: float = 8.0
    # a photo's face mask is the file <stem><mask_suffix> next to it (white = face); without one, its face box.
    # Such files are never taken for photos
    mask_suffix: str = "_mask.png"
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of z", "z in a garden, oil painting"])
    export_name: str = "adaface.safetensors"
    bundle_encoder: bool = True  # write the Arc2Face ID encoder into the export: one file for Load AdaFace
    synthetic_identities: int = 6
    synthetic_images: int = 3

    def __post_init__(self):
        if self.optimizer == "auto":  # settled once, so the saved options and a resume agree on it
            import importlib.util

            self.optimizer = "prodigy" if importlib.util.find_spec("prodigyopt") else "adamw"

    def method_problems(self) -> list[str]:
        from ..nodes.arch.adaface import check_placeholder
        from .adaface_expansion import parse_expansion

        problems = []
        if self.resolution % 8 or self.resolution < 32:
            problems.append(f"--resolution must be a multiple of 8 and at least 32, got {self.resolution}")
        if self.optimizer not in ("prodigy", "adamw"):
            problems.append(f"--optimizer must be auto, prodigy or adamw, got {self.optimizer!r}")
        elif self.optimizer == "prodigy":
            import importlib.util

            if not importlib.util.find_spec("prodigyopt"):
                problems.append("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt (or use "
                                "--optimizer adamw)")
        for name in ("distill_steps", "plateau_patience", "synthetic_images"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("prodigy_d_coef",):
            if getattr(self, name) <= 0:
                problems.append(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("distill_start",):
            if not 0.0 < getattr(self, name) <= 1.0:
                problems.append(f"--{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("random_face_ratio",):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("plateau_threshold", "expand_noise"):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if self.synthetic_identities < 2:
            problems.append(f"--synthetic_identities must be at least 2, got {self.synthetic_identities}")
        try:
            check_placeholder(self.placeholder)
        except ConfigError as exc:
            problems.append(f"--placeholder: {exc}")
        for text in self.expand_factors:
            try:
                parse_expansion(text)
            except ConfigError as exc:
                problems.append(f"--expand_factors: {exc}")
        if any(step < 1 for step in self.expand_at_steps) or sorted(set(self.expand_at_steps)) != self.expand_at_steps:
            problems.append(f"--expand_at_steps must be increasing step numbers of 1 or more, got {self.expand_at_steps}")
        if len(self.expand_at_steps) > len(self.expand_factors):
            problems.append(f"--expand_at_steps names {len(self.expand_at_steps)} expansions, --expand_factors "
                            f"describes {len(self.expand_factors)}")
        problems.extend(self.composition_problems())
        return problems

    def composition_problems(self) -> list[str]:
        """The composition stage's options (checked in both stages: a resume may switch stage)."""
        from ..nodes.arch.adaface import expand_placeholder

        problems = []
        if self.stage not in STAGES:
            problems.append(f"--stage must be face or composition, got {self.stage!r}")
        if not (self.composition_prompts and all(p.strip() for p in self.composition_prompts)):
            problems.append("--composition_prompts must be one or more non-empty suffixes (e.g. \"in a garden\")")
        else:
            try:
                with_placeholder = [p for p in self.composition_prompts
                                    if expand_placeholder(p, self.placeholder, 1)[1]]
            except ConfigError:  # a bad --placeholder, reported above
                with_placeholder = []
            if with_placeholder:
                problems.append(f"--composition_prompts must not contain the placeholder {self.placeholder!r} (the "
                                f"subject is written once, by --distill_prompt): {with_placeholder[:3]}")
        if self.stage == "composition":
            try:
                found = expand_placeholder(self.distill_prompt, self.placeholder, 1)[1]
            except ConfigError:  # a bad --placeholder, reported above
                found = 1
            if not found:
                problems.append(f"--distill_prompt must contain the placeholder {self.placeholder!r} with --stage "
                                f"composition (the class prompts put --class_word there), got {self.distill_prompt!r}")
        if not is_class_noun(self.class_word):
            problems.append(f"--class_word must be a word of letters such as person, woman or man, got "
                            f"{self.class_word!r}")
        elif self.class_word.strip().lower() == self.placeholder.lower():
            problems.append(f"--class_word must differ from --placeholder, got {self.class_word!r} for both")
        for name in ("delta_loss_weight", "face_preserving_weight"):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if self.stage == "composition" and self.delta_loss_weight == 0 and self.face_preserving_weight == 0:
            problems.append("--delta_loss_weight and --face_preserving_weight are both 0: the composition stage "
                            "would train on nothing")
        if self.face_distill_every < 0 or self.face_distill_weight < 0:
            problems.append(f"--face_distill_every and --face_distill_weight must be 0 or more, got "
                            f"{self.face_distill_every} and {self.face_distill_weight}")
        if not 0.0 < self.composition_timestep_max <= 1.0:
            problems.append(f"--composition_timestep_max must be in (0, 1], got {self.composition_timestep_max}")
        problems.extend(mask_suffix_problems(self.mask_suffix))
        if self.stage == "composition" and self.gradient_checkpointing:
            problems.append("--gradient_checkpointing is not available with --stage composition (the UNet's "
                            "cross-attention runs with capturing processors that backward's recomputation would "
                            "not see): lower --batch_size or --resolution instead")
        return problems
