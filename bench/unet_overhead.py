"""Per-step cost of IDAdapter and the W+ adapter on a full-size SD1.5 (or SDXL) UNet (random weights), variants
interleaved in one run.

    ./dev python bench/unet_overhead.py                       # CPU, fp32, SD1.5, 512x512, one image
    python bench/unet_overhead.py --device cuda --dtype fp16  # GPU
    python bench/unet_overhead.py --device cuda --dtype fp16 --batch 8 --resolution 768 --rounds 20
    python bench/unet_overhead.py --device cuda --dtype fp16 --family sdxl --resolution 1024 --rounds 20
    ./dev python bench/unet_overhead.py --variants base idadapter wplus --presets speed appearance composition

One CFG step = one UNet call on 2 x --batch rows (unconditional + conditional). Variants, all on one UNet (each
picks its path through the UNet's cross_attention_kwargs, so they interleave without re-patching):
  base                  the plain UNet
  idadapter             the gated self-attention on the conditional half only (what Apply IDAdapter does)
  both-halves           the same adapter run on both halves (for reference: an extra self-attention everywhere)
  ip-adapter            an IP-Adapter-style parallel cross-attention over the same number of tokens, both halves
  wplus                 (SD1.5 only) the official SD1.5 W+ adapter (nodes/arch/wplus.py) on all 16 cross-attention
                        layers, what Apply W+ Adapter adds: attn2 computes the text attention h (before to_out),
                        adds scale (1) * the W+ residual attention over 4 tokens (query to_q_wplus(h)), then to_out;
                        on both halves, the unconditional one with the zero-W+ tokens as the official pipeline. The
                        tokens (the mapping network of a random W+ code) are computed once before timing: they do
                        not change from step to step.
  idadapter floor       base + the adapter modules timed on their own on the same activations, in the same round:
                        what the idadapter variant computes, with no integration overhead
  wplus floor           base + the W+ residual attentions alone, likewise
  idadapter <preset>,   with --presets: the idadapter / wplus variant under that block preset of the apply nodes
  wplus <preset>        (nodes/arch/block_weights.py; blocks at weight 0 skip the adapter), e.g. idadapter speed
Prints per variant the median seconds per step with min-max over --rounds, the ratio of medians to base, which
spreads overlap, and idadapter / its floor; writes bench/results/unet_overhead-<setting>-<device>.json.
"""

import argparse

import torch

# bench/common.py (the script's own folder) first: importing it imports the pack as `comfyui_idadapter`
from common import DTYPES, SD15_UNET, comparison, comparison_lines, device_name, interleaved, write_results
from comfyui_idadapter.nodes.arch import block_weights
from comfyui_idadapter.nodes.arch.idadapter import IDAdapter, IDAdapterConfig
from comfyui_idadapter.nodes.arch.unet_blocks import sdpa_attention
from comfyui_idadapter.nodes.arch.wplus import W_DIM, W_ROWS, WPlusAdapter, official_sd15_config
from comfyui_idadapter.training import diffusers_binding

TOKENS = 16
BASE_VARIANTS = ["base", "idadapter", "idadapter floor", "both-halves", "ip-adapter", "wplus", "wplus floor"]

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


