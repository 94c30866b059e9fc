"""Trainer configuration: a dataclass per trainer, presets, a CLI made from the fields, and checks that turn
a bad configuration into one clear message before anything heavy loads."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field

from ..nodes.arch.idadapter import DEFAULT_IDENTIFIER, check_identifier
from ..nodes.errors import ConfigError

__all__ = ["ConfigError", "IDAdapterTrainConfig", "parse_args"]


@dataclass
class IDAdapterTrainConfig:
    # inputs
    base_model: str = ""  # SD1.5/SD2.x/SDXL diffusers folder (model_index.json) or single-file .safetensors/.ckpt
    clip_vision: str = ""  # transformers CLIPVisionModelWithProjection folder (the node side's CLIP_VISION)
    insightface_pack: str = ""  # folder with the detector + ArcFace .onnx (e.g. models/insightface/models/antelopev2)
    arcface: str = ""  # ArcFace weights for the identity loss (.onnx or .pth); default: the pack's recognizer
    dataset: str = ""  # identity folders, see README "Training data"
    # identities kept out of training (same layout) for the held-out check before and after training: the denoising
    # loss with the right identity's references must fall below the loss with another identity's (tiny: made for you)
    heldout_dataset: str = ""
    output_dir: str = "runs/idadapter"
    cache_dir: str = ""  # face detections/embeddings cache; default <output_dir>/cache
    # the paper's settings
    resolution: int = 512
    num_images: int = 4  # N references per identity
    identifier: str = DEFAULT_IDENTIFIER
    batch_size: int = 4
    learning_rate: float = 3e-5
    kv_learning_rate: float = 0.0  # for the pretrained cross-attention W_K, W_V; 0 = --learning_rate
    max_steps: int = 50_000
    id_loss_weight: float = 0.1  # lambda
    # conditioning dropout for classifier-free guidance: a dropped image condition switches the adapter off
    text_dropout: float = 0.05
    image_dropout: float = 0.05
    # identity-loss gate F(x0_hat): on when the ArcFace feature norm of the aligned x0_hat crop is at least this
    # fraction of the target photo's (the norm is ArcFace's own face-quality signal)
    id_gate_ratio: float = 0.5
    # CPU memory for the frozen models' per-photo outputs, each computed once: a target's VAE posterior and gate
    # reference, a reference photo's CLIP-vision features (least recently used out first; 0 = recompute each step)
    cache_mb: int = 4096
    # adapter size
    num_tokens: int = 16
    mff_width: int = 768
    mff_heads: int = 12
    embed_dim: int = 768
    textual_hidden: int = 1024
    # optimisation
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999
    seed: int = 0
    # bookkeeping
    checkpoint_every: int = 1000
    checkpoints_total_limit: int = 3
    resume: str = ""  # "latest" or a checkpoint folder
    validation_every: int = 1000
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of sks", "a painting of sks, smiling"])
    validation_steps: int = 30
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard | none
    # write each process's examples per step (identity, target and reference files) to
    # <output_dir>/examples/rank-<rank>.jsonl: what each GPU trained on, for auditing data and sharding
    log_examples: bool = False
    export_name: str = "idadapter.safetensors"
    # --preset tiny: tiny random models and a synthetic identity set, same code path
    preset: str = ""
    synthetic_identities: int = 6
    synthetic_images: int = 5
    tiny_base_steps: int = 120  # the tiny base UNet is first trained as a plain denoiser (a stand-in for SD)

    def validate(self) -> None:
        problems = []
        if self.preset not in ("", "tiny"):
            problems.append(f"--preset must be 'tiny' or absent, got {self.preset!r}")
        if self.resolution % 8 or self.resolution < 32:
            problems.append(f"--resolution must be a multiple of 8 and at least 32, got {self.resolution}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.report_to not in ("tensorboard", "none"):
            problems.append(f"--report_to must be tensorboard or none, got {self.report_to!r}")
        for name in ("num_images", "batch_size", "max_steps", "gradient_accumulation_steps", "num_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.cache_mb < 0:
            problems.append(f"--cache_mb must be 0 (off) or more, got {self.cache_mb}")
        for name in ("text_dropout", "image_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.learning_rate <= 0:
            problems.append(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.mff_width % self.mff_heads:
            problems.append(f"--mff_width ({self.mff_width}) must be divisible by --mff_heads ({self.mff_heads})")
        if not self.preset:
            for name in ("base_model", "clip_vision", "insightface_pack", "dataset"):
                if not getattr(self, name):
                    problems.append(f"--{name} is required (or use --preset tiny)")
        for name in ("base_model", "clip_vision", "insightface_pack", "dataset", "heldout_dataset"):
            value = getattr(self, name)
            if value and not os.path.exists(value):
                problems.append(f"--{name} {value!r} does not exist")
        try:
            check_identifier(self.identifier)
        except ConfigError as exc:
            problems.append(f"--identifier: {exc}")
        if self.resume:
            from .loop import resolve_resume

            try:
                resolve_resume(self.resume, self.output_dir)
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError("invalid training configuration:\n  " + "\n  ".join(problems))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)


# values a preset sets unless the command line sets them too
PRESETS = {
    "tiny": dict(
        resolution=64, batch_size=2, num_images=2, max_steps=150, learning_rate=3e-3, kv_learning_rate=3e-4,
        num_tokens=4, mff_width=32, mff_heads=2, embed_dim=32, textual_hidden=64, checkpoint_every=50,
        validation_every=150, validation_steps=4, log_every=5, id_gate_ratio=0.0, validation_prompts=["a photo of sks"],
    ),
}


def parse_args(config_cls, argv=None, description: str = ""):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        default = getattr(defaults, f.name)
        flag = f"--{f.name}"
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, default=None, metavar="true|false",
                                help=f"(default: {default})")
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", default=None, help=f"(default: {default})")
        else:
            parser.add_argument(flag, type=type(default), default=None, help=f"(default: {default!r})")
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    values = dict(PRESETS.get(given.get("preset", ""), {}))
    values.update(given)
    config = config_cls(**values)
    config.validate()
    return config


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
