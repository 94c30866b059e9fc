"""Node inputs and types that several methods' nodes share."""

from __future__ import annotations

from comfy_api.latest import io

from .arch import block_weights as block_weights_arch

# a list of patches.identity_words.IdentityWord: more people's words for one prompt (IDAdapter / AdaFace Identity
# Word nodes)
IdentityWordsType = io.Custom("IDENTITY_WORDS")


def identity_words_input():
    return IdentityWordsType.Input(
        "identity_words", optional=True,
        tooltip="more people in this prompt: chain IDAdapter / AdaFace Identity Word nodes, each with its own word "
        "(e.g. 'sks and ohwx at a cafe'); pair each person with a masked Apply node (or a masked conditioning)")


def chained_words(identity_words, word) -> list:
    """``identity_words`` (or none) and then ``word``, as a new list."""
    return [*(identity_words or []), word]


def attn_mask_input(what: str):
    """An apply node's optional region mask (checked by ``patches.shared.check_attn_mask`` and ``BlockMask``)."""
    return io.Mask.Input("attn_mask", optional=True,
                         tooltip=f"where {what} goes (white). Values outside 0..1 are clamped; NaN is an error. One "
                         "mask for every image of the latent batch, or one per image (another count is an error)")


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
