"""Per-block weights of the UNet patches (Apply IDAdapter, Apply W+ Adapter): a preset plus a compact text form.

A block is a transformer block under its pack name (``input_4_0``: ComfyUI's ("input", 4) SpatialTransformer,
transformer 0). The text form is ``key: weight`` entries separated by commas, semicolons or new lines; later
entries override earlier ones. A key is

- a resolution level: the side of the block's token grid at the family's native resolution (SD1.5 at 512²: 64,
  32, 16, 8; SDXL at 1024²: 64, 32), so ``64: 0`` switches off the highest-resolution blocks;
- ``input``, ``middle`` or ``output``: every block of that part of the UNet;
- a UNet block (``input_4``: all of its transformers) or one transformer (``input_4_0``).

A weight multiplies the node's own weight (IDAdapter's beta, W+'s alpha) in that block, the K/V deltas included; 0
leaves the block exactly as the plain UNet runs it (and saves its cost).
"""

from __future__ import annotations

import math
import re

from ..errors import ConfigError

PARTS = ("input", "middle", "output")
NATIVE_RESOLUTION = {"sd15": 512, "sd21": 768, "sdxl": 1024}
PRESETS = {
    "paper": "every block at 1: what the paper trains and evaluates",
    "speed": "off in the highest-resolution blocks, which hold most of the patch's cost (SD1.5: the 64 level)",
    "appearance": "output blocks only: by analogy with IPAdapter's style presets, the identity's look without "
                  "steering the layout the encoder blocks set",
    "composition": "input and middle blocks only: by analogy with IPAdapter's composition presets, the identity's "
                   "pose and placement more than its details",
}
_SEPARATORS = re.compile(r"[,;\n]")


def block_levels(downscales: dict[str, int], family: str) -> dict[str, int]:
    """Each block's level (its token-grid side at ``family``'s native resolution) from its downscale factor
    relative to the latent (1 for the blocks at the latent's own size)."""
    if family not in NATIVE_RESOLUTION:
        raise ConfigError(f"no native resolution known for the {family!r} family (known: {sorted(NATIVE_RESOLUTION)})")
    latent_side = NATIVE_RESOLUTION[family] // 8
    return {name: latent_side // factor for name, factor in downscales.items()}


def preset_text(preset: str, levels: dict[str, int]) -> str:
    """A preset in the text form, for these blocks."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown block preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return {"paper": "", "speed": f"{max(levels.values())}: 0" if levels else "",
            "appearance": "input: 0, middle: 0", "composition": "output: 0"}[preset]


def block_weights(preset: str, text: str, levels: dict[str, int]) -> dict[str, float]:
    """Every block's weight: the preset, then the entries of ``text`` on top. ``levels``: {block name: level}
    (:func:`block_levels`) of the blocks the patch covers."""
    weights = dict.fromkeys(levels, 1.0)
    for source, given in ((preset_text(preset, levels), False), (text or "", True)):
        for key, weight in _entries(source, levels):
            for name in _blocks_of(key, levels, must_exist=given):  # a preset may name a part a file lacks
                weights[name] = weight
    return weights


def describe_keys(levels: dict[str, int]) -> str:
    """The valid keys for these blocks, for error messages."""
    if not levels:
        return "none (the patch covers no transformer block)"
    units = sorted({name.rsplit("_", 1)[0] for name in levels}, key=_order)
    return (f"levels {', '.join(str(v) for v in sorted(set(levels.values()), reverse=True))}; "
            f"parts {', '.join(PARTS)}; blocks {', '.join(units)} (or one transformer, e.g. {min(levels, key=_order)})")


def _entries(text: str, levels: dict[str, int]):
    for raw in _SEPARATORS.split(text):
        entry = raw.strip()
        if not entry:
            continue
        key, sep, value = entry.partition(":")
        if not sep:
            key, sep, value = entry.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"block weight entry {entry!r} is not 'key: weight' (e.g. '64: 0, output: 1'); "
                              f"valid keys: {describe_keys(levels)}")
        if not (key + value).isascii():  # str.isdigit and float() also take '²', '６４', Arabic-Indic digits...
            raise ConfigError(f"block weight entry {entry!r}: write keys and weights in plain ASCII (digits 0-9, "
                              f"e.g. '64: 0, output_9: 0.5'); valid keys: {describe_keys(levels)}")
        try:
            weight = float(value)
        except ValueError:
            raise ConfigError(f"block weight entry {entry!r}: {value!r} is not a number") from None
        if not math.isfinite(weight) or abs(weight) > 10:
            raise ConfigError(f"block weight entry {entry!r}: the weight must be a finite number in [-10, 10]")
        yield key, weight


def _blocks_of(key: str, levels: dict[str, int], must_exist: bool) -> list[str]:
    if key.isdigit():
        chosen = [name for name, level in levels.items() if level == int(key)]
    elif key in PARTS:
        chosen = [name for name in levels if name.startswith(key + "_")]
    else:
        chosen = [name for name in levels if name == key or name.rsplit("_", 1)[0] == key]
    if not chosen and must_exist:
        raise ConfigError(f"block weight key {key!r} names no block of this UNet; valid keys: {describe_keys(levels)}")
    return chosen


def _order(name: str) -> tuple:
    parts = name.split("_")
    return (PARTS.index(parts[0]), *map(int, parts[1:]))