class Attn2Variants:
    """One block's attn2 for every variant, picked per call by the UNet's cross_attention_kwargs: with
    ``ip_hidden_states`` (a name diffusers passes to the processors that take it and drops quietly for the others)
    IP-Adapter's decoupled cross-attention, text attention + attention over the image tokens; otherwise
    ``text_attention``: on SD1.5 the binding's W+ processor (with ``wplus`` it adds the W+ residual, without it is
    diffusers' plain attention), on SDXL diffusers' own processor."""

    def __init__(self, attn, text_attention):
        inner, ctx = attn.to_k.out_features, attn.to_k.in_features
        self.to_k_ip = torch.nn.Linear(ctx, inner, bias=False).to(attn.to_k.weight)
        self.to_v_ip = torch.nn.Linear(ctx, inner, bias=False).to(attn.to_k.weight)
        self.text_attention = text_attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_hidden_states=None, wplus=None):
        if ip_hidden_states is None:
            only_wplus_takes_it = {} if wplus is None else {"wplus": wplus}
            return self.text_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                       **only_wplus_takes_it)

        def attend(hidden_states, context, attention_mask, batch_size, sequence_length):
            q = attn.to_q(hidden_states)
            text = sdpa_attention(q, attn.to_k(context), attn.to_v(context), attn.heads)
            tokens = ip_hidden_states.expand(batch_size, -1, -1)
            image = sdpa_attention(q, self.to_k_ip(tokens), self.to_v_ip(tokens), attn.heads)
            return attn.to_out[1](attn.to_out[0](text + image))

        return diffusers_binding.around_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                                  attend)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--batch", type=int, default=1, help="images per CFG step (the UNet runs twice as many rows)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up round")
    parser.add_argument("--variants", nargs="+", choices=BASE_VARIANTS, default=BASE_VARIANTS,
                        help="which of the fixed variants to run (base always runs)")
    parser.add_argument("--presets", nargs="+", choices=[p for p in block_weights.PRESETS if p != "paper"],
                        default=[], help="block presets to time the idadapter and wplus variants under")
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    device, dtype, batch = torch.device(args.device), DTYPES[args.dtype], args.batch
    sdxl = args.family == "sdxl"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET)).to(device, dtype).eval().requires_grad_(False)
    context = unet.config.cross_attention_dim
    cfg = IDAdapterConfig(family=args.family, blocks=diffusers_binding.block_specs(unet), num_tokens=TOKENS)
    adapter = IDAdapter(cfg).to(device, dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for gated in adapter.adapters.values():
            gated.gamma.fill_(0.5)
    side = args.resolution // 8
    latents = torch.randn(2 * batch, 4, side, side, device=device, dtype=dtype)
    t = torch.full((2 * batch,), 500, device=device)
    text = torch.randn(2 * batch, 77, context, device=device, dtype=dtype)
    added = ({"text_embeds": torch.randn(2 * batch, 1280, device=device, dtype=dtype),
              "time_ids": torch.tensor([[args.resolution] * 2 + [0, 0] + [args.resolution] * 2] * 2 * batch,
                                       device=device, dtype=dtype)} if sdxl else None)
    e_r = torch.randn(1, TOKENS, cfg.embed_dim, device=device, dtype=dtype)
    cond_only = torch.tensor([False] * batch + [True] * batch)  # on the host, as the trainer passes it

    def run(kwargs=None):
        with torch.no_grad():
            return unet(latents, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs,
                        added_cond_kwargs=added).sample

    # each transformer block's input shape [2 x batch, tokens, channels], for the modules timed alone
    blocks = diffusers_binding.transformer_blocks(unet)
    shapes = {}
    hooks = [block.register_forward_pre_hook(lambda module, a, name=name: shapes.__setitem__(name, a[0].shape))
             for name, block in blocks.items()]
    run()
    for hook in hooks:
        hook.remove()
    cond_half = {name: torch.randn(batch, *shape[1:], device=device, dtype=dtype) for name, shape in shapes.items()}
    e_r_rows = e_r.expand(batch, -1, -1)

    def idadapter_modules():
        with torch.no_grad():
            for name, y in cond_half.items():
                adapter.adapters[name].residual(y, e_r_rows, sdpa_attention)

    diffusers_binding.attach(unet, adapter)
    image_tokens = torch.randn(1, TOKENS, context, device=device, dtype=dtype)
    levels = block_weights.block_levels(diffusers_binding.block_downscales(unet), args.family)
    presets = {preset: block_weights.block_weights(preset, "", levels) for preset in args.presets}
    variants = {
        "base": run,
        "idadapter": lambda: run(diffusers_binding.idadapter_kwargs(e_r, cond_only)),
        "both-halves": lambda: run(diffusers_binding.idadapter_kwargs(e_r)),
        "ip-adapter": lambda: run({"ip_hidden_states": image_tokens}),
        "idadapter modules": idadapter_modules,
    }
    for preset, weights in presets.items():
        variants[f"idadapter {preset}"] = lambda w=weights: run(diffusers_binding.idadapter_kwargs(e_r, cond_only,
                                                                                                  block_weights=w))
    if not sdxl:  # the W+ adapter exists for SD1.5 only
        wplus = WPlusAdapter(official_sd15_config()).to(device, dtype).eval().requires_grad_(False)
        with torch.no_grad():
            wplus.w_proj.norm.weight.normal_(1, 0.1)  # random LayerNorm too, so the zero-W+ tokens are not all zero
            wplus.w_proj.norm.bias.normal_(0, 0.1)
            w = torch.randn(1, W_ROWS, W_DIM, device=device, dtype=dtype)
            wplus_tokens = torch.cat([wplus.uncond_tokens(w).expand(batch, -1, -1),
                                      wplus.tokens(w).expand(batch, -1, -1)])  # [2 x batch, 4, 768]: uncond, cond
        assert len(diffusers_binding.attach_wplus(unet, wplus)) == 16
        both_halves = {name: torch.randn(shapes[name], device=device, dtype=dtype) for name in wplus.layers}

        def wplus_modules():
            with torch.no_grad():
                for name, h in both_halves.items():
                    wplus.layers[name].residual(h, wplus_tokens, sdpa_attention, blocks[name].attn2.heads)

        variants["wplus"] = lambda: run(diffusers_binding.wplus_kwargs(wplus_tokens))
        variants["wplus modules"] = wplus_modules
        for preset, weights in presets.items():
            variants[f"wplus {preset}"] = lambda w=weights: run(diffusers_binding.wplus_kwargs(wplus_tokens,
                                                                                              block_weights=w))
    for block in blocks.values():
        block.attn2.set_processor(Attn2Variants(block.attn2, block.attn2.processor))

    wanted = {"base", *args.variants, *(f"{m} {p}" for m in ("idadapter", "wplus") for p in presets)}
    wanted |= {f"{m} modules" for m in ("idadapter", "wplus") if f"{m} floor" in wanted}
    seconds = interleaved({name: fn for name, fn in variants.items() if name in wanted}, args.rounds, device)
    for name in ("idadapter", "wplus"):  # floor: base + the modules alone, round by round
        if f"{name} modules" in seconds:
            seconds[f"{name} floor"] = [b + m for b, m in zip(seconds["base"], seconds.pop(f"{name} modules"))]
    order = [*BASE_VARIANTS[:5], *(f"idadapter {p}" for p in presets), "wplus", "wplus floor",
             *(f"wplus {p}" for p in presets)]
    step = comparison({name: seconds[name] for name in order if name in seconds}, "base")
    medians = {name: v["median"] for name, v in step["variants"].items()}
    over_floor = {f"{name} / {name} floor": medians[name] / medians[f"{name} floor"]
                  for name in ("idadapter", "wplus") if name in medians and f"{name} floor" in medians}
    print(f"{args.family} UNet, {args.resolution}x{args.resolution}, {batch} image(s) (UNet batch {2 * batch}, one CFG "
          f"step), {args.dtype}, {device_name(device)}, {torch.get_num_threads()} threads; {args.rounds} rounds")
    print("\n".join(comparison_lines(step)))
    for name, ratio in over_floor.items():
        print(f"  {name}: {ratio:.3f}")
    setting = f"unet_overhead-{args.family}-{args.resolution}px-b{batch}-{args.dtype}"
    path = write_results(setting + ("-presets" if presets else ""), device, {
        "family": args.family, "resolution": args.resolution, "batch": batch, "dtype": args.dtype,
        "rounds": args.rounds, "presets": {p: sorted(n for n, w in ws.items() if w == 0) for p, ws in presets.items()},
        "step": step, **over_floor})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
