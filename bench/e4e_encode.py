"""e4e encode throughput: the full-size Encoder4Editing (IR-SE-50 + 18 style heads, random weights) at 256x256.

    ./dev python bench/e4e_encode.py                                    # CPU, fp32
    python bench/e4e_encode.py --device cuda --dtype fp16 --batch 1 8 32  # GPU

- encode: ``encode_wplus`` (normalization + the encoder + latent_avg) on [B, 3, 256, 256] images in [0, 1], for each
  batch size in --batch; prints milliseconds per batch and images per second.
- align: FFHQ alignment (``nodes/arch/ffhq_align.py`` ``align_ffhq``) of one face from its 5 landmarks to a 256x256
  crop (e4e's input), per image, on the CPU (where align_ffhq builds its sampling grid), from an --image_size square
  image with the eyes a fifth of its side apart (an 0.8-side crop square). Skipped where this checkout has no
  ffhq_align.py; --align_repeats 0 skips it.
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

from common import timed  # noqa: E402  (bench/, the script's own folder)
from comfyui_idadapter.nodes.arch.e4e import (  # noqa: E402
    INPUT_SIZE, LATENT_DIM, STYLE_COUNT, E4EWeights, Encoder4Editing, encode_wplus)


def random_encoder(device, dtype) -> E4EWeights:
    """A full-size e4e encoder with random weights, its BatchNorms given random statistics (eval mode)."""
    encoder = Encoder4Editing()
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    encoder = encoder.to(device, dtype).eval().requires_grad_(False)
    return E4EWeights(encoder, torch.randn(STYLE_COUNT, LATENT_DIM, device=device, dtype=dtype))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--align_repeats", type=int, default=20)
    parser.add_argument("--image_size", type=int, default=1024, help="side of the image alignment crops from")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)

    weights = random_encoder(device, dtype)
    params = sum(p.numel() for p in weights.encoder.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"e4e (Encoder4Editing, IR-SE-50, {params / 1e6:.1f} M parameters), {INPUT_SIZE}x{INPUT_SIZE}, "
          f"{args.dtype}, {name}")
    for batch in args.batch:
        images = torch.rand(batch, 3, INPUT_SIZE, INPUT_SIZE, device=device, dtype=dtype)

        def encode():
            with torch.no_grad():
                return encode_wplus(weights, images)

        seconds = timed(encode, device, args.repeats)
        print(f"  encode batch {batch:3d}   {seconds * 1000:9.1f} ms/batch   {batch / seconds:8.2f} images/s")

    if args.align_repeats <= 0:
        return
    if not (_root / "nodes" / "arch" / "ffhq_align.py").is_file():
        print("  align: skipped (no nodes/arch/ffhq_align.py in this checkout)")
        return
    from comfyui_idadapter.nodes.arch.ffhq_align import align_ffhq

    side = args.image_size
    image = torch.rand(3, side, side)
    # a frontal face about half the image wide: eyes 0.2 * side apart, mouth 0.2 * side below them
    landmarks = torch.tensor([[0.40, 0.42], [0.60, 0.42], [0.50, 0.52], [0.42, 0.62], [0.58, 0.62]]) * side
    seconds = timed(lambda: align_ffhq(image, landmarks, INPUT_SIZE), torch.device("cpu"), args.align_repeats)
    print(f"  align_ffhq {side}x{side} -> {INPUT_SIZE}x{INPUT_SIZE} (CPU, fp32)   {seconds * 1000:9.2f} ms/image")


if __name__ == "__main__":
    main()
