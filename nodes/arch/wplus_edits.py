"""Edits of StyleGAN W+ codes ([18, 512] or [B, 18, 512], what e4e gives) as the W+ adapter's official code makes
them (reference/official-checkpoints.md §3.5 and §5; script/utils_direction.py and test_demo.ipynb):

- InterFaceGAN (``w_direction/interfacegan_directions/{age,smile}.pt``, a W-space direction [1, 512]):
  repeated over the 18 rows, ``w' = w + k * d`` on **every** row (:func:`apply_interfacegan`). e4e's ``pose.pt``
  ([1, 18, 512]) is added the same way.
- Latent directions (``w_direction/latent_directions/*.npy``, float64 [18, 512]): ``w' = w + k * d`` on the first
  8 rows only, the other rows unchanged (:func:`apply_latent_direction`; the row range can be changed).
- GANSpace (``ffhq_pca.pt`` = ``{'mean': [1, 512], 'comp': [80, 1, 512], 'std': [80]}``; ``ganspace_configs.csv``
  = name, pca index, start row, end row, strength, held here as :data:`GANSPACE_EDITS`): the official
  ``get_delta``::

      coord = sum((w[0] - mean) * comp[c]) / std[c]        # row 0's coordinate along component c, in std units
      delta = (strength - coord) * comp[c] * std[c]          # added to rows start:end

  so ``strength`` is the absolute target coordinate (measured on row 0), not a step; ``relative=True`` gives the
  plain step ``delta = strength * std[c] * comp[c]`` instead (zero strength = no change).
  :func:`apply_named_ganspace` applies a named edit of the table: its component, rows and (scaled) strength.
- :func:`interpolate`: ``(1 - t) * a + t * b`` (exactly a at t = 0 and b at t = 1).

Sums are formed in float64 (the official latent directions are float64, so the official notebook's sums are too)
and rounded once to the code's dtype.

Direction files are read without unpickling anything: ``.npy`` through numpy with ``allow_pickle=False`` after the
header (dtype, shape) has been checked, ``.pt`` through ``torch.load(weights_only=True)``
(``files.read_tensors_only``). Shapes are checked and NaN or infinite values refused. W+ codes are saved as
safetensors (format ``wplus-code/1``, one tensor ``wplus`` [B, 18, 512] float32); the official e4e outputs
(``test_data/e4e/*.pth``, a tensor [1, 18, 512]) load too.

Just over 450 lines: the three official edit kinds and the readers of their files, each checked as above.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, ModelFileError
from .files import check_regular_file, open_safetensors, read_tensors_only, write_safetensors
from .wplus import W_DIM, W_ROWS

FORMAT = "wplus-code/1"
LATENT_DIRECTION_LAYERS = (0, 8)  # the official notebook: id_noise[:, :8] = (id_noise0 + i * direction)[:, :8]
MAX_DIRECTION_BYTES = 16 << 20  # ffhq_pca.pt is ~165 KB, an [18, 512] float64 direction 74 KB
MAX_CODES = 4096  # W+ codes in one file
_CODE_WRITER = "save_wplus_code (the W+ Encode node)"
_DIRECTION_FIX = ("Use a direction file as released with the W+ adapter or e4e: an InterFaceGAN .pt [1, 512], a "
                  "latent-direction .npy [18, 512], or GANSpace's ffhq_pca.pt")


@dataclass(frozen=True)
class Direction:
    """A direction in W+ (``vector`` [18, 512] float64) and the rows it is applied to by default."""

    vector: torch.Tensor
    start: int = 0
    end: int = W_ROWS
    kind: str = "interfacegan"  # "interfacegan": every row (official); "latent": an [18, 512] .npy, rows 0:8


@dataclass(frozen=True)
class GanSpace:
    """GANSpace PCA of W: ``mean`` [512], ``components`` [K, 512], ``stdev`` [K] (float64)."""

    mean: torch.Tensor
    components: torch.Tensor
    stdev: torch.Tensor


@dataclass(frozen=True)
class GanSpaceEdit:
    """One named GANSpace edit: principal component ``index``, W+ rows ``start``..``end - 1`` and ``strength``, the
    target coordinate (in standard deviations along the component) e4e's editing code applies it with. The W+
    adapter's ``get_direction_from_ganspace`` reads the same table but takes the strength from its caller."""

    index: int
    start: int
    end: int
    strength: float


