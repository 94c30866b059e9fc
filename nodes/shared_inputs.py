"""Node inputs that several methods' nodes share."""

from __future__ import annotations

from comfy_api.latest import io

from .arch import block_weights as block_weights_arch


def block_weight_inputs() -> list:
    """The per-block weight inputs of the apply nodes (optional: graphs saved before them keep working)."""
    presets = "; ".join(f"{name}: {what}" for name, what in block_weights_arch.PRESETS.items())
    return [
        io.Combo.Input("block_preset", options=list(block_weights_arch.PRESETS), default="paper", optional=True,
                       tooltip=f"which transformer blocks the patch runs in. {presets}. Only 'paper' has been "
                       "measured for identity (by the papers); the others' effect on identity with real weights "
                       "has not been measured"),
        io.String.Input("block_weights", default="", multiline=False, optional=True,
                        tooltip="per-block weights on top of the preset, multiplying the weight: 'key: weight' "
                        "entries, comma-separated, later ones win. Keys: a level (the block's grid side at the "
                        "native resolution, SD1.5: 64, 32, 16, 8), input / middle / output, a block (input_4) or "
                        "one transformer (input_4_0). E.g. '64: 0, output_9: 0.5'. 0 = the block runs as the "
                        "plain UNet"),
    ]
