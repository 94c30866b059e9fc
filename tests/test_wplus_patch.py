"""Apply W+ Adapter's attn2 replace patch, outside ComfyUI: chaining, scale 0, CFG chunks, sigma window, mask."""

import pytest
import torch

from comfyui_idadapter.nodes.arch import wplus
from comfyui_idadapter.nodes.arch.unet_blocks import BlockSpec, sdpa_attention
from comfyui_idadapter.nodes.errors import ImageInputError, PackError
from comfyui_idadapter.nodes.patches import shared, unet_layout, wplus_patch
from idadapter_helpers import StandInPatcher

BLOCK, CHANNELS, HEADS, CONTEXT = "input_1_0", 32, 4, 768


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    model = wplus.WPlusAdapter(wplus.WPlusAdapterConfig("sd15", {BLOCK: BlockSpec(CHANNELS, HEADS, CONTEXT)}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def qkv(batch=2, tokens=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, CHANNELS, generator=gen), torch.randn(batch, 77, CHANNELS, generator=gen),
            torch.randn(batch, 77, CHANNELS, generator=gen))


def patch_for(adapter, scale=1.0, codes=None, **kwargs):
    codes = torch.randn(1, 18, 512, generator=torch.Generator().manual_seed(2)) if codes is None else codes
    return wplus_patch.WPlusAttn2Replace(StandInPatcher(adapter), BLOCK, adapter.tokens(codes),
                                         adapter.uncond_tokens(codes), scale, attention=sdpa_attention, **kwargs)


OPTIONS = {"n_heads": HEADS, "cond_or_uncond": [1, 0]}  # ComfyUI's [uncond, cond] chunks


def test_scale_zero_is_exactly_the_text_attention(adapter):
    q, k, v = qkv()
    assert torch.equal(patch_for(adapter, 0.0)(q, k, v, OPTIONS), sdpa_attention(q, k, v, HEADS))


def test_cond_chunks_get_the_codes_tokens_and_uncond_chunks_a_zero_codes(adapter):
    q, k, v = qkv()
    codes = torch.randn(1, 18, 512)
    out = patch_for(adapter, 0.7, codes)(q, k, v, OPTIONS)
    h = sdpa_attention(q, k, v, HEADS)
    layer = adapter.layers[BLOCK]
    expected_uncond = h[:1] + 0.7 * layer.residual(h[:1], adapter.uncond_tokens(codes), sdpa_attention, HEADS)
    expected_cond = h[1:] + 0.7 * layer.residual(h[1:], adapter.tokens(codes), sdpa_attention, HEADS)
    torch.testing.assert_close(out, torch.cat([expected_uncond, expected_cond]))
    # the official unconditional tokens: LayerNorm of a zero W+'s projections is the norm's bias
    torch.testing.assert_close(adapter.uncond_tokens(codes)[0], adapter.w_proj.norm.bias.expand(4, -1))


def test_it_adds_its_residual_on_top_of_the_patch_installed_before(adapter):
    q, k, v = qkv()
    calls = []

    def other_pack(q, k, v, extra_options):  # e.g. an IPAdapter-style replace patch
        calls.append(1)
        return sdpa_attention(q, k, v, extra_options["n_heads"]) * 2 + 1

    ours = patch_for(adapter, 1.0, previous=other_pack)(q, k, v, OPTIONS)
    alone = patch_for(adapter, 1.0)
    h_other = other_pack(q, k, v, OPTIONS)
    codes = torch.randn(1, 18, 512, generator=torch.Generator().manual_seed(2))
    tokens = torch.cat([adapter.uncond_tokens(codes), adapter.tokens(codes)])
    expected = h_other + adapter.layers[BLOCK].residual(h_other, tokens, sdpa_attention, HEADS)
    torch.testing.assert_close(ours, expected)
    assert len(calls) == 2 and not torch.allclose(ours, alone(q, k, v, OPTIONS))


def test_outside_the_sigma_window_it_is_the_text_attention(adapter):
    q, k, v = qkv()
    patch = patch_for(adapter, 1.0, sigma_start=5.0, sigma_end=1.0)
    h = sdpa_attention(q, k, v, HEADS)
    assert torch.equal(patch(q, k, v, {**OPTIONS, "sigmas": torch.tensor([9.0])}), h)  # the delayed start
    assert not torch.equal(patch(q, k, v, {**OPTIONS, "sigmas": torch.tensor([3.0])}), h)


def test_a_mask_limits_the_residual_to_its_region(adapter):
    q, k, v = qkv(tokens=16)
    mask = torch.zeros(4, 4)
    mask[:, :2] = 1  # the left half
    options = {**OPTIONS, "activations_shape": [2, CHANNELS, 4, 4]}
    out = patch_for(adapter, 1.0, mask=mask)(q, k, v, options)
    h = sdpa_attention(q, k, v, HEADS)
    changed = (out - h).abs().amax(dim=(0, 2)).reshape(4, 4)
    assert (changed[:, 2:] == 0).all() and (changed[:, :2] > 0).all()


def test_codes_and_latents_must_pair_up(adapter):
    q, k, v = qkv(batch=6)  # 3 latents x [uncond, cond]
    two_codes = torch.randn(2, 18, 512)
    with pytest.raises(PackError, match="2 W\\+ codes for a batch of 3 latents"):
        patch_for(adapter, 1.0, two_codes)(q, k, v, OPTIONS)
    three = patch_for(adapter, 1.0, torch.randn(3, 18, 512))(q, k, v, OPTIONS)  # one code per latent
    assert three.shape == (6, 16, CHANNELS)


@pytest.mark.parametrize("masks, images", [(2, 3), (3, 2), (2, 1)])
def test_a_mask_batch_neither_one_nor_one_per_latent_is_refused(adapter, masks, images):
    q, k, v = qkv(batch=2 * images)  # [uncond, cond] chunks
    patch = patch_for(adapter, 1.0, mask=torch.ones(masks, 4, 4))
    with pytest.raises(ImageInputError, match=f"attn_mask is a batch of {masks} masks and the latent batch has "
                       f"{images} images?: give one mask for all images, or one per image"):
        patch(q, k, v, {**OPTIONS, "activations_shape": [2 * images, CHANNELS, 4, 4]})


def test_one_mask_for_all_latents_or_one_per_latent_scales_each_rows_residual(adapter):
    q, k, v = qkv(batch=6)  # 3 latents x [uncond, cond]: both chunks get a residual (the uncond one a zero code's)
    options = {**OPTIONS, "activations_shape": [6, CHANNELS, 4, 4]}
    h = sdpa_attention(q, k, v, HEADS)
    residual = patch_for(adapter, 1.0)(q, k, v, options) - h
    per_image = torch.tensor([0.25, 0.5, 1.0]).reshape(-1, 1, 1).expand(-1, 4, 4)
    out = patch_for(adapter, 1.0, mask=shared.check_attn_mask(per_image))(q, k, v, options)
    rows = torch.tensor([0.25, 0.5, 1.0, 0.25, 0.5, 1.0]).reshape(-1, 1, 1)
    torch.testing.assert_close(out - h, residual * rows, rtol=1e-5, atol=1e-6)
    one = patch_for(adapter, 1.0, mask=shared.check_attn_mask(torch.full((4, 4), 1.5)))(q, k, v, options)
    torch.testing.assert_close(one - h, residual, rtol=0, atol=0)  # 1.5 is clamped to 1


def test_block_keys_round_trip():
    assert unet_layout.block_key("input_1_0") == ("input", 1, 0)
    assert unet_layout.block_key("middle_0_0") == ("middle", 0, 0)


def test_several_codes_add_their_own_residuals_on_the_same_text_attention(adapter):
    q, k, v = qkv(tokens=16)
    left = torch.zeros(4, 4)
    left[:, :2] = 1
    options = {**OPTIONS, "activations_shape": [2, CHANNELS, 4, 4]}

    def other_pack(q, k, v, extra_options):
        return sdpa_attention(q, k, v, extra_options["n_heads"]) + 1

    first = patch_for(adapter, 0.9, torch.randn(1, 18, 512), mask=left, previous=other_pack)
    second = patch_for(adapter, 0.5, torch.randn(1, 18, 512), mask=1 - left)
    both = first.joined(second)
    h = other_pack(q, k, v, options)
    r1 = first(q, k, v, options) - h
    r2 = wplus_patch.WPlusAttn2Replace(second.identities[0].patcher, BLOCK, second.identities[0].tokens,
                                       second.identities[0].uncond_tokens, 0.5, mask=1 - left, previous=other_pack,
                                       attention=sdpa_attention)(q, k, v, options) - h
    torch.testing.assert_close(both(q, k, v, options) - h, r1 + r2, rtol=0, atol=1e-6)
    columns = lambda r: r.abs().amax(dim=(0, 2)).reshape(4, 4)  # noqa: E731
    assert (columns(r1)[:, 2:] == 0).all() and (columns(r1)[:, :2] > 0).all()
    assert (columns(r2)[:, :2] == 0).all() and (columns(r2)[:, 2:] > 0).all()
    assert both.previous is other_pack and len(first.identities) == len(second.identities) == 1


class StandInModel:
    """What add_wplus uses of a ModelPatcher: model_options and set_model_attn2_replace."""

    def __init__(self):
        self.model_options = {"transformer_options": {}}

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        to = self.model_options["transformer_options"].setdefault("patches_replace", {}).setdefault("attn2", {})
        to[(block_name, number, transformer_index)] = patch


def test_a_second_apply_joins_the_first_ones_patch_and_keeps_the_other_packs(adapter):
    model = StandInModel()

    def other_pack(q, k, v, extra_options):
        return q

    model.set_model_attn2_replace(other_pack, "input", 1, 0)
    first, second = patch_for(adapter, 1.0), patch_for(adapter, 0.5)
    wplus_patch.add_wplus(model, first)
    assert first.previous is other_pack
    wplus_patch.add_wplus(model, second)
    installed = model.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    assert installed.identities == first.identities + second.identities and installed.previous is other_pack
    assert installed.models() == [first.identities[0].patcher, second.identities[0].patcher]


class MovablePatch:
    """Another pack's attn2 replace patch whose ``to`` gives a new object per device (as a patch holding tensors
    does) and which has masks of its own for tiles."""

    def __init__(self, device="cpu"):
        self.device = device

    def __call__(self, q, k, v, extra_options, **kwargs):
        return sdpa_attention(q, k, v, extra_options["n_heads"])

    def to(self, device_or_dtype, **kwargs):
        return MovablePatch(str(device_or_dtype))

    def spatial_crop_inputs(self, **crop):
        return MovablePatch(f"{self.device} cropped")


def test_moving_the_patch_never_changes_it_and_gives_a_copy_only_when_the_wrapped_patch_moved(adapter):
    """Every clone and every multi-GPU thread shares the attached patch: ``to`` must not change it."""
    wrapped = MovablePatch()
    patch = patch_for(adapter, 1.0, previous=wrapped)
    moved = patch.to(torch.device("meta"))
    assert patch.previous is wrapped and moved is not patch and moved.previous.device == "meta"
    assert moved.identities == patch.identities
    alone = patch_for(adapter, 1.0, previous=lambda q, k, v, extra_options: sdpa_attention(q, k, v, HEADS))
    assert alone.to(torch.float16) is alone
    q, k, v = qkv()
    assert torch.equal(patch(q, k, v, OPTIONS, future_argument=1), moved(q, k, v, OPTIONS))  # ComfyUI may add some


def test_tiles_crop_the_mask_and_the_wrapped_patch(adapter):
    mask = torch.zeros(1, 4, 4)
    mask[..., :2] = 1
    wrapped = MovablePatch()
    patch = patch_for(adapter, 1.0, mask=mask, previous=wrapped)
    tiled = patch.spatial_crop_inputs(regions=[(0, 0, 2, 4), (2, 0, 4, 4)], source_width=4, source_height=4,
                                      target_width=2, target_height=4)
    assert patch.previous is wrapped and patch.identities[0].mask.mask.shape == (1, 4, 4)
    assert tiled.previous.device == "cpu cropped"
    assert tiled.identities[0].mask.mask.tolist() == [[[1.0, 1.0]] * 4, [[0.0, 0.0]] * 4]
