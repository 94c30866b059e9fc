"""Convert an official AdaFace checkpoint (.pt, adaface-neurips/adaface-models) into this pack's adaface/1 file.

    python tools/convert_adaface.py --inverter VGGface2_HQ_masks2024-10-14T16-09-24_zero3-ada-3500.pt \\
        --arc2face_encoder path/to/Arc2Face/encoder --out ComfyUI/models/adaface/adaface.safetensors

The checkpoint is read without running anything in it (a restricted unpickler); of a joint checkpoint the arc2face
inverter is taken. --arc2face_encoder bundles Arc2Face's ID encoder (the folder 'encoder' of FoivosPar/Arc2Face:
config.json + pytorch_model.bin) into the file, so that the file alone turns faces into tokens.
"""

import argparse
import sys

if not __package__:  # run as a script: _bootstrap, beside it, imports this checkout as `comfyui_idadapter`
    import _bootstrap  # noqa: F401

import torch  # noqa: E402

from comfyui_idadapter.nodes.arch.adaface_official import convert_official_adaface  # noqa: E402
from comfyui_idadapter.nodes.errors import PackError  # noqa: E402

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inverter", required=True, help="the official AdaFace checkpoint (.pt)")
    parser.add_argument("--out", required=True, help="the adaface/1 file to write (.safetensors)")
    parser.add_argument("--arc2face_encoder", help="Arc2Face's 'encoder' folder (or its weights file) to bundle")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16",
                        help="fp16 (default: the official inverter is stored in fp16) or fp32")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    weights = convert_official_adaface(args.inverter, args.out, args.arc2face_encoder, DTYPES[args.dtype],
                                       args.overwrite)
    inverter = weights.config.inverter
    layer_weights = [round(w, 4) for w in weights.hidden_state_layer_weights.flatten().tolist()]
    encoder = "bundled" if weights.arc2face is not None else "not bundled (load it separately)"
    report = (f"wrote {args.out} (adaface/1, {args.dtype})\n"
              f"  inverter: {inverter.num_layers} layers, width {inverter.hidden_size}, {inverter.num_heads} heads, "
              f"K/V multipliers {inverter.kv_multipliers}\n"
              f"  ID vectors: {weights.config.num_id_vecs}; hidden-state layer weights {layer_weights}; "
              f"pad embeddings: {'yes' if weights.pad_embeddings is not None else 'no (strength must stay 1)'}\n"
              f"  Arc2Face ID encoder: {encoder}")
    print(report)
    return report


def cli(argv=None) -> int:
    try:
        main(argv)
    except PackError as exc:  # a missing, damaged or foreign file, or an existing output: the message says what to do
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
