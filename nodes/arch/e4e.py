"""The e4e encoder (Tov et al., "Designing an Encoder for StyleGAN Image Manipulation"; omertov/encoder4editing) in
pure torch: a face image -> a StyleGAN2 W+ code [B, 18, 512], what the W+ adapter is conditioned on
(reference/official-checkpoints.md §3.6, §4).

- :class:`Encoder4Editing`: the official ``Encoder4Editing(50, 'ir_se')`` with the official parameter names, so the
  ``encoder.*`` part of the released ``e4e_ffhq_encode.pt`` maps one to one once the ``encoder.`` prefix is dropped.
  IR-SE-50 body (24 ``bottleneck_IR_SE`` units), a two-level feature pyramid (``latlayer1``/``latlayer2``) and 18
  ``GradualStyleBlock`` heads; the forward is e4e's at inference (every style active): ``w_0 = styles[0](c3)`` is
  repeated over the 18 rows and row i >= 1 adds ``styles[i]`` of the 16x16 (i < 3), 32x32 (i < 7) or 64x64 map.
  The output is an offset from ``latent_avg``: W+ = ``encoder(x) + latent_avg``.
- :func:`normalize_for_e4e` / :func:`encode_wplus`: images in [0, 1] -> W+ (e4e's preprocessing, §4.3).
- :func:`load_official_e4e`: the released pSp-framework checkpoint, read with ``torch.load(weights_only=True,
  mmap=True)`` (``files.read_tensors_only``): nothing in the pickle runs, and the tensors stay in the file until
  every name and shape has been compared with a ``meta``-device module. The decoder is ignored.
- File format ``e4e/1`` (:func:`save_e4e`, :func:`load_e4e`, :func:`convert_official_e4e`): safetensors whose
  ``__metadata__`` holds ``format`` (``e4e/1``), ``family`` (``ffhq``: the encoder inverts the FFHQ 1024 StyleGAN2,
  18 styles) and ``config``, the JSON of :class:`E4EConfig`::

      {"backbone": "ir_se_50", "encoder_type": "Encoder4Editing", "input_size": 256, "style_count": 18,
       "stylegan_size": 1024}

  Tensors: ``encoder.<official name>`` (BatchNorm's ``num_batches_tracked`` counters left out: they are training
  bookkeeping) and ``latent_avg`` [18, 512].

Choices where the reference leaves something open (each also noted where it is made):
- ``normalize_for_e4e`` resizes with bilinear interpolation and antialiasing (torchvision's tensor equivalent of
  ``transforms.Resize`` on a PIL image, §4.3); an input already 256x256 is not resampled.
- A ``latent_avg`` of shape [512] or [1, 512] is broadcast to the 18 rows, which is what the official
  ``codes + latent_avg.repeat(B, 1, 1)`` does with it.
- A checkpoint without ``latent_avg`` is refused: the official code would average 10,000 samples of the StyleGAN
  mapping network (``decoder.mean_latent``, random), which this pack does not run.
- ``opts.encoder_type`` must be ``Encoder4Editing``: a pSp checkpoint (``GradualStyleEncoder``) has exactly the
  same tensor names and shapes but predicts every style independently, so only ``opts`` tells them apart.
- ``opts.stylegan_size``, when present, must be 1024; when absent the tensor shapes decide (18 style heads).
  ``opts.start_from_latent_avg`` False is refused (such an encoder predicts W+ itself, so adding ``latent_avg``, as
  the W+ adapter does, would be wrong); absent counts as True. Other ``opts`` (``dataset_type`` ...) are not read.
- Legacy (pre-PyTorch-1.6, non-zip) checkpoints are refused (they cannot be memory-mapped, and their loader
  allocates what the pickle declares before reading it); the message says how to re-save one.

Over 450 lines: about 80 are this record of the reference; the rest is one network and the two readers (its own
file, the official checkpoint) checked against its parameter names.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ImageInputError, ModelFileError
from .ffhq_align import align_ffhq
from .files import (check_shapes, first_few, looks_like_safetensors, materialized, metadata_json, open_safetensors,
                    read_tensors_only, write_safetensors)

FORMAT = "e4e/1"
FAMILY = "ffhq"
INPUT_SIZE = 256  # e4e's input; the style heads reduce the 16/32/64 maps to 1x1 only at this size
LATENT_DIM = 512
STYLEGAN_SIZE = 1024  # the FFHQ StyleGAN2: 2 * log2(1024) - 2 = 18 styles
STYLE_COUNT = 18
# IR-SE-50 (get_blocks(50)): (in channels, out channels, units) per stage; the first unit of each stage has stride 2
IR_SE_50_STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))
SE_REDUCTION = 16
COARSE_END, MIDDLE_END = 3, 7  # styles 0-2 read the 16x16 map, 3-6 the 32x32 one, 7-17 the 64x64 one
# body units whose outputs feed the pyramid: the last unit of stages 2, 3 and 4 (64x64, 32x32, 16x16 at 256 px)
C1_UNIT, C2_UNIT, C3_UNIT = 6, 20, 23

ENCODER_PREFIX = "encoder."
LATENT_AVG = "latent_avg"
_BATCHES_TRACKED = "num_batches_tracked"
LATENT_AVG_SHAPES = ((STYLE_COUNT, LATENT_DIM), (1, LATENT_DIM), (LATENT_DIM,))
FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SAVE_DTYPES = (torch.float32, torch.float16)

_WRITER = "convert_official_e4e (nodes/arch/e4e.py) from the official e4e_ffhq_encode.pt"
_REWRITE = f"The file is damaged or was edited: write it again with {_WRITER}"
_OFFICIAL_FIX = ("Use the released FFHQ e4e encoder, e4e_ffhq_encode.pt (omertov/encoder4editing 'FFHQ Inversion', "
                 "also re-hosted by csxmli2016/w-plus-adapter), unchanged")


# --- the network -------------------------------------------------------------------------------------------------


class SEModule(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(mean over space of x)))), both 1x1 convs bias-free."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(scale))))


class BottleneckIRSE(nn.Module):
    """``bottleneck_IR_SE``: res_layer = BN, conv3x3 (stride 1), PReLU, conv3x3 (``stride``), BN, SE; plus a shortcut
    that is a strided subsampling (``MaxPool2d(1, stride)``, no parameters) when the width stays, else a strided
    1x1 conv + BN."""

    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class EqualLinear(nn.Module):
    """StyleGAN2's equalized-learning-rate linear layer (rosinality's, no activation): the stored weight is scaled by
    ``lr_mul / sqrt(in_dim)`` and the bias by ``lr_mul`` at run time."""

    def __init__(self, in_dim: int, out_dim: int, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.lr_mul = lr_mul
        self.scale = lr_mul / math.sqrt(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class GradualStyleBlock(nn.Module):
    """log2(spatial) x [conv3x3 stride 2 + LeakyReLU(0.01)] take a [B, 512, spatial, spatial] map to [B, 512, 1, 1],
    then an EqualLinear (lr_mul 1) gives one style vector. ``convs`` holds conv, activation, conv, ... so the convs
    are ``convs.0``, ``convs.2``, ... as in the official state dict."""

    def __init__(self, in_channels: int, out_channels: int, spatial: int):
        super().__init__()
        num_pools = int(math.log2(spatial))
        layers: list[nn.Module] = []
        for i in range(num_pools):
            # nn.LeakyReLU() with its default slope 0.01, as the official block (not StyleGAN's 0.2)
            layers += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, 2, 1), nn.LeakyReLU(0.01)]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_channels, out_channels, lr_mul=1.0)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        # the official view(-1, out_c): the map is 1x1 here (checked by Encoder4Editing.forward's input size)
        return self.linear(x.reshape(x.shape[0], self.out_channels))


def style_count_for(stylegan_size: int) -> int:
    """The number of W+ rows of a StyleGAN2 generating ``stylegan_size`` pixels (2 per resolution from 4x4 on)."""
    return 2 * int(math.log2(stylegan_size)) - 2


class Encoder4Editing(nn.Module):
    """e4e's encoder: [B, 3, 256, 256] in [-1, 1] -> W+ offsets from ``latent_avg``, [B, style_count, 512]."""

    def __init__(self, stylegan_size: int = STYLEGAN_SIZE):
        super().__init__()
        if stylegan_size not in (256, 512, 1024):  # the StyleGAN2 sizes e4e was released for (church/horse, cars, ffhq)
            raise ConfigError(f"stylegan_size {stylegan_size!r} is not one of 256, 512, 1024")
        self.stylegan_size = stylegan_size
        self.style_count = style_count_for(stylegan_size)
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        units = []
        for in_channels, depth, count in IR_SE_50_STAGES:
            units.append(BottleneckIRSE(in_channels, depth, 2))
            units += [BottleneckIRSE(depth, depth, 1) for _ in range(count - 1)]
        self.body = nn.Sequential(*units)
        self.styles = nn.ModuleList(
            GradualStyleBlock(LATENT_DIM, LATENT_DIM, 16 if i < COARSE_END else 32 if i < MIDDLE_END else 64)
            for i in range(self.style_count))
        self.latlayer1 = nn.Conv2d(256, 512, 1)  # c2 (256 ch, 32x32) -> the middle level
        self.latlayer2 = nn.Conv2d(128, 512, 1)  # c1 (128 ch, 64x64) -> the fine level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ImageInputError(f"e4e takes [B, 3, {INPUT_SIZE}, {INPUT_SIZE}] images in [-1, 1], got "
                                  f"{list(x.shape)}: resize them with normalize_for_e4e")
        x = self.input_layer(x)
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i == C1_UNIT:
                c1 = x
            elif i == C2_UNIT:
                c2 = x
        c3 = x  # the last unit's output (C3_UNIT)
        w = self.styles[0](c3).unsqueeze(1).repeat(1, self.style_count, 1)
        features = c3
        for i in range(1, self.style_count):
            # the pyramid levels are built when the first style that reads them comes, as the official forward does
            if i == COARSE_END:
                p2 = upsample_add(c3, self.latlayer1(c2))
                features = p2
            elif i == MIDDLE_END:
                features = upsample_add(p2, self.latlayer2(c1))
            w[:, i] += self.styles[i](features)
        return w


