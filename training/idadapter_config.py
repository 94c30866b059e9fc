"""The IDAdapter trainer's options (training/train_idadapter.py) and its evaluation's
(training/evaluate_idadapter.py)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import ClassVar

from ..nodes.arch.idadapter import DEFAULT_IDENTIFIER, check_identifier
from ..nodes.arch.idadapter_file import CONFIG_LIMITS, FACE_CROP_MARGIN_LIMIT
from ..nodes.errors import ConfigError
from .face_gate import GATES
from .id_decode import DECODES
from .options import CommandOptions, TrainConfig, is_class_noun

# IDAdapter trainer option -> the idadapter/1 config field it sets
ADAPTER_CONFIG_FIELDS = {"num_tokens": "num_tokens", "mff_width": "width", "mff_heads": "mff_heads",
                         "embed_dim": "embed_dim", "textual_hidden": "textual_hidden", "num_images": "num_images"}

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
    # the detector finds only by chance (docs/idadapter.md, "Training")
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
    dataset: str = ""  # identity folders, see docs/training.md "Training data"
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
    # loose on random VAEs; docs/idadapter.md "Training")
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
    prompts: str = ""  # a UTF-8 text file, one prompt per line ("sks" where the person goes; see docs/idadapter.md)
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
