"""What AdaFace costs, measured in one run on full-size modules with random weights.

    ./dev python bench/adaface_encode.py                       # CPU, fp32
    python bench/adaface_encode.py --device cuda --dtype fp16  # GPU

- encode: AdaFace Encode = the Arc2Face ID encoder (CLIP-L, 22 tokens) + the prompt inverter (CLIP-L with K/V
  multipliers, [2]*6 + [4]*6 by default, 77 tokens) + the SD1.5 text encode of the prompt holding the 16 tokens,
  against one plain SD1.5 text encode (CLIP-L, 77 tokens), interleaved over --rounds. Target: at most 3x.
- step: one CFG step (batch 2) of a full-size SD1.5 UNet with AdaFace's conditioning against a plain prompt's,
  interleaved over --unet_rounds. AdaFace patches nothing in the MODEL and its conditioning has the plain prompt's
  shape, so this is 1.00x up to timing noise; --unet_rounds 0 skips it.
Prints the median (min-max) of each and the ratio of medians; writes bench/results/adaface_encode-<dtype>-<device>.json.
"""

import argparse

import torch

# bench/common.py (the script's own folder) first: importing it imports the pack as `comfyui_idadapter`
from common import DTYPES, SD15_UNET, comparison, comparison_lines, device_name, interleaved, write_results
from comfyui_idadapter.nodes.arch import adaface as ada


def random_clip(multipliers, device, dtype):
    model = ada.CLIPTextTransformer(ada.TextModelConfig(kv_multipliers=multipliers))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(device, dtype).eval().requires_grad_(False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds of the encodes, after one warm-up round")
    parser.add_argument("--multipliers", type=int, nargs=12, default=[2] * 6 + [4] * 6)
    parser.add_argument("--unet_rounds", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)

    text_encoder = random_clip([1] * 12, device, dtype)  # SD1.5's CLIP-L text encoder
    weights = ada.AdaFaceWeights(ada.AdaFaceConfig(ada.TextModelConfig(kv_multipliers=args.multipliers)),
                                 random_clip(args.multipliers, device, dtype),
                                 torch.tensor([[1.0], [2.0], [4.0]], device=device, dtype=dtype))
    face_to_tokens = ada.AdaFaceEncoder(weights, random_clip([1] * 12, device, dtype))
    prompt = torch.randint(0, 49406, (1, 77), device=device)
    arcface = torch.randn(2, ada.ARCFACE_DIM, device=device, dtype=dtype)

    def plain_encode():
        with torch.no_grad():
            return text_encoder(prompt)

    def adaface_encode():
        with torch.no_grad():
            tokens = face_to_tokens(arcface)
            token_embs = text_encoder.token_embeddings(prompt).clone()
            token_embs[:, 5:5 + len(tokens)] = tokens  # where "a photo of z" puts them
            return text_encoder(input_token_embs=token_embs)

    encode = comparison(interleaved({"plain text encode": plain_encode, "AdaFace Encode": adaface_encode},
                                    args.rounds, device), "plain text encode", "ms")
    print(f"AdaFace, {args.dtype}, {device_name(device)}, {torch.get_num_threads()} threads; inverter K/V multipliers "
          f"{args.multipliers}; {args.rounds} rounds (target: AdaFace Encode <= 3x plain)")
    print("\n".join(comparison_lines(encode)))
    results = {"dtype": args.dtype, "multipliers": args.multipliers, "rounds": args.rounds, "encode": encode}

    if args.unet_rounds:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**SD15_UNET).to(device, dtype).eval().requires_grad_(False)
        side = args.resolution // 8
        latents = torch.randn(2, 4, side, side, device=device, dtype=dtype)
        t = torch.tensor([500, 500], device=device)
        conds = {"plain": torch.cat([plain_encode()] * 2), "AdaFace": torch.cat([plain_encode(), adaface_encode()])}

        def step(cond):
            with torch.no_grad():
                return unet(latents, t, encoder_hidden_states=cond).sample

        step_seconds = interleaved({f"UNet step, {name}": lambda c=c: step(c) for name, c in conds.items()},
                                   args.unet_rounds, device)
        results.update(resolution=args.resolution, unet_rounds=args.unet_rounds,
                       step=comparison(step_seconds, "UNet step, plain"))
        print(f"SD1.5 UNet, {args.resolution}x{args.resolution}, batch 2; {args.unet_rounds} rounds")
        print("\n".join(comparison_lines(results["step"])))
    print(f"wrote {write_results(f'adaface_encode-{args.dtype}', device, results)}")


if __name__ == "__main__":
    main()
