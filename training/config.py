"""Command-line options of the trainers and of the evaluation: a dataclass per command, presets, a CLI made from the
fields, and checks that turn a bad configuration into one clear message before anything heavy loads."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import ClassVar

from ..nodes.arch.idadapter import CONFIG_LIMITS, DEFAULT_IDENTIFIER, FACE_CROP_MARGIN_LIMIT, check_identifier
from ..nodes.errors import ConfigError, PackError
from .face_gate import GATES
from .id_decode import DECODES
from .model_folders import LAYOUT_CHECKS

__all__ = ["ConfigError", "IDAdapterEvalConfig", "IDAdapterTrainConfig", "TrainConfig", "parse_args"]

# diffusers.optimization.get_scheduler's names that need no option this trainer lacks ("piecewise_constant" needs
# step rules); listed here so that checking the options does not import diffusers (a test keeps them in sync)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

# IDAdapter trainer option -> the idadapter/1 config field it sets
ADAPTER_CONFIG_FIELDS = {"num_tokens": "num_tokens", "mff_width": "width", "mff_heads": "mff_heads",
                         "embed_dim": "embed_dim", "textual_hidden": "textual_hidden", "num_images": "num_images"}
# options that are expected to differ on a resume and are not reported
RESUME_QUIET = ("resume",)


@dataclass
class CommandOptions:
    """What the options of every command (the trainers, the evaluation) share: a preset, the output folder, the seed
    and the precision; the inputs a run without --preset must be given and the path options that must exist when
    given. ``validate()`` turns every problem found into one ConfigError before anything heavy loads."""

    # class-level: the path options that must exist when given, the presets (values a preset sets unless the command
    # line sets them too), the options a run without --preset must be given, and what the error calls the options
    path_options: ClassVar[tuple[str, ...]] = ()
    presets: ClassVar[dict[str, dict]] = {}
    required_inputs: ClassVar[tuple[str, ...]] = ()
    purpose: ClassVar[str] = "training"

    output_dir: str = "runs/train"
    mixed_precision: str = "no"  # no | fp16 | bf16
    seed: int = 0
    # --preset tiny: tiny random models and synthetic data, same code path
    preset: str = ""

    def validate(self) -> None:
        """Checks every option (fast: no model is loaded); one ConfigError lists every problem found."""
        problems = self.problems()
        if problems:
            raise ConfigError(f"invalid {self.purpose} configuration:\n  " + "\n  ".join(problems))

    def problems(self) -> list[str]:
        """Every problem of these options, as messages (a command's own checks after ``shared_problems()``)."""
        return self.shared_problems()

    def shared_problems(self) -> list[str]:
        problems = []
        if self.preset not in ("", *self.presets):
            problems.append(f"--preset must be {' or '.join(repr(p) for p in self.presets)} or absent, "
                            f"got {self.preset!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"--{name} must be a finite number, got {value}")
        if not 0 <= self.seed < 2**32:
            problems.append(f"--seed must be in [0, 2**32), got {self.seed}")
        if not self.output_dir:
            problems.append("--output_dir must not be empty")
        elif os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            problems.append(f"--output_dir {self.output_dir!r} is a file, not a folder")
        if not self.preset:
            problems.extend(f"--{name} is required (or use --preset tiny)" for name in self.required_inputs
                            if not getattr(self, name))
        for name in self.path_options:
            value = getattr(self, name)
            if value and not os.path.exists(value):
                problems.append(f"--{name} {value!r} does not exist")
            elif value and name in LAYOUT_CHECKS:
                problems.extend(LAYOUT_CHECKS[name](value))
        return problems

    @classmethod
    def preset_values(cls, given: dict) -> dict:
        """The values the preset named in ``given`` (the command line's options) sets."""
        return dict(cls.presets.get(given.get("preset", ""), {}))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)


@dataclass
class TrainConfig(CommandOptions):
    """The options every trainer has (optimisation, precision, checkpoints, validation, logging); a trainer's config
    adds its inputs and its method's options, and may give these other defaults."""

    # class-level: the trainer's name (its script training/train_<name>.py, its TensorBoard folder logs/<name>/, and
    # recorded in its checkpoints) and what messages call it
    trainer: ClassVar[str] = ""
    title: ClassVar[str] = ""
    # class-level: the options that decide the trained tensors' shapes or the models they were trained against (a
    # resume must keep the checkpoint's values; every other option may change, the new value applying from there on)
    architecture_options: ClassVar[tuple[str, ...]] = ("preset",)
    path_options: ClassVar[tuple[str, ...]] = ("heldout_dataset",)

    # identities kept out of training (same layout as the dataset) for the held-out check before and after training
    heldout_dataset: str = ""
    cache_dir: str = ""  # face detections/embeddings cache; default <output_dir>/cache
    batch_size: int = 4
    learning_rate: float = 1e-5
    max_steps: int = 10_000
    # optimisation
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999
    # bookkeeping
    checkpoint_every: int = 1000
    checkpoints_total_limit: int = 3  # 0 keeps every checkpoint
    resume: str = ""  # "latest" or a checkpoint folder
    validation_every: int = 1000
    validation_steps: int = 30
    validation_prompts: list[str] = field(default_factory=list)
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard | none
    export_name: str = "weights.safetensors"

    def problems(self) -> list[str]:
        problems = self.shared_problems()
        if self.report_to not in ("tensorboard", "none"):
            problems.append(f"--report_to must be tensorboard or none, got {self.report_to!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        for name in ("batch_size", "max_steps", "gradient_accumulation_steps", "checkpoint_every", "validation_steps",
                     "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name, meaning in (("lr_warmup_steps", "0 or more"), ("adam_weight_decay", "0 or more"),
                              ("max_grad_norm", "0 (no clipping) or more"), ("validation_every", "0 (off) or more"),
                              ("checkpoints_total_limit", "0 (keep all) or more")):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must be {meaning}, got {getattr(self, name)}")
        if not 0.0 < self.ema_decay < 1.0:
            problems.append(f"--ema_decay must be in (0, 1) (e.g. 0.9999), got {self.ema_decay}")
        if self.learning_rate <= 0:
            problems.append(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.cache_dir and os.path.exists(self.cache_dir) and not os.path.isdir(self.cache_dir):
            problems.append(f"--cache_dir {self.cache_dir!r} is a file, not a folder")
        if (not self.export_name.endswith(".safetensors") or os.path.basename(self.export_name) != self.export_name
                or self.export_name.startswith(".")):
            problems.append(f"--export_name must be a file name ending in .safetensors (no folder; it is written into "
                            f"--output_dir), got {self.export_name!r}")
        if self.validation_every and not (self.validation_prompts and all(p.strip() for p in self.validation_prompts)):
            problems.append("--validation_prompts must be one or more non-empty prompts while --validation_every is "
                            "not 0 (or set --validation_every 0)")
        problems.extend(self.method_problems())
        if self.resume and not problems:
            from .loop import resolve_resume

            try:
                folder, _ = resolve_resume(self.resume, self.output_dir)
                if folder:
                    check_resume_config(self, folder)
            except PackError as exc:  # ConfigError, or a corrupt checkpoint named by --resume
                problems.append(str(exc))
        return problems

    def method_problems(self) -> list[str]:
        """The trainer's own checks (its inputs and method options), as messages."""
        return []


# --compile's parts: the UNet (the adapter's gated attention inside it), the VAE decoder the identity loss runs on x0_hat,
# and that loss's ArcFace
COMPILE_TARGETS = ("unet", "vae_decoder", "arcface")


def _compile_backends() -> list[str]:
    import torch._dynamo

    return torch._dynamo.list_backends(exclude_tags=())


@dataclass
class IDAdapterTrainConfig(TrainConfig):
    trainer: ClassVar[str] = "idadapter"
    title: ClassVar[str] = "IDAdapter"
    architecture_options: ClassVar[tuple[str, ...]] = (
        "num_tokens", "mff_width", "mff_heads", "embed_dim", "textual_hidden", "num_images", "preset")
    path_options: ClassVar[tuple[str, ...]] = (
        "base_model", "clip_vision", "insightface_pack", "arcface", "dataset", "heldout_dataset")
    required_inputs: ClassVar[tuple[str, ...]] = ("base_model", "clip_vision", "insightface_pack", "dataset")
    # tiny: the identity loss on every row (norm gate at ratio 0), since the random tiny VAE's x0_hat shows a face
    # the detector finds only by chance (README "Training IDAdapter")
    presets: ClassVar[dict[str, dict]] = {
        "tiny": dict(
            resolution=64, batch_size=2, num_images=2, max_steps=150, learning_rate=3e-3, kv_learning_rate=3e-4,
            num_tokens=4, mff_width=32, mff_heads=2, embed_dim=32, textual_hidden=64, checkpoint_every=50,
            validation_every=150, validation_steps=4, log_every=5, id_gate="norm", id_gate_ratio=0.0,
            validation_prompts=["a photo of sks"],
        ),
    }

    # inputs
    base_model: str = ""  # SD1.5/SD2.x/SDXL diffusers folder (model_index.json) or single-file .safetensors/.ckpt
    clip_vision: str = ""  # transformers CLIPVisionModelWithProjection folder (the node side's CLIP_VISION)
    insightface_pack: str = ""  # folder with the detector + ArcFace .onnx (e.g. models/insightface/models/antelopev2)
    arcface: str = ""  # ArcFace weights for the identity loss (.onnx or .pth); default: the pack's recognizer
    dataset: str = ""  # identity folders, see README "Training data"
    # held-out identities: the denoising loss with the right identity's references must fall below the loss with
    # another identity's (tiny: made for you)
    heldout_dataset: str = ""
    output_dir: str = "runs/idadapter"
    # the paper's settings
    resolution: int = 512
    num_images: int = 4  # N references per identity
    # identities with fewer photos are left out (0: N + 1, so that every target has N references besides itself);
    # with fewer than N + 1, the references are the other photos, filled up to N by augmentation
    min_images: int = 0
    # the old data path, for comparison: the target is one of its own N references
    references_include_target: bool = False
    # what CLIP vision sees of a reference: "face", a square around the detected face, the box's longer side plus
    # --face_crop_margin of it on each side (stored in the export, so MFF Embed crops alike); "photo", the whole
    # photo's centre square
    reference_crop: str = "face"
    face_crop_margin: float = 0.5
    identifier: str = DEFAULT_IDENTIFIER
    batch_size: int = 4
    learning_rate: float = 3e-5
    kv_learning_rate: float = 0.0  # for the pretrained cross-attention W_K, W_V; 0 = --learning_rate
    max_steps: int = 50_000
    id_loss_weight: float = 0.1  # lambda
    # conditioning dropout for classifier-free guidance: a dropped image condition switches the adapter off
    text_dropout: float = 0.05
    image_dropout: float = 0.05
    # identity-loss gate F(x0_hat), on per example: "detector" (the paper's: the insightface pack's detector finds a
    # face in x0_hat whose box overlaps the target photo's face box by IoU >= id_gate_iou; 0 = a face anywhere) or
    # "norm" (the ArcFace feature norm of the aligned x0_hat crop is at least id_gate_ratio of the target photo's)
    id_gate: str = "detector"
    id_gate_iou: float = 0.5
    id_gate_ratio: float = 0.5
    # what the identity loss decodes of x0_hat: "full" (the paper's way: the whole latent) or "window" (per example the
    # latent window the aligned face crop reads, plus a margin: less decoder work, but an approximation that measured
    # loose on random VAEs; README "Training IDAdapter")
    id_decode: str = "full"
    # torch.compile, in place (the checkpoints' and the export's keys stay as they are): any of unet (with the
    # adapter's gated attention inside it), vae_decoder and arcface (the identity loss's), or none (eager).
    # compile_backend is torch.compile's backend ("aot_eager" traces without generating code, to check a setup quickly)
    compile: list[str] = field(default_factory=lambda: ["none"])
    compile_backend: str = "inductor"
    # the UNet, the VAE and the identity loss's ArcFace, and their image-shaped inputs, in channels-last memory layout
    # (the layout tensor cores' convolution kernels read)
    channels_last: bool = False
    # CPU memory for the frozen models' per-photo outputs, each computed once: a target's VAE posterior and gate
    # reference, a reference photo's CLIP-vision features (least recently used out first; 0 = recompute each step)
    cache_mb: int = 4096
    # threads that decode the next step's photos (those the cache does not hold) while a step runs; 0: decode them
    # in the step
    prefetch_threads: int = 4
    # adapter size
    num_tokens: int = 16
    mff_width: int = 768
    mff_heads: int = 12
    embed_dim: int = 768
    textual_hidden: int = 1024
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of sks", "a painting of sks, smiling"])
    # write each process's examples per step (identity, target and reference files) to
    # <output_dir>/examples/rank-<rank>.jsonl: what each GPU trained on, for auditing data and sharding
    log_examples: bool = False
    export_name: str = "idadapter.safetensors"
    synthetic_identities: int = 6
    synthetic_images: int = 5
    tiny_base_steps: int = 120  # the tiny base UNet is first trained as a plain denoiser (a stand-in for SD)

    def compiled_parts(self) -> list[str]:
        """The parts --compile names (none: [])."""
        return [part for part in self.compile if part != "none"]

    def method_problems(self) -> list[str]:
        problems = []
        if self.resolution % 8 or self.resolution < 32:
            problems.append(f"--resolution must be a multiple of 8 and at least 32, got {self.resolution}")
        for name in ("num_images", "num_tokens", "mff_width", "mff_heads", "embed_dim", "textual_hidden",
                     "synthetic_images"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name, field_name in ADAPTER_CONFIG_FIELDS.items():  # the export must be a file Load IDAdapter accepts
            if getattr(self, name) > CONFIG_LIMITS[field_name]:
                problems.append(f"--{name} must be at most {CONFIG_LIMITS[field_name]} (the largest IDAdapter files "
                                f"the nodes load), got {getattr(self, name)}")
        for name, meaning in (("cache_mb", "0 (off) or more"), ("kv_learning_rate", "0 (= --learning_rate) or more"),
                              ("prefetch_threads", "0 (decode in the step) or more"),
                              ("min_images", "0 (= --num_images + 1) or more"),
                              ("id_loss_weight", "0 (off) or more"), ("id_gate_ratio", "0 (gate always on) or more"),
                              ("tiny_base_steps", "0 or more")):
            if getattr(self, name) < 0:
                problems.append(f"--{name} must be {meaning}, got {getattr(self, name)}")
        if self.reference_crop not in ("face", "photo"):
            problems.append(f"--reference_crop must be face or photo, got {self.reference_crop!r}")
        if not 0 <= self.face_crop_margin <= FACE_CROP_MARGIN_LIMIT:
            problems.append(f"--face_crop_margin must be from 0 to {FACE_CROP_MARGIN_LIMIT}, got {self.face_crop_margin}")
        if self.id_gate not in GATES:
            problems.append(f"--id_gate must be {' or '.join(GATES)}, got {self.id_gate!r}")
        if self.id_decode not in DECODES:
            problems.append(f"--id_decode must be {' or '.join(DECODES)}, got {self.id_decode!r}")
        if self.compile != ["none"] and (not set(self.compile) <= set(COMPILE_TARGETS)
                                          or len(set(self.compile)) < len(self.compile)):
            problems.append(f"--compile must be none or one or more of {', '.join(COMPILE_TARGETS)} (each once), got "
                            f"{' '.join(self.compile)!r}")
        if self.compiled_parts() and self.compile_backend not in _compile_backends():
            problems.append(f"--compile_backend must be one of torch.compile's backends "
                            f"({', '.join(_compile_backends())}), got {self.compile_backend!r}")
        if not 0.0 <= self.id_gate_iou <= 1.0:
            problems.append(f"--id_gate_iou must be in [0, 1] (0: a face anywhere in x0_hat), got {self.id_gate_iou}")
        if self.synthetic_identities < 2:
            problems.append(f"--synthetic_identities must be at least 2 (the held-out check compares identities), "
                            f"got {self.synthetic_identities}")
        for name in ("text_dropout", "image_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mff_heads >= 1 and self.mff_width % self.mff_heads:
            problems.append(f"--mff_width ({self.mff_width}) must be divisible by --mff_heads ({self.mff_heads})")
        try:
            check_identifier(self.identifier)
        except ConfigError as exc:
            problems.append(f"--identifier: {exc}")
        return problems


def resume_changes(config, saved: dict) -> tuple[list[str], list[str]]:
    """(architecture options that differ from the checkpoint's run, other options that differ), as
    "--name old -> new" lines."""
    arch, other = [], []
    for f in dataclasses.fields(config):
        if f.name in RESUME_QUIET or f.name not in saved:
            continue
        old, new = saved[f.name], getattr(config, f.name)
        if old != new:
            (arch if f.name in config.architecture_options else other).append(f"--{f.name} {old!r} -> {new!r}")
    return arch, other


def check_resume_config(config, folder: str) -> list[str]:
    """Compares this run's options with those saved in a checkpoint: a checkpoint of another trainer or a changed
    architecture option is a ConfigError naming it; the other changes are returned (this run's values win, the
    trainer prints them)."""
    from .checkpoint import read_state

    state = read_state(folder)
    written_by = checkpoint_trainer(state)
    if written_by is not None and written_by != config.trainer:
        other = TRAINER_CONFIGS[written_by].title if written_by in TRAINER_CONFIGS else repr(written_by)
        raise ConfigError(f"--resume {folder}: a checkpoint of the {other} trainer (training/train_{written_by}.py), "
                          f"not of this {config.title} trainer: resume it with training/train_{written_by}.py, or "
                          f"pass a checkpoint of the {config.title} trainer (or a new --output_dir to start from "
                          "step 0)")
    saved = state.get("config")
    if not isinstance(saved, dict):  # a checkpoint written before options were saved in it: shapes are checked later
        return []
    arch, other = resume_changes(config, saved)
    if arch:
        raise ConfigError(f"--resume {folder}: the checkpoint was trained with other adapter options ({'; '.join(arch)}); "
                          "its weights have another shape. Resume with the checkpoint's values, or start a new "
                          "--output_dir")
    return other


def checkpoint_trainer(state: dict) -> str | None:
    """The name of the trainer that wrote a checkpoint (``state``: its state.json): recorded there, or, in a
    checkpoint written before it was, the trainer whose inputs its saved options name (None: no options saved)."""
    if isinstance(state.get("trainer"), str):
        return state["trainer"]
    saved = state.get("config")
    if isinstance(saved, dict):
        for name, config_cls in TRAINER_CONFIGS.items():
            if set(config_cls.required_inputs) <= set(saved):
                return name
    return None


def parse_args(config_cls, argv=None, description: str = ""):
    # each option's help states its default itself (the parser's defaults are None: "not given", so that a preset's
    # value applies); the description, the script's docstring, keeps its example commands' lines
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        default = getattr(defaults, f.name)
        flag = f"--{f.name}"
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, default=None, metavar="true|false",
                                help=f"(default: {default})")
        elif isinstance(default, list):
            item = int if str(f.type) == "list[int]" else str
            parser.add_argument(flag, nargs="+", type=item, default=None, help=f"(default: {default})")
        else:
            parser.add_argument(flag, type=type(default), default=None, help=f"(default: {default!r})")
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    values = config_cls.preset_values(given)
    values.update(given)
    config = config_cls(**values)
    config.validate()
    return config


def mask_suffix_problems(suffix: str) -> list[str]:
    """--mask_suffix must end a plain file name with an image extension (masks sit beside their photos)."""
    from .data import IMAGE_EXTENSIONS

    if (os.path.splitext(suffix)[1].lower() in IMAGE_EXTENSIONS and os.sep not in suffix and "/" not in suffix
            and not suffix.startswith(".")):
        return []
    extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
    return [f"--mask_suffix must end a file name with an image extension ({extensions}), e.g. _mask.png, got "
            f"{suffix!r}"]


def is_class_noun(text: str) -> bool:
    """Whether ``text`` is one or more words of letters ("person", "young woman"): a class noun for prompts."""
    return bool(text.strip()) and all(part.isalpha() for part in text.split())


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


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
    dataset: str = ""  # face photos in identity folders (README "Training data"); only their ArcFace vectors are used
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
    dataset: str = ""  # photos in identity folders (README "Training data"); stage 2 also reads captions and masks
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


# every trainer's options by the trainer's name
TRAINER_CONFIGS = {c.trainer: c for c in (IDAdapterTrainConfig, WPlusTrainConfig, AdaFaceTrainConfig)}


@dataclass
class IDAdapterEvalConfig(CommandOptions):
    """training/evaluate_idadapter.py: images of one identity generated with an IDAdapter file for a prompt set, and the
    paper's metrics measured on them. ``--seed`` seeds the references' augmentation (MFF Embed's seed) and, in the tiny
    preset, the untrained adapter; ``--seeds`` are the generation seeds, each prompt is drawn once per seed."""

    path_options: ClassVar[tuple[str, ...]] = (
        "adapter", "base_model", "clip_vision", "insightface_pack", "references", "prompts", "clip_model")
    required_inputs: ClassVar[tuple[str, ...]] = (
        "adapter", "base_model", "clip_vision", "insightface_pack", "references", "prompts")
    presets: ClassVar[dict[str, dict]] = {"tiny": dict(resolution=64, steps=4, seeds=[0, 1])}
    purpose: ClassVar[str] = "evaluation"

    # inputs (--preset tiny: the tiny trainer's models and held-out photos, an untrained adapter, two prompts)
    adapter: str = ""  # an idadapter/1 file
    base_model: str = ""  # the SD1.5/SD2.x/SDXL base it was trained for (diffusers folder or single file)
    clip_vision: str = ""  # the CLIPVisionModelWithProjection folder it was trained with
    insightface_pack: str = ""  # detector + ArcFace .onnx: the references' and the generated faces
    references: str = ""  # a folder of one identity's photos (the paper: one photo, replicated to N)
    prompts: str = ""  # a UTF-8 text file, one prompt per line ("sks" where the person goes; see README)
    clip_model: str = ""  # a transformers CLIPModel folder (with its tokenizer) for CLIP-T; without it no CLIP-T
    output_dir: str = "runs/idadapter_eval"
    # generation: diffusers' pipeline with DDIM, classifier-free guidance, the adapter on the conditional half
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    steps: int = 30
    guidance_scale: float = 5.0
    resolution: int = 512
    weight: float = 1.0  # Apply IDAdapter's weight: scales the gated attention and the K/V deltas
    # the references, as IDAdapter MFF Embed uses them: the first N (0 = the adapter's N), fewer copied up to N
    # (plain copies, as the paper; true: augmented copies)
    num_images: int = 0
    augment: bool = False
    identifier: str = DEFAULT_IDENTIFIER
    class_noun: str = "person"  # appended as ", <class noun> is <identifier>", and CLIP-T's word for the person
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:<n>, mps

    def problems(self) -> list[str]:
        problems = self.shared_problems()
        if self.steps < 1:
            problems.append(f"--steps must be at least 1, got {self.steps}")
        if self.resolution % 8 or self.resolution < 32:
            problems.append(f"--resolution must be a multiple of 8 and at least 32, got {self.resolution}")
        if self.guidance_scale < 0:
            problems.append(f"--guidance_scale must be 0 or more, got {self.guidance_scale}")
        if not 0 <= self.num_images <= CONFIG_LIMITS["num_images"]:
            problems.append(f"--num_images must be 0 (the adapter's N) to {CONFIG_LIMITS['num_images']}, got "
                            f"{self.num_images}")
        if not self.seeds or any(not 0 <= s < 2**32 for s in self.seeds):
            problems.append(f"--seeds must be one or more seeds in [0, 2**32), got {self.seeds}")
        try:
            check_identifier(self.identifier)
        except ConfigError as exc:
            problems.append(f"--identifier: {exc}")
        if not is_class_noun(self.class_noun):
            problems.append(f"--class_noun must be a word of letters such as person, woman or man, got "
                            f"{self.class_noun!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            problems.append(f"--device must be auto, cpu, cuda, cuda:<n> or mps, got {self.device!r}")
        for name, is_kind, kind in (("adapter", os.path.isfile, "file"), ("prompts", os.path.isfile, "file"),
                                    ("references", os.path.isdir, "folder"), ("clip_model", os.path.isdir, "folder")):
            value = getattr(self, name)
            if value and os.path.exists(value) and not is_kind(value):
                problems.append(f"--{name} {value!r} is not a {kind}")
        if self.prompts and os.path.isfile(self.prompts):
            try:
                read_prompts(self.prompts)
            except ConfigError as exc:
                problems.append(str(exc))
        return problems


def read_prompts(path: str) -> list[str]:
    """The prompt file's non-empty lines, stripped; a ConfigError when it is unreadable, not UTF-8 or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--prompts {path!r} cannot be read as UTF-8 text ({type(exc).__name__})") from exc
    if not prompts:
        raise ConfigError(f"--prompts {path!r} has no prompt: write one prompt per line")
    return prompts
