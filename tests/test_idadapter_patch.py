"""The ComfyUI-side IDAdapter patches, driven the way ComfyUI calls them (signatures: reference/comfyui-api.md)."""

import copy

import pytest
import torch

from idadapter_helpers import tiny_adapter
from comfyui_idadapter.nodes import patches
from comfyui_idadapter.nodes.arch.idadapter import sdpa_attention
from comfyui_idadapter.nodes.errors import PackError


def options(block=("input", 1), sigma=5.0, cond_or_uncond=(1, 0), latent=(8, 8), batch=1):
    return {
        "block": block,
        "block_index": 0,
        "sigmas": torch.tensor([sigma]),
        "cond_or_uncond": list(cond_or_uncond),
        "original_shape": [batch * len(cond_or_uncond), 4, *latent],
        "transformer_index": 0,
    }


def make_patch(gamma=0.5, weight=1.0, **kwargs):
    weights = tiny_adapter(gamma=gamma)
    tokens = torch.randn(1, 4, 24)
    return patches.IDAdapterMiddlePatch(weights.adapter, tokens, weight, attention=sdpa_attention, **kwargs), weights


def test_gamma_zero_is_bit_identical():
    patch, _ = make_patch(gamma=0.0)
    x = torch.randn(2, 64, 32)
    assert torch.equal(patch(x, options()), x)


def test_only_conditional_chunks_change_and_match_cond_alone():
    patch, _ = make_patch()
    x = torch.randn(4, 64, 32)  # batch 2, chunks [uncond, cond]
    out = patch(x, options(cond_or_uncond=(1, 0), batch=2))
    assert torch.equal(out[:2], x[:2])
    assert (out[2:] - x[2:]).abs().max() > 1e-3
    cond_only = patch(x[2:], options(cond_or_uncond=(0,), batch=2))
    torch.testing.assert_close(out[2:], cond_only)
    unconditional = patch(x[:2], options(cond_or_uncond=(1,), batch=2))
    assert torch.equal(unconditional, x[:2])


def test_weight_scales_the_residual():
    one, _ = make_patch(weight=1.0)
    two = patches.IDAdapterMiddlePatch(one.adapter, one.tokens, 2.5, attention=sdpa_attention)
    x = torch.randn(2, 64, 32)
    torch.testing.assert_close(two(x, options()) - x, 2.5 * (one(x, options()) - x), rtol=1e-5, atol=1e-6)


def test_sigma_window():
    patch, _ = make_patch(sigma_start=10.0, sigma_end=2.0)
    x = torch.randn(2, 64, 32)
    assert torch.equal(patch(x, options(sigma=14.6)), x)  # before start_percent
    assert torch.equal(patch(x, options(sigma=0.5)), x)  # after end_percent
    for sigma in (10.0, 5.0, 2.0):
        assert not torch.equal(patch(x, options(sigma=sigma)), x)


def test_mask_restricts_change_to_masked_region():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half of the image
    patch, _ = make_patch(mask=mask)
    x = torch.randn(2, 64, 32)  # 8x8 latent, this block at full latent resolution
    change = (patch(x, options()) - x)[1].abs().sum(-1).reshape(8, 8)
    assert change[:, :4].min() > 1e-4
    assert change[:, 4:].max() == 0
    small = torch.randn(2, 16, 32)  # a block at half resolution (4x4 tokens)
    change = (patch(small, options()) - small)[1].abs().sum(-1).reshape(4, 4)
    assert change[:, :2].min() > 1e-4 and change[:, 2:].max() == 0


def test_unknown_blocks_pass_through():
    patch, _ = make_patch()
    x = torch.randn(2, 64, 32)
    assert torch.equal(patch(x, options(block=("output", 11))), x)
    assert torch.equal(patch(x, {}), x)


def test_clone_shares_patch_and_weights():
    patch, weights = make_patch()
    model_options = {"transformer_options": {"patches": {"middle_patch": [patch]}}}
    cloned = copy.deepcopy(model_options)  # what ModelPatcher.clone() does
    assert cloned["transformer_options"]["patches"]["middle_patch"][0] is patch
    x = torch.randn(2, 64, 32)
    patch(x, options())
    first = patches.module_on(weights.adapter.adapters["input_1_0"], x.device, x.dtype)
    assert patches.module_on(weights.adapter.adapters["input_1_0"], x.device, x.dtype) is first
    assert patch.to(torch.device("cpu")) is patch and patch.to(torch.float16) is patch


def test_runs_in_half_precision():
    patch, _ = make_patch()
    x = torch.randn(2, 64, 32)
    full = patch(x, options())
    half = patch(x.to(torch.bfloat16), options())
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1


def test_token_grid_and_bad_shapes():
    assert patches.token_grid({"original_shape": [2, 4, 9, 7]}, 63) == (9, 7)
    assert patches.token_grid({"original_shape": [2, 4, 9, 7]}, 20) == (5, 4)
    with pytest.raises(PackError, match="cannot place 17 tokens"):
        patches.token_grid({"original_shape": [2, 4, 8, 8]}, 17)


def test_kv_weight_patch_keys():
    weights = tiny_adapter()
    entries = patches.kv_weight_patches(weights.kv_deltas)
    assert set(entries) == {
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight",
        "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight",
        "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight",
    }
    entry = entries["diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"]
    assert len(entry) == 1 and entry[0] is weights.kv_deltas["middle_0_0"]["to_v"]


SKS = 48136


@pytest.mark.parametrize("layout", [{"l": 768}, {"h": 1024}, {"g": 1280, "l": 768}], ids=["sd15", "sd21", "sdxl"])
def test_identity_tokens_replace_every_identifier(layout):
    pad = {"l": 49407, "h": 0, "g": 0}
    row = [49406, 320, 1125, 539, SKS, 2533, 1, 2533, 533, SKS, 49407]
    tokens = {k: [[(t, 1.0 if i != 3 else 1.2, 0) for i, t in enumerate(row + [pad[k]] * (77 - len(row)))]]
              for k in layout}
    vectors = {k: torch.randn(1, d) for k, d in layout.items()}
    out = patches.inject_identity_tokens(tokens, {k: SKS for k in layout}, vectors)
    for k, d in layout.items():
        assert len(out[k][0]) == 77
        for i, (before, after) in enumerate(zip(tokens[k][0], out[k][0])):
            if before[0] == SKS:
                assert torch.equal(after[0], vectors[k][0]) and after[1:] == before[1:]
            else:
                assert after == before
    with pytest.raises(PackError, match=r"CLIP has text encoders .* vectors for \['l'\]"):
        patches.inject_identity_tokens({"g": tokens.get("g", tokens[next(iter(tokens))])}, {"g": SKS}, {"l": torch.zeros(768)})


def test_non_contiguous_conditional_rows():
    patch, _ = make_patch()
    x = torch.randn(3, 64, 32)  # chunks [cond, uncond, cond], batch 1
    out = patch(x, options(cond_or_uncond=(0, 1, 0)))
    assert torch.equal(out[1], x[1])
    for row in (0, 2):
        torch.testing.assert_close(out[row:row + 1], patch(x[row:row + 1], options(cond_or_uncond=(0,))))
