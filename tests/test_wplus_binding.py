"""The W+ adapter bound to a diffusers UNet (training/diffusers_binding.py): an attn2 processor running the nodes'
own ResidualCrossAttention modules, read from cross_attention_kwargs."""

import logging

import pytest
import torch

from comfyui_idadapter.nodes.arch import wplus
from comfyui_idadapter.nodes.arch.idadapter import IDAdapter, IDAdapterConfig
from comfyui_idadapter.nodes.errors import ConfigError

diffusers = pytest.importorskip("diffusers")
from comfyui_idadapter.training import diffusers_binding  # noqa: E402
from comfyui_idadapter.training.tiny import tiny_unet  # noqa: E402

BLOCKS = ["input_1_0", "input_3_0", "middle_0_0", "output_0_0", "output_1_0", "output_2_0", "output_3_0"]


def adapter_for(unet, blocks=None, seed=1):
    torch.manual_seed(seed)
    specs = diffusers_binding.block_specs(unet)
    adapter = wplus.WPlusAdapter(wplus.WPlusAdapterConfig("sd15", {n: specs[n] for n in blocks or specs}))
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.2)
    return adapter.eval()


def inputs(batch=2, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=gen), torch.tensor([500] * batch),
            torch.randn(batch, 77, 768, generator=gen), torch.randn(batch, 18, 512, generator=gen))


def test_scale_zero_and_no_arguments_give_exactly_the_plain_unet():
    unet = tiny_unet().eval()
    x, t, text, codes = inputs()
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=text).sample
        adapter = adapter_for(unet)
        assert diffusers_binding.attach_wplus(unet, adapter) == BLOCKS
        tokens = adapter.tokens(codes)
        zero = unet(x, t, encoder_hidden_states=text,
                    cross_attention_kwargs=diffusers_binding.wplus_kwargs(tokens, 0.0)).sample
        without = unet(x, t, encoder_hidden_states=text).sample
        on = unet(x, t, encoder_hidden_states=text,
                  cross_attention_kwargs=diffusers_binding.wplus_kwargs(tokens, 1.0)).sample
    assert torch.equal(zero, plain) and torch.equal(without, plain)
    assert (on - plain).abs().max() > 1e-3  # the residual cross-attention changes the prediction


def test_processor_equals_a_hand_computation_with_diffusers_attention_pieces():
    unet = tiny_unet().eval()
    adapter = adapter_for(unet)
    diffusers_binding.attach_wplus(unet, adapter)
    attn = diffusers_binding.transformer_blocks(unet)["input_3_0"].attn2
    layer = adapter.layers["input_3_0"]
    gen = torch.Generator().manual_seed(4)
    x, text = torch.randn(2, 64, 64, generator=gen), torch.randn(2, 77, 768, generator=gen)
    tokens = adapter.tokens(torch.randn(1, 18, 512, generator=gen))  # one set for the batch
    with torch.no_grad():
        ours = attn(x, encoder_hidden_states=text, **diffusers_binding.wplus_kwargs(tokens, 0.6))
        # the classic AttnProcessor's pieces: per-head bmm with diffusers' own scores and head reshapes
        q, k, v = (attn.head_to_batch_dim(t) for t in (attn.to_q(x), attn.to_k(text), attn.to_v(text)))
        h = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(q, k), v))
        w = tokens.expand(2, -1, -1)
        wq, wk, wv = (attn.head_to_batch_dim(t) for t in (
            h @ layer.to_q_wplus.weight.T, w @ layer.to_k_wplus.weight.T, w @ layer.to_v_wplus.weight.T))
        extra = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(wq, wk), wv))
        expected = attn.to_out[1](attn.to_out[0](h + 0.6 * extra)) / attn.rescale_output_factor
    assert not attn.residual_connection
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - attn.to_out[0](h)).abs().max() > 1e-3


def test_gradients_reach_the_adapter_and_not_the_frozen_unet():
    unet = tiny_unet().requires_grad_(False)
    adapter = adapter_for(unet).train().requires_grad_(True)
    diffusers_binding.attach_wplus(unet, adapter)
    x, t, text, codes = inputs()
    tokens = adapter.tokens(codes)
    out = unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=diffusers_binding.wplus_kwargs(tokens)).sample
    out.square().mean().backward()
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    assert all(p.grad is None for p in unet.parameters())


