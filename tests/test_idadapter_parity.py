"""One definition, two bindings: the trainer's diffusers-bound forward equals the ComfyUI patch callables."""

import pytest
import torch

from idadapter_helpers import StandInPatcher
from comfyui_idadapter.nodes.arch.idadapter import IDAdapter, IDAdapterConfig
from comfyui_idadapter.nodes.arch.unet_blocks import sdpa_attention
from comfyui_idadapter.nodes.patches import idadapter_patch

diffusers = pytest.importorskip("diffusers")
from comfyui_idadapter.training import diffusers_binding  # noqa: E402


def tiny_unet(cross_attention_dim=768, seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
    ).eval()


def adapter_for(unet, family="sd15", seed=1):
    torch.manual_seed(seed)
    cfg = IDAdapterConfig(family=family, blocks=diffusers_binding.block_specs(unet), clip_vision_dim=48, width=32,
                          mff_heads=2, num_tokens=4, embed_dim=24, textual_hidden=32)
    adapter = IDAdapter(cfg).eval()
    with torch.no_grad():
        for gated in adapter.adapters.values():
            gated.gamma.uniform_(0.2, 0.8)
    return adapter


def test_block_names_follow_comfyui_keys():
    names = sorted(diffusers_binding.transformer_blocks(tiny_unet()))
    # layers_per_block 1: input 1 (level 0), input 3 (level 1, after the downsampler at 2); middle; output 0..3
    assert names == ["input_1_0", "input_3_0", "middle_0_0", "output_0_0", "output_1_0", "output_2_0", "output_3_0"]


@pytest.mark.parametrize("rows_by", ["active", "row_mask"])  # the rows chosen on the host, or the trainer's mask
@pytest.mark.parametrize("cond_or_uncond", [(1, 0), (0,), (0, 1)])
def test_fuser_equals_comfyui_middle_patch(cond_or_uncond, rows_by):
    unet = tiny_unet()
    adapter = adapter_for(unet)
    diffusers_binding.attach(unet, adapter)
    batch = 2
    chunks = len(cond_or_uncond)
    tokens = torch.randn(1, 4, 24)
    active = torch.tensor([c == 0 for c in cond_or_uncond for _ in range(batch)])
    rows = {"active": active} if rows_by == "active" else {"row_mask": active.float()[:, None, None]}
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = (args[0], output)
        return hook

    for name, block in diffusers_binding.transformer_blocks(unet).items():
        block.fuser.register_forward_hook(record(name))
    latents = torch.randn(batch * chunks, 4, 8, 8)
    with torch.no_grad():
        unet(latents, 10, encoder_hidden_states=torch.randn(batch * chunks, 77, 768),
             cross_attention_kwargs=diffusers_binding.idadapter_kwargs(tokens, beta=0.7, **rows))
    patch = idadapter_patch.IDAdapterMiddlePatch(StandInPatcher(adapter.adapters), tokens, 0.7,
                                                 attention=sdpa_attention)
    assert set(seen) == set(adapter.adapters)
    for name, (hidden, fused) in seen.items():
        kind, ident, index = name.rsplit("_", 2)
        opts = {"block": (kind, int(ident)), "block_index": int(index), "sigmas": torch.tensor([1.0]),
                "cond_or_uncond": list(cond_or_uncond), "original_shape": [batch * chunks, 4, 8, 8]}
        torch.testing.assert_close(patch(hidden, opts), fused, rtol=1e-5, atol=1e-5)
        uncond = ~active
        assert torch.equal(fused[uncond], hidden[uncond])


def test_detached_binding_leaves_unet_untouched():
    unet = tiny_unet()
    x, t, text = torch.randn(2, 4, 8, 8), 10, torch.randn(2, 77, 768)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=text).sample
        diffusers_binding.attach(unet, adapter_for(unet))
        without_kwargs = unet(x, t, encoder_hidden_states=text).sample
        with_adapter = unet(x, t, encoder_hidden_states=text,
                            cross_attention_kwargs=diffusers_binding.idadapter_kwargs(torch.randn(1, 4, 24))).sample
    assert torch.equal(before, without_kwargs)
    assert (with_adapter - before).abs().max() > 1e-4


def test_row_mask_keeps_the_dtype_and_leaves_dropped_rows_as_they_are():
    """The trainer's float32 row mask on bf16 activations: the output stays bf16 (as with row selection), rows at 0
    are the input unchanged, and rows at 1 equal row selection's."""
    unet = tiny_unet()
    adapter = adapter_for(unet).to(torch.bfloat16)
    name = next(iter(adapter.adapters))
    fuser = diffusers_binding.AdapterFuser(adapter.adapters[name], name)
    channels = adapter.adapters[name].norm.normalized_shape[0]
    hidden = torch.randn(3, 16, channels, dtype=torch.bfloat16)
    tokens = torch.randn(3, 4, 24, dtype=torch.bfloat16)
    keep = torch.tensor([True, False, True])
    with torch.no_grad():
        masked = fuser(hidden, {"tokens": tokens, "row_mask": keep.float()[:, None, None]})
        selected = fuser(hidden, {"tokens": tokens, "active": keep})
    assert masked.dtype == selected.dtype == torch.bfloat16
    assert torch.equal(masked[1], hidden[1]) and not torch.equal(masked[0], hidden[0])
    torch.testing.assert_close(masked[keep], selected[keep])