def upsample_add(top: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    """The pyramid's merge: ``top`` resized to ``lateral``'s size (bilinear, align_corners=True) plus ``lateral``."""
    return F.interpolate(top, size=lateral.shape[2:], mode="bilinear", align_corners=True) + lateral


# --- preprocessing and encoding ----------------------------------------------------------------------------------


def normalize_for_e4e(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> [B, 3, 256, 256] in [-1, 1]: e4e's Resize((256, 256)) + Normalize(0.5, 0.5).

    Choice: the resize is bilinear with antialiasing (torchvision's tensor counterpart of Resize on a PIL image);
    256x256 input is left as it is. Faces should be FFHQ-aligned beforehand (§4.3; the W+ adapter aligns at 512).
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ImageInputError(f"e4e takes a batch of RGB images [B, 3, H, W] (B >= 1), got {shape}")
    if min(images.shape[2:]) < 1 or not images.is_floating_point():
        raise ImageInputError(f"e4e takes floating-point images with at least one pixel, got {images.dtype} "
                              f"{list(images.shape)}")
    if not torch.isfinite(images).all():
        raise ImageInputError("the images hold NaN or infinite values; expected RGB values in [0, 1]")
    if tuple(images.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
        images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                               antialias=True)
    return (images - 0.5) / 0.5


@dataclass
class E4EWeights:
    """What an ``e4e/1`` file holds: the encoder and the W+ it starts from."""

    encoder: Encoder4Editing
    latent_avg: torch.Tensor  # [style_count, 512]


class WPlusEncoder(nn.Module):
    """The e4e encoder and ``latent_avg`` as one module (what a ComfyUI model patcher owns):
    ``forward(images01 [B, 3, H, W] RGB in [0, 1], aligned faces) -> W+ [B, 18, 512]``."""

    def __init__(self, weights: E4EWeights):
        super().__init__()
        self.encoder = weights.encoder
        self.register_buffer("latent_avg", weights.latent_avg)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        weight = self.encoder.input_layer[0].weight  # read as an attribute: what the caller may have put there
        x = normalize_for_e4e(images01.to(weight.device, weight.dtype))
        return self.encoder(x) + self.latent_avg.to(weight.device, weight.dtype)


def align_for_e4e(image: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """An image [3, H, W] (RGB, 0..1) and its face's 5 landmarks -> the FFHQ-aligned face [3, 256, 256] in 0..1
    that e4e encodes: what W+ Encode feeds the encoder and the W+ trainer computes its codes from."""
    return align_ffhq(image, landmarks, INPUT_SIZE).clamp(0, 1)


def encode_wplus(weights: E4EWeights, images01: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] (aligned faces) -> W+ [B, 18, 512] = encoder(normalized images) + latent_avg, as
    the W+ adapter computes it (§3.6). Runs on the encoder's device and dtype; gradients flow if the caller wants."""
    return WPlusEncoder(weights)(images01)


# --- our file format ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class E4EConfig:
    """The architecture an ``e4e/1`` file is for; the only one there is (checked field by field on load)."""

    encoder_type: str = "Encoder4Editing"
    backbone: str = "ir_se_50"
    stylegan_size: int = STYLEGAN_SIZE
    style_count: int = STYLE_COUNT
    input_size: int = INPUT_SIZE

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _expected_shapes(module: Encoder4Editing) -> dict[str, tuple]:
    """File name -> shape of every tensor of ``module`` but the BatchNorm batch counters."""
    return {ENCODER_PREFIX + k: tuple(v.shape) for k, v in module.state_dict().items()
            if not k.endswith(_BATCHES_TRACKED)}


def _meta_encoder() -> Encoder4Editing:
    with torch.device("meta"):  # shapes only, no memory: the values come from the file once its shapes fit
        return Encoder4Editing(STYLEGAN_SIZE)


def _materialize(module: Encoder4Editing, encoder_state: dict[str, torch.Tensor]) -> Encoder4Editing:
    """``module`` (on ``meta``) on the CPU in float32 holding ``encoder_state`` (module names); the batch counters,
    which inference never reads, start at 0."""
    state = dict(encoder_state)
    for name, buffer in module.state_dict().items():
        if name.endswith(_BATCHES_TRACKED):
            state[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)
    return materialized(module, state)


def save_e4e(weights: E4EWeights, path: str, dtype: torch.dtype = torch.float32) -> None:
    """Writes ``e4e/1`` atomically, in ``dtype`` (float32, as released, or float16: half the size); refuses weights
    that are not finite in it."""
    if dtype not in SAVE_DTYPES:
        raise ConfigError(f"dtype {dtype} is not one of {[str(d) for d in SAVE_DTYPES]}: use float32 (as released) "
                          f"or float16 (half the size)")
    encoder = weights.encoder
    if encoder.stylegan_size != STYLEGAN_SIZE or tuple(weights.latent_avg.shape) != (STYLE_COUNT, LATENT_DIM):
        raise ConfigError(f"cannot write {path}: e4e/1 holds the FFHQ encoder ({STYLE_COUNT} styles, latent_avg "
                          f"[{STYLE_COUNT}, {LATENT_DIM}]), got {encoder.style_count} styles and latent_avg "
                          f"{list(weights.latent_avg.shape)}")
    tensors = {ENCODER_PREFIX + k: v for k, v in encoder.state_dict().items() if not k.endswith(_BATCHES_TRACKED)}
    tensors[LATENT_AVG] = weights.latent_avg
    tensors = {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in tensors.items()}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():  # a value beyond float16's range becomes infinity, which load_e4e refuses
            fix = "the weights are damaged" if dtype == torch.float32 else \
                f"{dtype} holds magnitudes up to {torch.finfo(dtype).max:g}: write the file in float32"
            raise ConfigError(f"cannot write {path}: {name} holds NaN or infinite values in {dtype}; {fix}")
    write_safetensors(tensors, path, {"format": FORMAT, "family": FAMILY, "config": E4EConfig().to_json()})


def _check_config(meta: dict[str, str], path: str) -> None:
    if meta.get("family") != FAMILY:
        raise ModelFileError(f"{path}: family {meta.get('family')!r}, expected {FAMILY!r} (the e4e encoder of the FFHQ "
                             f"StyleGAN2, whose W+ codes the W+ adapter reads). {_REWRITE}")
    raw = metadata_json(meta, path, "config", "the JSON e4e config", _REWRITE)
    expected = asdict(E4EConfig())
    if not isinstance(raw, dict) or set(raw) != set(expected):
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ModelFileError(f"{path}: config {got!r}, expected a JSON object with exactly {sorted(expected)}. "
                             f"{_REWRITE}")
    for name, value in expected.items():
        # type() as well: JSON true would equal 1, and 1024.0 would equal 1024
        if type(raw[name]) is not type(value) or raw[name] != value:
            raise ModelFileError(f"{path}: config field {name!r} is {raw[name]!r}, expected {value!r} (the only e4e "
                                 f"architecture there is: IR-SE-50, 18 styles, 256x256 input). {_REWRITE}")


def _check_dtypes(path: str) -> None:
    """Refuses tensors that are not float32/float16/bfloat16, from the safetensors header (no data read)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        dtypes = {k: handle.get_slice(k).get_dtype() for k in handle.keys()}
    wrong = sorted(k for k, dtype in dtypes.items() if dtype not in FILE_DTYPES)
    if wrong:
        raise ModelFileError(f"{path}: {first_few(wrong)} are not floating point ({dtypes[wrong[0]]}), expected "
                             f"{'/'.join(FILE_DTYPES)} weights. {_REWRITE}")


def load_e4e(path: str) -> E4EWeights:
    """Reads ``e4e/1``: format, family and config first, then every tensor's dtype, name and shape from the header
    (against a ``meta``-device encoder), before anything is allocated; NaN or infinite values are refused."""
    with open_safetensors(path, FORMAT, "e4e encoder file", _WRITER) as f:
        _check_config(f.metadata, path)
        _check_dtypes(path)
        module = _meta_encoder()
        expected = _expected_shapes(module)
        expected[LATENT_AVG] = (STYLE_COUNT, LATENT_DIM)
        check_shapes(path, f.shapes, expected, "the e4e encoder (IR-SE-50, 18 styles)", _REWRITE)
        tensors = f.tensors()
    latent_avg = tensors.pop(LATENT_AVG).to(torch.float32).clone()
    encoder = _materialize(module, {k[len(ENCODER_PREFIX):]: v for k, v in tensors.items()})
    return E4EWeights(encoder=encoder, latent_avg=latent_avg)


# --- the official checkpoint -------------------------------------------------------------------------------------


def _read_official(path: str) -> dict:
    """The unpickled official checkpoint, tensors memory-mapped (nothing read yet)."""
    fix = (f"{_OFFICIAL_FIX}: its tensors-only layout reads as it is; or an e4e/1 safetensors file written by "
           f"{_WRITER}")
    checkpoint = read_tensors_only(path, "official e4e checkpoint", fix)
    if not isinstance(checkpoint, dict):
        raise ModelFileError(f"{path} holds a {type(checkpoint).__name__}, expected the pSp-framework checkpoint "
                             f"dict {{'state_dict', 'opts', 'latent_avg'}}. {_OFFICIAL_FIX}")
    return checkpoint


def _check_opts(path: str, checkpoint: dict) -> None:
    opts = checkpoint.get("opts")
    if not isinstance(opts, dict):
        raise ModelFileError(
            f"{path} has no 'opts' dict ({type(opts).__name__}): without the training options an e4e encoder cannot "
            f"be told apart from a pSp encoder of the very same shapes. {_OFFICIAL_FIX}")
    encoder_type = opts.get("encoder_type")
    if encoder_type != "Encoder4Editing":
        known = {"GradualStyleEncoder": "a pSp encoder: it predicts every style independently, e4e predicts one "
                                        "style and offsets from it",
                 "SingleStyleCodeEncoder": "a single-W encoder",
                 "BackboneEncoder": "a ReStyle encoder (iterative, 6-channel input)",
                 "ProgressiveBackboneEncoder": "a ReStyle e4e encoder (iterative, 6-channel input)",
                 "ResNetBackboneEncoder": "a ReStyle encoder (ResNet backbone)",
                 "ResNetProgressiveBackboneEncoder": "a ReStyle e4e encoder (ResNet backbone)"}
        what = known.get(encoder_type, "not e4e's encoder") if isinstance(encoder_type, str) else "not e4e's encoder"
        raise ModelFileError(f"{path}: opts['encoder_type'] is {encoder_type!r} ({what}), expected "
                             f"'Encoder4Editing'. {_OFFICIAL_FIX}")
    size = opts.get("stylegan_size", STYLEGAN_SIZE)  # absent: the tensor shapes decide
    if isinstance(size, bool) or not isinstance(size, int) or size != STYLEGAN_SIZE:
        raise ModelFileError(
            f"{path}: opts['stylegan_size'] is {size!r}, expected {STYLEGAN_SIZE} (the FFHQ StyleGAN2, {STYLE_COUNT} "
            f"styles, the W+ the W+ adapter reads; e4e's cars/church/horse encoders invert smaller generators). "
            f"{_OFFICIAL_FIX}")
    if opts.get("start_from_latent_avg", True) is not True:
        raise ModelFileError(
            f"{path}: opts['start_from_latent_avg'] is {opts.get('start_from_latent_avg')!r}: this encoder predicts "
            f"W+ itself, not an offset from latent_avg as the FFHQ e4e encoder (and the W+ adapter) do. "
            f"{_OFFICIAL_FIX}")


def _official_latent_avg(path: str, checkpoint: dict) -> torch.Tensor:
    if LATENT_AVG not in checkpoint:
        raise ModelFileError(
            f"{path} has no 'latent_avg' (the average W+ the encoder's offsets start from). The official code would "
            f"then estimate it from 10,000 random samples of the decoder's mapping network, which this pack does "
            f"not run. {_OFFICIAL_FIX}: it carries latent_avg [{STYLE_COUNT}, {LATENT_DIM}]")
    latent_avg = checkpoint[LATENT_AVG]
    if not isinstance(latent_avg, torch.Tensor) or tuple(latent_avg.shape) not in LATENT_AVG_SHAPES:
        got = list(latent_avg.shape) if isinstance(latent_avg, torch.Tensor) else type(latent_avg).__name__
        raise ModelFileError(f"{path}: latent_avg is {got}, expected a tensor of shape "
                             f"{' or '.join(str(list(s)) for s in LATENT_AVG_SHAPES)}. {_OFFICIAL_FIX}")
    if not latent_avg.is_floating_point() or not torch.isfinite(latent_avg).all():
        raise ModelFileError(f"{path}: latent_avg is not finite floating-point numbers ({latent_avg.dtype}). "
                             f"{_OFFICIAL_FIX}")
    # [512] and [1, 512] broadcast over the rows, as the official codes + latent_avg.repeat(B, 1, 1) does
    return latent_avg.to(torch.float32).reshape(-1, LATENT_DIM).expand(STYLE_COUNT, LATENT_DIM).clone()


def load_official_e4e(path: str) -> E4EWeights:
    """The encoder and ``latent_avg`` of the official ``e4e_ffhq_encode.pt`` (pSp framework: ``state_dict`` with
    ``encoder.*`` and ``decoder.*``, ``opts``, ``latent_avg``); the decoder is ignored. Nothing in the pickle runs,
    and every encoder tensor's name and shape is compared with a ``meta``-device module before anything is
    allocated; NaN or infinite values are refused."""
    checkpoint = _read_official(path)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        top = sorted(str(k) for k in checkpoint)[:8]
        raise ModelFileError(f"{path} has no 'state_dict' (its top-level keys: {top}), expected the pSp-framework "
                             f"checkpoint {{'state_dict', 'opts', 'latent_avg'}}. {_OFFICIAL_FIX}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelFileError(f"{path}: state_dict entry {bad[0]!r} is not a named tensor. {_OFFICIAL_FIX}")
    encoder_names = sorted(k for k in state if k.startswith(ENCODER_PREFIX))
    if not encoder_names:
        others = sorted({k.split(".", 1)[0] for k in state})
        raise ModelFileError(
            f"{path} holds no encoder weights ('encoder.*'), only {others}: a StyleGAN2 generator or a decoder-only "
            f"file, expected the e4e encoder with its decoder. {_OFFICIAL_FIX}")
    _check_opts(path, checkpoint)
    latent_avg = _official_latent_avg(path, checkpoint)

    module = _meta_encoder()
    counters = {ENCODER_PREFIX + k for k in module.state_dict() if k.endswith(_BATCHES_TRACKED)}
    # the BatchNorm batch counters are optional (bookkeeping), but only where the module has a BatchNorm
    shapes = {k: tuple(state[k].shape) for k in encoder_names if k not in counters}
    check_shapes(path, shapes, _expected_shapes(module), "e4e's encoder (Encoder4Editing, IR-SE-50, 18 styles)",
                 _OFFICIAL_FIX)
    encoder_state = {}
    for name in shapes:
        tensor = state[name]
        if not tensor.is_floating_point():
            raise ModelFileError(f"{path}: {name!r} is {tensor.dtype}, expected floating-point weights. "
                                 f"{_OFFICIAL_FIX}")
        if not torch.isfinite(tensor).all():
            raise ModelFileError(f"{path}: {name!r} holds NaN or infinite values, expected finite numbers; the file "
                                 f"is damaged or came from a diverged run. {_OFFICIAL_FIX}")
        encoder_state[name[len(ENCODER_PREFIX):]] = tensor
    return E4EWeights(encoder=_materialize(module, encoder_state), latent_avg=latent_avg)


def load_e4e_file(path: str) -> E4EWeights:
    """Either kind of e4e file, told apart by content: ``e4e/1`` safetensors, or the official ``.pt``."""
    return load_e4e(path) if looks_like_safetensors(path) else load_official_e4e(path)


def convert_official_e4e(pt_path: str, out_path: str, overwrite: bool = False,
                         dtype: torch.dtype = torch.float32) -> E4EWeights:
    """Writes the encoder and latent_avg of the official ``e4e_ffhq_encode.pt`` as an ``e4e/1`` file (float32 by
    default, as released); returns what it wrote. An existing ``out_path`` is kept unless ``overwrite``."""
    if dtype not in SAVE_DTYPES:
        raise ConfigError(f"dtype {dtype} is not one of {[str(d) for d in SAVE_DTYPES]}: use float32 (as released) "
                          f"or float16 (half the size)")
    if os.path.exists(out_path) and not overwrite:
        raise ConfigError(f"{out_path} already exists; choose another output file, or allow overwriting it "
                          f"(overwrite=True)")
    weights = load_official_e4e(pt_path)
    save_e4e(weights, out_path, dtype)
    return weights