def test_attach_keeps_other_processors_and_the_unet_state():
    unet = tiny_unet().eval()
    keys = list(unet.state_dict())
    before = dict(unet.attn_processors)
    adapter = adapter_for(unet, blocks=["input_1_0", "output_2_0"])
    assert diffusers_binding.attach_wplus(unet, adapter) == ["input_1_0", "output_2_0"]
    blocks = diffusers_binding.transformer_blocks(unet)
    for name, block in blocks.items():
        assert block.attn1.processor is before[_processor_key(unet, block.attn1)]
        if name in adapter.config.blocks:
            assert isinstance(block.attn2.processor, diffusers_binding.WPlusAttnProcessor)
            assert block.attn2.processor.layer is adapter.layers[name]  # the nodes' module, not a copy
        else:
            assert block.attn2.processor is before[_processor_key(unet, block.attn2)]
    assert list(unet.state_dict()) == keys  # the adapter is not part of the UNet's parameters


def _processor_key(unet, attention):
    (name,) = [n for n, m in unet.named_modules() if m is attention]
    return f"{name}.processor"


def test_no_warning_per_call_about_the_wplus_argument(caplog):
    unet = tiny_unet().eval()
    adapter = adapter_for(unet, blocks=["middle_0_0"])
    diffusers_binding.attach_wplus(unet, adapter)
    x, t, text, codes = inputs(batch=1)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        unet(x, t, encoder_hidden_states=text,
             cross_attention_kwargs=diffusers_binding.wplus_kwargs(adapter.tokens(codes)))
    assert not [r for r in caplog.records if "wplus" in r.getMessage()]


def test_stacks_with_the_idadapter_binding():
    unet = tiny_unet().eval()
    torch.manual_seed(7)
    ida = IDAdapter(IDAdapterConfig(family="sd15", blocks=diffusers_binding.block_specs(unet), clip_vision_dim=48,
                                    width=32, mff_heads=2, num_tokens=4, embed_dim=24, textual_hidden=32)).eval()
    with torch.no_grad():
        for gated in ida.adapters.values():
            gated.gamma.fill_(0.5)
    diffusers_binding.attach(unet, ida)
    adapter = adapter_for(unet)
    diffusers_binding.attach_wplus(unet, adapter)
    x, t, text, codes = inputs()
    ida_kwargs = diffusers_binding.idadapter_kwargs(torch.randn(1, 4, 24))
    with torch.no_grad():
        tokens = adapter.tokens(codes)
        ida_only = unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=ida_kwargs).sample
        wplus_zero = unet(x, t, encoder_hidden_states=text, cross_attention_kwargs={
            **ida_kwargs, **diffusers_binding.wplus_kwargs(tokens, 0.0)}).sample
        both = unet(x, t, encoder_hidden_states=text, cross_attention_kwargs={
            **ida_kwargs, **diffusers_binding.wplus_kwargs(tokens, 1.0)}).sample
    assert torch.equal(wplus_zero, ida_only)
    assert (both - ida_only).abs().max() > 1e-3


def test_an_adapter_for_another_unet_is_refused_before_anything_changes():
    unet = tiny_unet().eval()
    before = dict(unet.attn_processors)
    specs = diffusers_binding.block_specs(unet)
    wide = wplus.WPlusAdapter(wplus.WPlusAdapterConfig("sd15", {
        "input_1_0": specs["input_1_0"], "input_3_0": specs["input_1_0"]}))  # input_3_0 has 64 channels, not 32
    with pytest.raises(ConfigError, match="input_3_0"):
        diffusers_binding.attach_wplus(unet, wide)
    other = wplus.WPlusAdapter(wplus.official_sd15_config())
    with pytest.raises(ConfigError, match="lacks"):
        diffusers_binding.attach_wplus(unet, other)
    assert all(unet.attn_processors[k] is p for k, p in before.items())