# The named edits of GANSpace's FFHQ table (``ganspace_configs.csv``, released with the W+ adapter under
# ``w_direction/``; e4e's editing examples use the same rows), for GANSpace's ``ffhq_pca.pt`` (80 components).
GANSPACE_EDITS = {
    "frizzy_hair":             GanSpaceEdit(31,  2,  6,  20.0),
    "background_blur":         GanSpaceEdit(49,  6,  9,  20.0),
    "bald":                    GanSpaceEdit(21,  2,  5,  20.0),
    "big_smile":               GanSpaceEdit(19,  4,  5,  20.0),
    "caricature_smile":        GanSpaceEdit(26,  3,  8,  13.0),
    "scary_eyes":              GanSpaceEdit(33,  6,  8,  20.0),
    "curly_hair":              GanSpaceEdit(47,  3,  6,  20.0),
    "dark_bg_shiny_hair":      GanSpaceEdit(13,  8,  9,  20.0),
    "dark_hair_and_light_pos": GanSpaceEdit(14,  8,  9,  20.0),
    "dark_hair":               GanSpaceEdit(16,  8,  9,  20.0),
    "disgusted":               GanSpaceEdit(43,  6,  8, -30.0),
    "displeased":              GanSpaceEdit(36,  4,  7,  20.0),
    "eye_openness":            GanSpaceEdit(54,  7,  8,  20.0),
    "eye_wrinkles":            GanSpaceEdit(28,  6,  8,  20.0),
    "eyebrow_thickness":       GanSpaceEdit(37,  8,  9,  20.0),
    "face_roundness":          GanSpaceEdit(37,  0,  5,  20.0),
    "fearful_eyes":            GanSpaceEdit(54,  4, 10,  20.0),
    "hairline":                GanSpaceEdit(21,  4,  5, -20.0),
    "happy_frizzy_hair":       GanSpaceEdit(30,  0,  8,  20.0),
    "happy_elderly_lady":      GanSpaceEdit(27,  4,  7,  20.0),
    "head_angle_up":           GanSpaceEdit(11,  1,  4,  20.0),
    "huge_grin":               GanSpaceEdit(28,  4,  6,  20.0),
    "in_awe":                  GanSpaceEdit(23,  3,  6, -15.0),
    "wide_smile":              GanSpaceEdit(23,  3,  6,  20.0),
    "large_jaw":               GanSpaceEdit(22,  3,  6,  20.0),
    "light_lr":                GanSpaceEdit(15,  8,  9,  10.0),
    "lipstick_and_age":        GanSpaceEdit(34,  6, 11,  20.0),
    "lipstick":                GanSpaceEdit(34, 10, 11,  20.0),
    "mascara_vs_beard":        GanSpaceEdit(41,  6,  9,  20.0),
    "nose_length":             GanSpaceEdit(51,  4,  5, -20.0),
    "elderly_woman":           GanSpaceEdit(34,  6,  7,  20.0),
    "overexposed":             GanSpaceEdit(27,  8, 18,  15.0),
    "screaming":               GanSpaceEdit(35,  3,  7, -15.0),
    "short_face":              GanSpaceEdit(32,  2,  6, -20.0),
    "show_front_teeth":        GanSpaceEdit(59,  4,  5,  40.0),
    "smile":                   GanSpaceEdit(46,  4,  5, -20.0),
    "straight_bowl_cut":       GanSpaceEdit(20,  4,  5, -20.0),
    "sunlight_in_face":        GanSpaceEdit(10,  8,  9,  10.0),
    "trimmed_beard":           GanSpaceEdit(58,  7,  9,  20.0),
    "white_hair":              GanSpaceEdit(57,  7, 10, -24.0),
    "wrinkles":                GanSpaceEdit(20,  6,  7, -18.0),
    "boyishness":              GanSpaceEdit( 8,  2,  5,  20.0),
}
CUSTOM_EDIT = "custom"  # the W+ Edit node's choice for a component and rows of the user's own


# ---- checks of what a node or trainer passes in


