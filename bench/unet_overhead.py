"""Per-step cost of IDAdapter and the W+ adapter on a full-size SD1.5 UNet (random weights), measured in one run.

    ./dev python bench/unet_overhead.py                       # CPU, fp32
    python bench/unet_overhead.py --device cuda --dtype fp16  # GPU

One CFG step = one UNet call on batch 2 (unconditional + conditional) at 512x512 (64x64 latent). Variants:
  base          the plain UNet
  idadapter     the gated self-attention on the conditional half only (what Apply IDAdapter does)
  both-halves   the same adapter run on both halves (for reference: an extra self-attention everywhere)
  ip-adapter    an IP-Adapter-style parallel cross-attention over the same number of tokens, both halves
  wplus         the official SD1.5 W+ adapter (nodes/arch/wplus.py) on all 16 cross-attention layers, what Apply
                W+ Adapter adds: attn2 computes the text attention h (before to_out), adds scale (1) * the W+
                residual attention over 4 tokens (query to_q_wplus(h)), then to_out; on both halves, the
                unconditional one with the zero-W+ tokens as the official pipeline. The tokens (the mapping network
                of a random W+ code) are computed once before timing: they do not change from step to step.
  floor         base + the adapter modules timed on their own on the same activations: what the
                idadapter variant computes, with no integration overhead
Prints seconds per step and each variant's ratio to base, and idadapter/floor.
"""

import argparse
import importlib.util
import pathlib
import sys

import torch

# Run as a script: import this checkout as the package `comfyui_idadapter` (ComfyUI owns the top-level name `nodes`).
_root = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("comfyui_idadapter", _root / "__init__.py", submodule_search_locations=[str(_root)])
sys.modules["comfyui_idadapter"] = _pack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pack)

from common import SD15_UNET, timed  # noqa: E402  (bench/, the script's own folder)
from comfyui_idadapter.nodes.arch.idadapter import IDAdapter, IDAdapterConfig, sdpa_attention  # noqa: E402
from comfyui_idadapter.nodes.arch.wplus import W_DIM, W_ROWS, WPlusAdapter, official_sd15_config  # noqa: E402
from comfyui_idadapter.training import diffusers_binding  # noqa: E402

TOKENS = 16


class ParallelCrossAttention:
    """IP-Adapter's decoupled cross-attention: text attention + scale * attention over extra image tokens."""

    def __init__(self, attn, image_tokens, scale=1.0):
        inner, ctx = attn.to_k.out_features, attn.to_k.in_features
        self.to_k_ip = torch.nn.Linear(ctx, inner, bias=False).to(attn.to_k.weight)
        self.to_v_ip = torch.nn.Linear(ctx, inner, bias=False).to(attn.to_k.weight)
        self.image_tokens, self.scale = image_tokens, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        q = attn.to_q(hidden_states)
        text = sdpa_attention(q, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states), attn.heads)
        tokens = self.image_tokens.expand(hidden_states.shape[0], -1, -1)
        image = sdpa_attention(q, self.to_k_ip(tokens), self.to_v_ip(tokens), attn.heads)
        return attn.to_out[1](attn.to_out[0](text + self.scale * image))


class WPlusCrossAttention:
    """The W+ adapter on one attn2: to_out(h + scale * residual(h, tokens)), h the text attention before to_out."""

    def __init__(self, layer, tokens, scale=1.0):
        self.layer, self.tokens, self.scale = layer, tokens, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        q = attn.to_q(hidden_states)
        h = sdpa_attention(q, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states), attn.heads)
        return attn.to_out[1](attn.to_out[0](self.layer(h, self.tokens, self.scale, sdpa_attention, attn.heads)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device, dtype).eval().requires_grad_(False)
    specs = diffusers_binding.block_specs(unet)
    cfg = IDAdapterConfig(family="sd15", blocks=specs, num_tokens=TOKENS)
    adapter = IDAdapter(cfg).to(device, dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for gated in adapter.adapters.values():
            gated.gamma.fill_(0.5)
    side = args.resolution // 8
    latents = torch.randn(2, 4, side, side, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    text = torch.randn(2, 77, 768, device=device, dtype=dtype)
    e_r = torch.randn(1, TOKENS, cfg.embed_dim, device=device, dtype=dtype)
    cond_only = torch.tensor([False, True], device=device)

    def run(kwargs=None):
        with torch.no_grad():
            return unet(latents, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample

    results = {"base": timed(run, device, args.repeats)}

    # the adapter modules alone, on activations of each block's shape (conditional half: batch 1)
    captured = {}

    def capture(name):
        def hook(module, args):
            captured[name] = args[0].shape
        return hook

    hooks = [block.register_forward_pre_hook(capture(name)) for name, block in diffusers_binding.transformer_blocks(unet).items()]
    run()
    for h in hooks:
        h.remove()
    inputs = {name: torch.randn(1, *shape[1:], device=device, dtype=dtype) for name, shape in captured.items()}

    def adapters_alone():
        with torch.no_grad():
            for name, y in inputs.items():
                adapter.adapters[name].residual(y, e_r, sdpa_attention)

    results["floor"] = results["base"] + timed(adapters_alone, device, args.repeats)

    diffusers_binding.attach(unet, adapter)
    results["idadapter"] = timed(lambda: run(diffusers_binding.idadapter_kwargs(e_r, cond_only)), device, args.repeats)
    results["both-halves"] = timed(lambda: run(diffusers_binding.idadapter_kwargs(e_r)), device, args.repeats)

    image_tokens = torch.randn(1, TOKENS, 768, device=device, dtype=dtype)
    processors = {}
    for name, proc in unet.attn_processors.items():
        module = unet.get_submodule(name.rsplit(".", 1)[0])
        processors[name] = ParallelCrossAttention(module, image_tokens) if name.endswith("attn2.processor") else AttnProcessor2_0()
    unet.set_attn_processor(processors)
    results["ip-adapter"] = timed(run, device, args.repeats)

    wplus = WPlusAdapter(official_sd15_config()).to(device, dtype).eval().requires_grad_(False)
    with torch.no_grad():
        wplus.w_proj.norm.weight.normal_(1, 0.1)  # random LayerNorm too, so the zero-W+ tokens are not all zero
        wplus.w_proj.norm.bias.normal_(0, 0.1)
        w = torch.randn(1, W_ROWS, W_DIM, device=device, dtype=dtype)
        wplus_tokens = torch.cat([wplus.uncond_tokens(w), wplus.tokens(w)])  # [2, 4, 768]: uncond, cond
    block_of = {id(block.attn2): name for name, block in diffusers_binding.transformer_blocks(unet).items()}
    processors = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name.rsplit(".", 1)[0])
        block = block_of.get(id(module))
        processors[name] = (WPlusCrossAttention(wplus.layers[block], wplus_tokens) if block in wplus.layers
                            else AttnProcessor2_0())
    assert sum(isinstance(p, WPlusCrossAttention) for p in processors.values()) == len(wplus.layers) == 16
    unet.set_attn_processor(processors)
    results["wplus"] = timed(run, device, args.repeats)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"SD1.5 UNet, {args.resolution}x{args.resolution}, batch 2 (one CFG step), {args.dtype}, {name}")
    for key, seconds in results.items():
        print(f"  {key:12s} {seconds:8.3f} s/step   {seconds / results['base']:.3f}x base")
    print(f"  idadapter / floor: {results['idadapter'] / results['floor']:.3f}")


if __name__ == "__main__":
    main()
