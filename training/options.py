"""The options every command shares (``CommandOptions``: the trainers' and the evaluation's) and every trainer shares
(``TrainConfig``), with the checks that turn a bad configuration into one clear message before anything heavy loads.
Each trainer's own options: ``idadapter_config``, ``wplus_config``, ``adaface_config``; the command line made from
them: ``cli``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import ClassVar

from ..nodes.errors import ConfigError
from .model_folders import LAYOUT_CHECKS

# diffusers.optimization.get_scheduler's names that need no option this trainer lacks ("piecewise_constant" needs
# step rules); listed here so that checking the options does not import diffusers (a test keeps them in sync)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


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
        self.refuse(self.problems())

    def refuse(self, problems: list[str]) -> None:
        """One ConfigError listing ``problems``, if there are any."""
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
        return problems

    def method_problems(self) -> list[str]:
        """The trainer's own checks (its inputs and method options), as messages."""
        return []


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
