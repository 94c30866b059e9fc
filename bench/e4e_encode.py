"""e4e encode throughput: the full-size Encoder4Editing (IR-SE-50 + 18 style heads, random weights) at 256x256.

    ./dev python bench/e4e_encode.py                                      # CPU, fp32
    python bench/e4e_encode.py --device cuda --dtype fp16 --batch 1 8 32  # GPU

- encode: ``encode_wplus`` (normalization + the encoder + latent_avg) on [B, 3, 256, 256] images in [0, 1], one
  variant per batch size in --batch, interleaved over --rounds; prints per batch size the median milliseconds per
  batch (min-max), its ratio to the first batch size's, and images per second from the median.
- align: FFHQ alignment (``nodes/arch/ffhq_align.py`` ``align_ffhq``) of one face from its 5 landmarks to a 256x256
  crop (e4e's input), per image, on the CPU (where align_ffhq builds its sampling grid), from an --image_size square
  image with the eyes a fifth of its side apart (an 0.8-side crop square); --align_rounds 0 skips it.
Writes bench/results/e4e_encode-<dtype>-<device>.json.
"""

import argparse

import torch

# bench/common.py (the script's own folder) first: importing it imports the pack as `comfyui_idadapter`
from common import DTYPES, comparison, comparison_lines, device_name, interleaved, write_results
from comfyui_idadapter.nodes.arch.e4e import (
    INPUT_SIZE, LATENT_DIM, STYLE_COUNT, E4EWeights, Encoder4Editing, encode_wplus)
from comfyui_idadapter.nodes.arch.ffhq_align import align_ffhq


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
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up round")
    parser.add_argument("--align_rounds", type=int, default=20)
    parser.add_argument("--image_size", type=int, default=1024, help="side of the image alignment crops from")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    weights = random_encoder(device, DTYPES[args.dtype])
    params = sum(p.numel() for p in weights.encoder.parameters())
    print(f"e4e (Encoder4Editing, IR-SE-50, {params / 1e6:.1f} M parameters), {INPUT_SIZE}x{INPUT_SIZE}, "
          f"{args.dtype}, {device_name(device)}, {torch.get_num_threads()} threads; {args.rounds} rounds")
    images = {batch: torch.rand(batch, 3, INPUT_SIZE, INPUT_SIZE, device=device, dtype=DTYPES[args.dtype])
              for batch in args.batch}

    def encode(batch):
        with torch.no_grad():
            return encode_wplus(weights, images[batch])

    seconds = interleaved({f"batch {b}": lambda b=b: encode(b) for b in args.batch}, args.rounds, device)
    batches = comparison(seconds, f"batch {args.batch[0]}", "ms")
    for batch, line in zip(args.batch, comparison_lines(batches)):
        figures = batches["variants"][f"batch {batch}"]
        figures["images_per_s"] = batch / figures["median"]
        print(f"{line}   {figures['images_per_s']:8.2f} images/s")
    results = {"dtype": args.dtype, "resolution": INPUT_SIZE, "rounds": args.rounds, "encode": batches}

    if args.align_rounds > 0:
        side = args.image_size
        image = torch.rand(3, side, side)
        # a frontal face about half the image wide: eyes 0.2 * side apart, mouth 0.2 * side below them
        landmarks = torch.tensor([[0.40, 0.42], [0.60, 0.42], [0.50, 0.52], [0.42, 0.62], [0.58, 0.62]]) * side
        label = f"align_ffhq {side}px -> {INPUT_SIZE}px, CPU"
        seconds = interleaved({label: lambda: align_ffhq(image, landmarks, INPUT_SIZE)}, args.align_rounds,
                              torch.device("cpu"))
        results["align"] = comparison(seconds, label, "ms")
        print("\n".join(comparison_lines(results["align"])))
    print(f"wrote {write_results(f'e4e_encode-{args.dtype}', device, results)}")


if __name__ == "__main__":
    main()
