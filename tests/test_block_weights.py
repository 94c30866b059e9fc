"""Per-block weights: the text form and presets (nodes/arch/block_weights.py), the IDAdapter middle patch and the
K/V patches under them, and the diffusers binding's per-block weights (the bench's and a trainer's path)."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from comfyui_idadapter.nodes.arch import block_weights as bw
from comfyui_idadapter.nodes.arch.idadapter import IDAdapter, IDAdapterConfig
from comfyui_idadapter.nodes.arch.unet_blocks import sdpa_attention
from comfyui_idadapter.nodes.arch.wplus import WPlusAdapter, WPlusAdapterConfig
from comfyui_idadapter.nodes.errors import ConfigError
from comfyui_idadapter.nodes.patches import idadapter_patch, unet_layout
from comfyui_idadapter.training import diffusers_binding
from idadapter_helpers import StandInPatcher, tiny_adapter
from test_idadapter_patch import options

# SD1.5's 16 transformer blocks and their downscale (as both UNet readers give them; checked below)
SD15 = {**{f"input_{i}_0": f for i, f in ((1, 1), (2, 1), (4, 2), (5, 2), (7, 4), (8, 4))}, "middle_0_0": 8,
        **{f"output_{i}_0": f for i, f in ((3, 4), (4, 4), (5, 4), (6, 2), (7, 2), (8, 2), (9, 1), (10, 1),
                                           (11, 1))}}
LEVELS = bw.block_levels(SD15, "sd15")


def weights_of(preset="paper", text=""):
    return bw.block_weights(preset, text, LEVELS)


def test_levels_are_grid_sides_at_the_native_resolution():
    assert LEVELS["input_1_0"] == 64 and LEVELS["input_4_0"] == 32 and LEVELS["output_3_0"] == 16
    assert LEVELS["middle_0_0"] == 8
    assert bw.block_levels({"input_4_0": 2, "input_4_1": 2, "input_7_0": 4, "middle_0_0": 4}, "sdxl") == {
        "input_4_0": 64, "input_4_1": 64, "input_7_0": 32, "middle_0_0": 32}
    assert bw.block_levels({"input_1_0": 1}, "sd21") == {"input_1_0": 96}
    with pytest.raises(ConfigError, match="sd3"):
        bw.block_levels({"input_1_0": 1}, "sd3")


def test_presets():
    assert set(weights_of().values()) == {1.0} and len(weights_of()) == 16
    speed = weights_of("speed")
    assert {n for n, w in speed.items() if w == 0} == {"input_1_0", "input_2_0", "output_9_0", "output_10_0",
                                                       "output_11_0"}
    assert all(w == 1 for n, w in speed.items() if LEVELS[n] != 64)
    appearance = weights_of("appearance")
    assert all(w == (1 if n.startswith("output") else 0) for n, w in appearance.items())
    composition = weights_of("composition")
    assert all(w == (0 if n.startswith("output") else 1) for n, w in composition.items())
    # a preset naming a part the adapter lacks is fine (an idadapter/1 file may cover some blocks only)
    assert bw.block_weights("appearance", "", {"output_9_0": 64}) == {"output_9_0": 1.0}


def test_text_entries_by_level_part_block_and_transformer_later_ones_win():
    got = weights_of("speed", "32: 0.5; output: 2\noutput_9: 0.25, input_1_0 = -1")
    assert got["input_1_0"] == -1 and got["input_2_0"] == 0  # the preset, then the text
    assert got["input_4_0"] == 0.5 and got["input_5_0"] == 0.5
    assert got["output_6_0"] == 2 and got["output_10_0"] == 2  # "output" came after "32"
    assert got["output_9_0"] == 0.25
    assert got["middle_0_0"] == 1 and got["input_7_0"] == 1
    # several transformers in one UNet block (SDXL): the block name covers them all
    sdxl = {"input_7_0": 32, "input_7_1": 32, "input_8_0": 32}
    assert bw.block_weights("paper", "input_7: 0, input_8_0: 3", sdxl) == {"input_7_0": 0, "input_7_1": 0,
                                                                           "input_8_0": 3}
    assert weights_of("paper", " ,\n ; ") == weights_of()  # empty entries are ignored


@pytest.mark.parametrize("text, message", [
    ("input_3: 0", r"'input_3' names no block.*levels 64, 32, 16, 8; parts input, middle, output; blocks input_1, "
                   r"input_2, input_4"),
    ("128: 0", r"'128' names no block.*levels 64, 32, 16, 8"),
    ("4: 1", r"'4' names no block"),
    ("output_9: half", r"'half' is not a number"),
    ("64 0", r"is not 'key: weight'.*valid keys: levels 64"),
    ("64:", r"is not 'key: weight'"),
    (": 1", r"is not 'key: weight'"),
    ("64: nan", r"finite number"),
    ("64: inf", r"finite number"),
    ("64: 11", r"finite number in \[-10, 10\]"),
    ("down_1: 0", r"'down_1' names no block"),
    # str.isdigit and float() take other digits than 0-9: a superscript, full-width, Arabic-Indic
    ("\u00b2: 1", r"'\u00b2: 1': write keys and weights in plain ASCII \(digits 0-9.*valid keys: levels 64"),
    ("\uff16\uff14: 0", r"plain ASCII"),
    ("64: \uff10", r"plain ASCII"),
    ("output_\u0669: 1", r"plain ASCII"),
])
def test_bad_entries_name_the_valid_keys(text, message):
    with pytest.raises(ConfigError, match=message):
        weights_of("paper", text)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="paper, speed, appearance, composition"):
        weights_of("fast")


# ---- the IDAdapter middle patch and K/V patches under block weights


def make_patch(block_weights=None, weight=1.0):
    weights = tiny_adapter(gamma=0.5)
    torch.manual_seed(4)
    return idadapter_patch.IDAdapterMiddlePatch(StandInPatcher(weights.adapter.adapters), torch.randn(1, 4, 24), weight,
                                                attention=sdpa_attention, block_weights=block_weights), weights


def identity_of(patch):
    """(patcher, tokens) of a one-identity patch, to build another patch on the same adapter and tokens."""
    (identity,) = patch.identities
    return identity.patcher, identity.tokens


def test_a_block_at_zero_gets_its_input_back_and_all_ones_is_todays_output():
    plain, weights = make_patch()
    channels = {name: spec.channels for name, spec in weights.adapter.config.blocks.items()}
    for block, name in ((("input", 1), "input_1_0"), (("middle", 0), "middle_0_0")):
        x = torch.randn(2, 64, channels[name])
        zero = idadapter_patch.IDAdapterMiddlePatch(*identity_of(plain), 1.0, attention=sdpa_attention,
                                                    block_weights={name: 0.0})
        assert zero(x, options(block=block)) is x
        ones = idadapter_patch.IDAdapterMiddlePatch(*identity_of(plain), 1.0, attention=sdpa_attention,
                                                    block_weights={name: 1.0})
        assert torch.equal(ones(x, options(block=block)), plain(x, options(block=block)))
        assert not torch.equal(plain(x, options(block=block)), x)
    # the zero weight is per block: another block still runs
    zero_input = idadapter_patch.IDAdapterMiddlePatch(*identity_of(plain), 1.0, attention=sdpa_attention,
                                                      block_weights={"input_1_0": 0.0})
    x = torch.randn(2, 64, channels["middle_0_0"])
    assert torch.equal(zero_input(x, options(block=("middle", 0))), plain(x, options(block=("middle", 0))))


@pytest.mark.parametrize("block_weight", [0.5, -1.0, 2.5])
def test_block_weights_scale_the_residual_linearly(block_weight):
    plain, _ = make_patch(weight=0.8)
    scaled = idadapter_patch.IDAdapterMiddlePatch(*identity_of(plain), 0.8, attention=sdpa_attention,
                                                  block_weights={"input_1_0": block_weight})
    x = torch.randn(2, 64, 32)
    torch.testing.assert_close(scaled(x, options()) - x, block_weight * (plain(x, options()) - x), rtol=1e-5,
                               atol=1e-6)


class RecordingModel:
    """What add_kv_patches uses of a ModelPatcher: add_patches, recorded."""

    def __init__(self):
        self.calls = []

    def add_patches(self, entries, strength_patch=1.0):
        self.calls.append((dict(entries), strength_patch))
        return list(entries)


def test_kv_patches_follow_the_block_weights():
    weights = tiny_adapter()
    model = RecordingModel()
    idadapter_patch.add_kv_patches(model, weights.kv_deltas, 0.8, {"input_1_0": 0.0, "middle_0_0": 0.5})
    strengths = {key: strength for entries, strength in model.calls for key in entries}
    assert strengths == {
        "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": 0.4,
        "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight": 0.4,
        "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight": 0.8,
        "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight": 0.8,
    }  # no patch at all for the block at 0
    assert len(model.calls) == 2  # one add_patches per strength
    everything = RecordingModel()
    idadapter_patch.add_kv_patches(everything, weights.kv_deltas, 0.8)
    assert everything.calls == [(unet_layout.kv_weight_patches(weights.kv_deltas), 0.8)]  # as before block weights


# ---- the diffusers binding (the trainer's UNet, the bench)


def sd15_shaped_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=24,
        attention_head_dim=4, norm_num_groups=8).eval()


def test_the_bindings_downscales_are_the_sd15_layout():
    assert diffusers_binding.block_downscales(sd15_shaped_unet()) == SD15


def test_binding_block_weights_zero_blocks_and_all_ones():
    unet = sd15_shaped_unet()
    specs = diffusers_binding.block_specs(unet)
    adapter = IDAdapter(IDAdapterConfig(family="sd15", blocks=specs, clip_vision_dim=32, width=32, mff_heads=4,
                                        num_tokens=4, embed_dim=24, textual_hidden=32)).eval()
    wplus = WPlusAdapter(WPlusAdapterConfig("sd15", specs)).eval()
    with torch.no_grad():
        for gated in adapter.adapters.values():
            gated.gamma.fill_(0.5)
        for p in wplus.parameters():
            p.normal_(0, 0.1)
    diffusers_binding.attach(unet, adapter)
    diffusers_binding.attach_wplus(unet, wplus)
    blocks = diffusers_binding.transformer_blocks(unet)
    outputs = {}
    for name, block in blocks.items():
        block.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 24, generator=gen)
    e_r, w_tokens = torch.randn(1, 4, 24, generator=gen), torch.randn(2, 4, 24, generator=gen)

    def run(ida=None, wp=None):
        kwargs = {}
        if ida is not None:
            kwargs.update(diffusers_binding.idadapter_kwargs(e_r, beta=0.7, block_weights=ida))
        if wp is not None:
            kwargs.update(diffusers_binding.wplus_kwargs(w_tokens, 0.6, block_weights=wp))
        with torch.no_grad():
            out = unet(x, torch.tensor([400, 400]), encoder_hidden_states=text, cross_attention_kwargs=kwargs or None)
        return out.sample, dict(outputs)

    plain, plain_blocks = run()
    full, _ = run(ida={}, wp={})
    ones = {name: 1.0 for name in blocks}
    assert torch.equal(run(ida=ones, wp=ones)[0], full)
    # the highest-resolution encoder blocks run first: at 0 their outputs are the plain UNet's, bit for bit
    speed = bw.block_weights("speed", "", bw.block_levels(diffusers_binding.block_downscales(unet), "sd15"))
    _, speed_blocks = run(ida=speed, wp=speed)
    for name in ("input_1_0", "input_2_0"):
        assert torch.equal(speed_blocks[name], plain_blocks[name])
    assert not torch.equal(speed_blocks["input_4_0"], plain_blocks["input_4_0"])
    assert not torch.equal(full, plain)
