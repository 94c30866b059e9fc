"""Per-call cost of the pack's apply nodes inside a real ComfyUI: a full-size SD1.5 MODEL (random weights, ComfyUI's
own UNet and attention kernel) patched by Apply IDAdapter (under its block presets) and Apply W+ Adapter, each
MODEL's ``apply_model`` on one [uncond, cond] batch, variants interleaved in one run. This is what a user's sampler
pays per step; bench/unet_overhead.py measures the same methods on diffusers' UNet.

    COMFYUI_PATH=~/ComfyUI ~/comfy-venv/bin/python bench/comfyui_overhead.py                  # CPU, 512x512
    COMFYUI_PATH=~/ComfyUI python bench/comfyui_overhead.py --device cuda --batch 8 --resolution 768 --rounds 20

Runs with the Python environment ComfyUI runs in (it imports ComfyUI from COMFYUI_PATH and loads this checkout as a
custom node from a temporary base folder). Variants: base (the plain MODEL), idadapter (Apply IDAdapter, weight 1,
a random adapter with gamma 0.5 on all 16 blocks, no K/V deltas), idadapter <preset> for each --presets, wplus
(Apply W+ Adapter, scale 1, start 0). Writes bench/results/comfyui_overhead-<setting>-<device>.json.
"""

import argparse
import asyncio
import os
import sys
import tempfile

import torch

# bench/common.py (the script's own folder) first: the timer and the results writer
from common import ROOT, comparison, comparison_lines, device_name, interleaved, write_results

# ComfyUI's detected config of an SD1.5 checkpoint's UNet (comfy.model_detection on v1-5-pruned-emaonly)
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def start_comfyui(comfy: str, device: str):
    """ComfyUI's modules with this checkout loaded as a custom node (from a temporary base folder)."""
    os.chdir(comfy)
    sys.path.insert(0, comfy)
    from comfy.cli_args import args

    args.cpu = device == "cpu"  # before comfy.model_management is imported
    import folder_paths

    base = tempfile.mkdtemp()
    os.makedirs(os.path.join(base, "custom_nodes"))
    os.symlink(ROOT, os.path.join(base, "custom_nodes", "comfyui-idadapter"))
    folder_paths.add_model_folder_path("custom_nodes", os.path.join(base, "custom_nodes"), is_default=True)
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return nodes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1, help="images per CFG step (the UNet runs twice as many rows)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up round")
    parser.add_argument("--presets", nargs="*", default=["speed"], help="Apply IDAdapter block presets to time too")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        parser.error("set COMFYUI_PATH to a ComfyUI checkout (and run with the Python environment it runs in)")
    nodes = start_comfyui(os.environ["COMFYUI_PATH"], args.device)
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher

    apply_idadapter = nodes.NODE_CLASS_MAPPINGS["IDA_ApplyIDAdapter"]
    apply_wplus = nodes.NODE_CLASS_MAPPINGS["IDA_ApplyWPlusAdapter"]
    pack = sys.modules[apply_idadapter.__module__]
    wplus = sys.modules[apply_wplus.__module__]
    patches = sys.modules[apply_idadapter.__module__.rsplit(".", 1)[0] + ".patches"]  # the node modules loaded its submodules

    torch.manual_seed(0)
    model = comfy.model_detection.model_config_from_unet_config(SD15_UNET_CONFIG).get_model({})
    with torch.no_grad():  # ComfyUI allocates layers without initialising them
        for p in model.parameters():
            p.normal_(0, 0.02)
    device = comfy.model_management.get_torch_device()
    base = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())
    blocks = patches.unet_layout.unet_transformer_blocks(model.diffusion_model)
    adapter = pack.ida.IDAdapter(pack.ida.IDAdapterConfig(family="sd15", blocks=blocks, num_tokens=16)).eval()
    with torch.no_grad():
        for gated in adapter.adapters.values():
            gated.gamma.fill_(0.5)
    loaded = pack.LoadedIDAdapter(adapter, {}, "", patcher=patches.idadapter_patch.adapter_patcher(adapter))
    embeds = pack.ida.IDAdapterEmbeds(torch.randn(1, 16, adapter.config.embed_dim), {"l": torch.zeros(768)}, "sd15")
    w_adapter = wplus.wplus_arch.WPlusAdapter(wplus.wplus_arch.official_sd15_config()).eval()
    with torch.no_grad():
        for p in w_adapter.parameters():
            p.normal_(0, 0.02)
    loaded_wplus = wplus.LoadedModel(patches.memory.module_patcher(w_adapter), w_adapter.config)

    models = {"base": base,
              "idadapter": apply_idadapter.execute(base, loaded, embeds, 1.0, 0.0, 1.0).result[0],
              **{f"idadapter {preset}": apply_idadapter.execute(base, loaded, embeds, 1.0, 0.0, 1.0,
                                                                block_preset=preset).result[0]
                 for preset in args.presets},
              "wplus": apply_wplus.execute(base, loaded_wplus, torch.randn(1, 18, 512), 1.0, 0.0, 1.0).result[0]}
    side = args.resolution // 8
    x = torch.randn(2 * args.batch, 4, side, side, device=device)
    context = torch.randn(2 * args.batch, 77, 768, device=device)
    sigma = torch.full((2 * args.batch,), 5.0, device=device)

    def call(patcher):
        def run():
            comfy.model_management.load_models_gpu([patcher])
            options = {**patcher.model_options.get("transformer_options", {}), "cond_or_uncond": [1, 0],
                       "sigmas": sigma}
            with torch.no_grad():
                patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)
        return run

    seconds = interleaved({name: call(patcher) for name, patcher in models.items()}, args.rounds, torch.device(device))
    step = comparison(seconds, "base")
    print(f"ComfyUI apply_model, SD1.5, {args.resolution}x{args.resolution}, {args.batch} image(s) (batch "
          f"{2 * args.batch}: uncond + cond), {device_name(torch.device(device))}, {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds")
    print("\n".join(comparison_lines(step)))
    path = write_results(f"comfyui_overhead-sd15-{args.resolution}px-b{args.batch}", torch.device(device), {
        "resolution": args.resolution, "batch": args.batch, "rounds": args.rounds, "presets": args.presets,
        "step": step})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
