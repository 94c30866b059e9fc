"""What AdaFace costs, measured in one run on full-size modules with random weights.

    ./dev python bench/adaface_encode.py                       # CPU, fp32
    python bench/adaface_encode.py --device cuda --dtype fp16  # GPU

- encode: AdaFace Encode = the Arc2Face ID encoder (CLIP-L, 22 tokens) + the prompt inverter (CLIP-L with K/V
  multipliers, [2]*6 + [4]*6 by default, 77 tokens) + the SD1.5 text encode of the prompt holding the 16 tokens,
  against one plain SD1.5 text encode (CLIP-L, 77 tokens). Target: at most 3x.
- step: one CFG step (batch 2) of a full-size SD1.5 UNet with AdaFace's conditioning against a plain prompt's.
  AdaFace patches nothing in the MODEL and its conditioning has the plain prompt's shape, so this is 1.00x up to
  timing noise; --unet_repeats 0 skips it.
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
from comfyui_idadapter.nodes.arch import adaface as ada  # noqa: E402


def random_clip(multipliers, device, dtype):
    model = ada.CLIPTextTransformer(ada.TextModelConfig(kv_multipliers=multipliers))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(device, dtype).eval().requires_grad_(False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--multipliers", type=int, nargs=12, default=[2] * 6 + [4] * 6)
    parser.add_argument("--unet_repeats", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
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

    plain = timed(plain_encode, device, args.repeats)
    encode = timed(adaface_encode, device, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"AdaFace, {args.dtype}, {name}; inverter K/V multipliers {args.multipliers}")
    print(f"  plain text encode   {plain * 1000:8.1f} ms")
    print(f"  AdaFace Encode      {encode * 1000:8.1f} ms   {encode / plain:.2f}x plain (target <= 3x)")

    if args.unet_repeats:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**SD15_UNET).to(device, dtype).eval().requires_grad_(False)
        side = args.resolution // 8
        latents = torch.randn(2, 4, side, side, device=device, dtype=dtype)
        t = torch.tensor([500, 500], device=device)
        conds = {"plain": torch.cat([plain_encode()] * 2), "adaface": torch.cat([plain_encode(), adaface_encode()])}

        def step(cond):
            with torch.no_grad():
                return unet(latents, t, encoder_hidden_states=cond).sample

        seconds = {k: timed(lambda c=c: step(c), device, args.unet_repeats) for k, c in conds.items()}
        print(f"  UNet step, {args.resolution}x{args.resolution}, batch 2: plain {seconds['plain']:.3f} s, "
              f"AdaFace {seconds['adaface']:.3f} s   {seconds['adaface'] / seconds['plain']:.2f}x")


if __name__ == "__main__":
    main()