def check_wplus(w: torch.Tensor, what: str = "W+ code") -> torch.Tensor:
    """``w`` when it is a finite floating tensor [18, 512] or [B, 18, 512]."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ConfigError(f"the {what} must be a floating-point tensor, got "
                          f"{type(w).__name__ if not isinstance(w, torch.Tensor) else w.dtype}")
    if w.ndim not in (2, 3) or tuple(w.shape[-2:]) != (W_ROWS, W_DIM) or (w.ndim == 3 and w.shape[0] < 1):
        raise ConfigError(f"the {what} must be shaped [{W_ROWS}, {W_DIM}] or [batch, {W_ROWS}, {W_DIM}] "
                          f"(StyleGAN2 FFHQ W+, what e4e gives), got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ConfigError(f"the {what} holds NaN or infinite values")
    return w


def _layers(start: int, end: int) -> tuple[int, int]:
    for name, value in (("start layer", start), ("end layer", end)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"the {name} must be an integer, got {value!r}")
    if not 0 <= start < end <= W_ROWS:
        raise ConfigError(f"the layer range {start}..{end} must satisfy 0 <= start < end <= {W_ROWS} (rows "
                          f"start..end-1 of the {W_ROWS} W+ rows are edited)")
    return start, end


def _finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"the {name} must be a finite number, got {value!r}")
    return float(value)


def _direction_rows(direction: Direction | torch.Tensor) -> torch.Tensor:
    """A direction as [18, 512] float64: [512] and [1, 512] (W space) repeated over the rows, as the official code."""
    vector = direction.vector if isinstance(direction, Direction) else direction
    if not isinstance(vector, torch.Tensor) or not vector.is_floating_point():
        raise ConfigError("a direction must be a floating-point tensor")
    shape = tuple(vector.shape)
    if shape in ((W_DIM,), (1, W_DIM)):
        vector = vector.reshape(1, W_DIM).expand(W_ROWS, W_DIM)
    elif shape in ((W_ROWS, W_DIM), (1, W_ROWS, W_DIM)):
        vector = vector.reshape(W_ROWS, W_DIM)
    else:
        raise ConfigError(f"a direction must be shaped [{W_DIM}], [1, {W_DIM}], [{W_ROWS}, {W_DIM}] or "
                          f"[1, {W_ROWS}, {W_DIM}], got {shape}")
    if not torch.isfinite(vector).all():
        raise ConfigError("the direction holds NaN or infinite values")
    return vector.to(torch.float64)


def _add_on_rows(w: torch.Tensor, delta: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """``w`` with ``delta`` (broadcast to [..., end-start, 512], float64) added on rows start:end; the sum is formed
    in float64 on the CPU (some accelerators have no float64) and rounded once to w's dtype. Other rows are copied
    unchanged."""
    out = w.clone()
    rows = w[..., start:end, :].detach().cpu().to(torch.float64) + delta.cpu()
    out[..., start:end, :] = rows.to(w.dtype).to(w.device)
    return out


# ---- edits


def apply_direction(w: torch.Tensor, direction: Direction | torch.Tensor, strength: float,
                    start: int | None = None, end: int | None = None) -> torch.Tensor:
    """``w + strength * direction`` on rows start..end-1 (default: the Direction's rows, all 18 for a plain
    tensor); the other rows unchanged. Strength 0 returns an unchanged copy."""
    check_wplus(w)
    strength = _finite_number("strength", strength)
    default = (direction.start, direction.end) if isinstance(direction, Direction) else (0, W_ROWS)
    start, end = _layers(default[0] if start is None else start, default[1] if end is None else end)
    rows = _direction_rows(direction)
    if strength == 0:
        return w.clone()
    return _add_on_rows(w, strength * rows[start:end], start, end)


def apply_interfacegan(w: torch.Tensor, direction: Direction | torch.Tensor, strength: float) -> torch.Tensor:
    """The official InterFaceGAN edit: the [1, 512] direction repeated over the 18 rows, ``w + k * d`` on every row."""
    return apply_direction(w, direction, strength, 0, W_ROWS)


def apply_latent_direction(w: torch.Tensor, direction: Direction | torch.Tensor, strength: float,
                           start: int = LATENT_DIRECTION_LAYERS[0], end: int = LATENT_DIRECTION_LAYERS[1]
                           ) -> torch.Tensor:
    """The official latent-direction edit: ``w + k * d`` on the first 8 rows (by default), the rest unchanged."""
    return apply_direction(w, direction, strength, start, end)


def _component(pca: GanSpace, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    count = pca.components.shape[0]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ConfigError(f"the GANSpace component index must be an integer from 0 to {count - 1}, got {index!r}")
    return pca.components[index].to(torch.float64), pca.stdev[index].to(torch.float64)


def ganspace_coordinate(w: torch.Tensor, pca: GanSpace, index: int) -> torch.Tensor:
    """Row 0's coordinate along component ``index`` in units of its stdev (official ``w_coord``), one per code
    (float64, on the CPU)."""
    check_wplus(w)
    component, stdev = _component(pca, index)
    centered = w[..., 0, :].detach().cpu().to(torch.float64) - pca.mean.cpu().to(torch.float64)
    return (centered * component.cpu()).sum(-1) / stdev.cpu()


def ganspace_delta(w: torch.Tensor, pca: GanSpace, index: int, strength: float,
                   relative: bool = False) -> torch.Tensor:
    """The official ``get_delta``: ``(strength - coord) * comp[index] * std[index]`` [..., 512] (float64, on the
    CPU); ``relative``: ``strength * std[index] * comp[index]``."""
    strength = _finite_number("strength", strength)
    component, stdev = _component(pca, index)
    coefficient = torch.full(w.shape[:-2], strength, dtype=torch.float64)
    if not relative:
        coefficient = coefficient - ganspace_coordinate(w, pca, index)
    return coefficient.unsqueeze(-1) * component.cpu() * stdev.cpu()


def apply_ganspace(w: torch.Tensor, pca: GanSpace, index: int, strength: float, start: int, end: int,
                   relative: bool = False) -> torch.Tensor:
    """``w`` with :func:`ganspace_delta` added on rows start..end-1 (the official edit; ``relative``: a plain step,
    where strength 0 returns an unchanged copy)."""
    check_wplus(w)
    start, end = _layers(start, end)
    delta = ganspace_delta(w, pca, index, strength, relative)
    if relative and strength == 0:
        return w.clone()
    return _add_on_rows(w, delta.unsqueeze(-2), start, end)


def apply_named_ganspace(w: torch.Tensor, pca, name: str, scale: float = 1.0, start: int | None = None,
                         end: int | None = None, relative: bool = False) -> torch.Tensor:
    """The named edit ``name`` of :data:`GANSPACE_EDITS`: its component on its rows (``start``/``end`` override
    them), with ``scale`` times its strength (1: the edit as e4e applies it; -1: towards the other side). ``pca``
    must be GANSpace's PCA (what ``load_direction`` gives for ``ffhq_pca.pt``)."""
    edit = GANSPACE_EDITS.get(name)
    if edit is None:
        raise ConfigError(f"unknown GANSpace edit {name!r}; the named edits are {sorted(GANSPACE_EDITS)}")
    if not isinstance(pca, GanSpace):
        given = "an InterFaceGAN or latent direction" if isinstance(pca, Direction) else type(pca).__name__
        raise ConfigError(f"the GANSpace edit {name!r} needs GANSpace's ffhq_pca.pt as the direction, got {given}: "
                          f"choose ffhq_pca.pt, or the edit 'custom' for other directions")
    if edit.index >= pca.components.shape[0]:
        raise ConfigError(f"the GANSpace edit {name!r} uses principal component {edit.index}, but this PCA has "
                          f"{pca.components.shape[0]} components; the named edits are for GANSpace's FFHQ "
                          f"ffhq_pca.pt (80 components)")
    strength = _finite_number("strength", scale) * edit.strength
    return apply_ganspace(w, pca, edit.index, strength, edit.start if start is None else start,
                          edit.end if end is None else end, relative)


def interpolate(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """``(1 - t) * a + t * b``, exactly ``a`` at t = 0 and ``b`` at t = 1 (t outside 0..1 extrapolates)."""
    check_wplus(a, "first W+ code")
    check_wplus(b, "second W+ code")
    t = _finite_number("interpolation factor", t)
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError as exc:
        raise ConfigError(f"cannot interpolate W+ codes of shapes {tuple(a.shape)} and {tuple(b.shape)}: give the "
                          "same number of codes, or one") from exc
    return torch.lerp(a, b.to(a), t)  # lerp is exact at both ends (it switches formula at t = 0.5)


# ---- direction files (never unpickled)


def _file_size(path: str, limit: int, what: str) -> int:
    check_regular_file(path, what)
    size = os.path.getsize(path)
    if size > limit:
        raise ModelFileError(f"{path} is {size} bytes, more than a {what} can be ({limit}). {_DIRECTION_FIX}")
    return size


def _direction_from(path: str, vector: torch.Tensor, npy: bool) -> Direction:
    """A checked direction tensor -> :class:`Direction` with the official default rows: an [18, 512] .npy (a latent
    direction) rows 0:8, anything in W ([1, 512]) or a W+ .pt (e4e's pose.pt) every row."""
    shape = tuple(vector.shape)
    if shape not in ((W_DIM,), (1, W_DIM), (W_ROWS, W_DIM), (1, W_ROWS, W_DIM)):
        raise ModelFileError(f"{path} holds a direction shaped {shape}, expected [{W_DIM}], [1, {W_DIM}], "
                             f"[{W_ROWS}, {W_DIM}] or [1, {W_ROWS}, {W_DIM}]. {_DIRECTION_FIX}")
    if not vector.is_floating_point():
        raise ModelFileError(f"{path} holds {vector.dtype} values, expected floating-point. {_DIRECTION_FIX}")
    if not torch.isfinite(vector).all():
        raise ModelFileError(f"{path}: the direction holds NaN or infinite values. {_DIRECTION_FIX}")
    rows = _direction_rows(vector).clone(memory_format=torch.contiguous_format)  # nothing refers to the file after
    if npy and shape[-2:] == (W_ROWS, W_DIM):
        return Direction(rows, *LATENT_DIRECTION_LAYERS, kind="latent")
    return Direction(rows, 0, W_ROWS, kind="interfacegan")


def load_npy_direction(path: str) -> Direction:
    """A ``.npy`` direction; the header (dtype, shape) is checked before any data is read, object arrays (pickles)
    are refused, and numpy reads the data with ``allow_pickle=False``."""
    _file_size(path, MAX_DIRECTION_BYTES, "direction file")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version} (directions are written as 1.0 or 2.0)")
    except (ValueError, OSError, EOFError) as exc:
        raise ModelFileError(f"{path} is not a readable .npy file ({type(exc).__name__}: {str(exc)[:200]}). "
                             f"{_DIRECTION_FIX}") from exc
    if dtype.hasobject:
        raise ModelFileError(f"{path} holds Python objects (a pickled object array), not numbers; it is refused "
                             f"without being unpickled. {_DIRECTION_FIX}")
    if dtype.kind != "f":
        raise ModelFileError(f"{path} holds {dtype} values, expected floating-point. {_DIRECTION_FIX}")
    if tuple(shape) not in ((W_DIM,), (1, W_DIM), (W_ROWS, W_DIM), (1, W_ROWS, W_DIM)):
        raise ModelFileError(f"{path} holds an array shaped {tuple(shape)}, expected [{W_DIM}], [1, {W_DIM}], "
                             f"[{W_ROWS}, {W_DIM}] or [1, {W_ROWS}, {W_DIM}]. {_DIRECTION_FIX}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # truncated data
        raise ModelFileError(f"{path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}). "
                             f"{_DIRECTION_FIX}") from exc
    return _direction_from(path, torch.from_numpy(np.ascontiguousarray(array)), npy=True)


def _ganspace_from(path: str, data: Mapping) -> GanSpace:
    missing = [k for k in ("mean", "comp", "std") if k not in data]
    if missing:
        raise ModelFileError(f"{path} holds a dict with keys {sorted(map(str, data))[:8]}, missing {missing}; "
                             f"expected GANSpace's {{'mean', 'comp', 'std'}}. {_DIRECTION_FIX}")
    mean, comp, std = data["mean"], data["comp"], data["std"]
    for name, value in (("mean", mean), ("comp", comp), ("std", std)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ModelFileError(f"{path}: GANSpace {name!r} is a {type(value).__name__}"
                                 f"{f' of {value.dtype}' if isinstance(value, torch.Tensor) else ''}, expected a "
                                 f"floating-point tensor. {_DIRECTION_FIX}")
    count = std.shape[0] if std.ndim == 1 else -1
    problems = []
    if tuple(mean.shape) not in ((W_DIM,), (1, W_DIM)):
        problems.append(f"mean is shaped {tuple(mean.shape)}, expected [1, {W_DIM}]")
    if not 1 <= count <= W_DIM:
        problems.append(f"std is shaped {tuple(std.shape)}, expected [K] with 1 <= K <= {W_DIM}")
    elif tuple(comp.shape) not in ((count, 1, W_DIM), (count, W_DIM)):
        problems.append(f"comp is shaped {tuple(comp.shape)}, expected [{count}, 1, {W_DIM}] (one per std)")
    if problems:
        raise ModelFileError(f"{path}: {'; '.join(problems)}. {_DIRECTION_FIX}")
    for name, value in (("mean", mean), ("comp", comp), ("std", std)):
        if not torch.isfinite(value).all():
            raise ModelFileError(f"{path}: GANSpace {name!r} holds NaN or infinite values. {_DIRECTION_FIX}")
    if not (std > 0).all():
        raise ModelFileError(f"{path}: GANSpace 'std' holds values <= 0, expected positive stdevs. {_DIRECTION_FIX}")
    return GanSpace(mean.reshape(W_DIM).to(torch.float64, copy=True),
                    comp.reshape(count, W_DIM).to(torch.float64, copy=True), std.to(torch.float64, copy=True))


def load_pt_direction(path: str) -> Direction | GanSpace:
    """A ``.pt`` direction (a tensor: InterFaceGAN [1, 512], e4e's pose [1, 18, 512]) or GANSpace PCA (a dict)."""
    _file_size(path, MAX_DIRECTION_BYTES, "direction file")
    data = read_tensors_only(path, "direction file", _DIRECTION_FIX)
    if isinstance(data, torch.Tensor):
        return _direction_from(path, data.detach(), npy=False)
    if isinstance(data, Mapping):
        return _ganspace_from(path, data)
    raise ModelFileError(f"{path} holds a {type(data).__name__}, expected a tensor (a direction) or GANSpace's dict "
                         f"{{'mean', 'comp', 'std'}}. {_DIRECTION_FIX}")


def load_direction(path: str) -> Direction | GanSpace:
    """Any direction file by its extension: ``.npy`` or ``.pt``/``.pth``."""
    extension = os.path.splitext(path)[1].lower()
    if extension == ".npy":
        return load_npy_direction(path)
    if extension in (".pt", ".pth"):
        return load_pt_direction(path)
    raise ModelFileError(f"{path}: direction files end in .npy, .pt or .pth. {_DIRECTION_FIX}")


# ---- W+ code files


def save_wplus_code(w: torch.Tensor, path: str, *, replace: bool = True) -> None:
    """Writes W+ codes ([18, 512] or [B, 18, 512]) as ``wplus-code/1`` safetensors, float32, atomically;
    ``replace=False``: FileExistsError if ``path`` exists."""
    w = check_wplus(w)
    if w.ndim == 2:
        w = w.unsqueeze(0)
    if w.shape[0] > MAX_CODES:
        raise ConfigError(f"{w.shape[0]} W+ codes in one file; at most {MAX_CODES}")
    write_safetensors({"wplus": w.detach().to("cpu", torch.float32).contiguous()}, path, {"format": FORMAT},
                      replace=replace)


def load_wplus_code(path: str) -> torch.Tensor:
    """W+ codes [B, 18, 512] float32 from a ``wplus-code/1`` file or an official e4e ``.pth``/``.pt`` (a tensor)."""
    expected = f"[batch <= {MAX_CODES}, {W_ROWS}, {W_DIM}]"
    if os.path.splitext(path)[1].lower() in (".pt", ".pth"):
        fix = "Expected a W+ code saved by e4e (torch.save of a [1, 18, 512] tensor)"
        _file_size(path, MAX_CODES * W_ROWS * W_DIM * 8 + (1 << 20), "W+ code file")
        data = read_tensors_only(path, "W+ code file", fix)
        if not isinstance(data, torch.Tensor):
            raise ModelFileError(f"{path} holds a {type(data).__name__}, expected a tensor {expected}. {fix}")
        w = data.detach()
        if w.ndim == 2:
            w = w.unsqueeze(0)
        if w.ndim != 3 or tuple(w.shape[1:]) != (W_ROWS, W_DIM) or not 1 <= w.shape[0] <= MAX_CODES \
                or not w.is_floating_point():
            raise ModelFileError(f"{path} holds a {w.dtype} tensor shaped {tuple(data.shape)}, expected a "
                                 f"floating-point {expected}. {fix}")
        if not torch.isfinite(w).all():
            raise ModelFileError(f"{path}: the W+ code holds NaN or infinite values. {fix}")
        return w.to(torch.float32, copy=True)
    with open_safetensors(path, FORMAT, "W+ code file", _CODE_WRITER) as f:
        shape = f.shapes.get("wplus")
        if set(f.shapes) != {"wplus"} or len(shape) != 3 or tuple(shape[1:]) != (W_ROWS, W_DIM) \
                or not 1 <= shape[0] <= MAX_CODES:
            raise ModelFileError(f"{path} holds tensors { {k: v for k, v in list(f.shapes.items())[:4]} }, expected "
                                 f"exactly 'wplus' {expected}. Write it again with {_CODE_WRITER}")
        w = f.tensors()["wplus"]  # refuses NaN and infinities
    if not w.is_floating_point():
        raise ModelFileError(f"{path}: 'wplus' is {w.dtype}, expected floating-point. Write it again with "
                             f"{_CODE_WRITER}")
    return w.to(torch.float32, copy=True)
